"""Fixtures shared by the test modules (plain helpers are in tests/helpers.py)."""
import pytest
import torch

from src.model import build_planner
from tests.helpers import tiny_lora_model, training_cfg


@pytest.fixture
def make_planner():
    """make_planner(kind, layers=2, **knob_overrides) -> (planner, optimizer, token loss, params), built by the
    same build_planner as training, on a tiny Qwen3 with LoRA."""
    def build(kind, layers=2, seed=0, lr=1e-2, **overrides):
        model = tiny_lora_model(layers=layers, seed=seed)
        planner = build_planner(model, training_cfg(kind, lr, **overrides))
        if planner.uses_probe:
            planner.token_loss.probe_ids = torch.arange(2, 64)
        return planner, planner.optimizer, planner.token_loss, planner.params
    return build
