"""Shared fixtures: a tiny Qwen3 with LoRA adapters, batches of random tokens, and a planner factory."""
import os

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")          # tests never touch the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from omegaconf import OmegaConf

from src.main import PLANNER_KNOBS
from src.model import PLANNERS, TokenLoss, adapter_graph, quiet_libraries
from src.preprocess import collate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_lora_model(layers: int = 2, hidden: int = 32, vocab: int = 64, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3Config, Qwen3ForCausalLM
    quiet_libraries()
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                         tie_word_embeddings=False, max_position_embeddings=128)
    model = get_peft_model(Qwen3ForCausalLM(config), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=True, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    return model


def random_batch(n: int = 8, length: int = 12, vocab: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        size = length - (i % 3)
        seq = torch.randint(2, vocab, (size,), generator=g).tolist()
        examples.append((seq, size // 2))
    return collate(examples, pad_id=0)


def knobs(kind: str, **overrides):
    """The planner's knobs from config/config.yaml, with overrides."""
    base = OmegaConf.load(os.path.join(REPO, "config", "config.yaml")).training.scheduler
    values = {k: base[k] for k in PLANNER_KNOBS[kind]}
    values.update(overrides)
    return OmegaConf.create(values)


OPT = OmegaConf.create({"type": "adamw", "lr_init": 1e-2, "betas": [0.9, 0.95], "weight_decay": 0.0})


@pytest.fixture
def make_planner():
    """make_planner(kind, layers=2, **knob_overrides) -> (planner, optimizer, lm, params)."""
    def build(kind, layers=2, seed=0, lr=1e-2, **overrides):
        model = tiny_lora_model(layers=layers, seed=seed)
        lm = TokenLoss(model)
        params = [p for p in model.parameters() if p.requires_grad]
        graph = adapter_graph(model)
        opt_cfg = OmegaConf.create({**OmegaConf.to_container(OPT), "lr_init": lr})
        planner = PLANNERS[kind](knobs(kind, **overrides), opt_cfg, lm, params, graph)
        optimizer = planner.make_optimizer()
        if planner.uses_probe:
            lm.probe_ids = torch.arange(2, 64)
        return planner, optimizer, lm, params
    return build
