"""What several test modules use: a tiny Qwen3 with LoRA adapters, batches of random tokens, typed planner settings,
and fault injection.  (Fixtures live in conftest.py; plain helpers here, imported explicitly.)"""
import os

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")          # tests never touch the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch
from omegaconf import OmegaConf

from src.main import SCHEDULERS, TrainingConfig
from src.model import quiet_libraries
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


def training_cfg(kind: str, lr: float = 1e-2, **overrides):
    """`training` settings with the typed defaults of planner `kind` (src/main.py), `lr_init` and knob overrides."""
    cfg = OmegaConf.structured(TrainingConfig)
    cfg.scheduler = OmegaConf.merge(OmegaConf.structured(SCHEDULERS[kind]), overrides)
    cfg.optimizer = OmegaConf.merge(cfg.optimizer, {"lr_init": lr, "betas": [0.9, 0.95], "weight_decay": 0.0})
    cfg.probe_vocab = 62
    return cfg


def inject_nan(monkeypatch, steps) -> None:
    """Make the loss of the optimiser steps `steps` (0-based attempts) non-finite in src.train's loop: the fault an
    overflow or a bad batch causes, injected from the test (production code has no hook for it)."""
    from src import train as tr
    real = tr.optimiser_step

    def faulty(planner, micro_batches, device, autocast, clip, ctx):
        if ctx.step not in steps:
            return real(planner, micro_batches, device, autocast, clip, ctx)
        forward = planner.token_loss.forward
        planner.token_loss.forward = lambda *a, **k: forward(*a, **k) * float("nan")
        try:
            return real(planner, micro_batches, device, autocast, clip, ctx)
        finally:
            del planner.token_loss.forward

    monkeypatch.setattr(tr, "optimiser_step", faulty)


# A local stand-in for a hub model: a config-built Qwen3 of the real architecture with two small layers.
STANDIN_MODEL = ["model.name=embedded", "model.parameter_count=null", "model.embedded.layers=2",
                 "model.embedded.hidden=256", "model.embedded.heads=4", "model.embedded.kv_heads=2",
                 "model.embedded.head_dim=64", "model.embedded.intermediate=512"]


def gsm8k_folder(folder, train: int = 160, test: int = 16):
    """A local folder in GSM8K format (question; reasoning lines; '#### N'): a stand-in for openai/gsm8k."""
    import json
    import random
    from pathlib import Path
    from src.preprocess import synthetic_problem
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    for split, n in (("train", train), ("validation", test), ("test", test)):
        rows = [synthetic_problem(rng, 3) for _ in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder
