"""The model as training receives it: mode and gradient checkpointing from the first step."""
import os

import pytest
import torch
from omegaconf import OmegaConf

from src.main import ModelConfig
from src.model import TokenLoss, build_model
from tests.helpers import REPO, random_batch


@pytest.mark.parametrize("checkpointing", [True, False])
def test_build_model_hands_over_a_training_model_that_checkpoints_from_the_first_step(checkpointing):
    """from_pretrained returns the base model in eval mode, where transformers skips gradient checkpointing; the
    model must be in training mode throughout (LoRA dropout and checkpointing on) before any evaluation."""
    cfg = OmegaConf.structured(ModelConfig)                 # the schema's defaults
    cfg.name, cfg.parameter_count, cfg.dtype = "embedded", None, "float32"
    loaded = build_model(cfg, checkpointing, torch.device("cpu"))
    assert [type(m).__name__ for m in loaded.peft.modules() if not m.training] == []
    lm = TokenLoss(loaded.peft)
    calls = []
    # a pre-hook inside the layer's forward: the recomputation stops early, after the last tensor backward needs,
    # so a forward hook at the layer's end might not run again
    mlp0 = loaded.peft.get_base_model().model.layers[0].mlp
    mlp0.register_forward_pre_hook(lambda *args: calls.append(1))
    batch = random_batch(n=2, length=10, vocab=64)
    lm(batch.input_ids, batch.attention_mask, batch.answer_mask).sum().backward()
    assert len(calls) == (2 if checkpointing else 1)     # checkpointing runs the layer again in backward
