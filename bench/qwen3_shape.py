"""Write a local model folder with the Qwen3-0.6B architecture (random weights) for timing without the hub.

    uv run python bench/qwen3_shape.py --out .cache/qwen3-0.6b-shape [--layers 28] [--vocab 151936]

The folder is an ordinary Hugging Face checkpoint: the training CLI and the benches load it as a local model
folder (`model.name=<folder>`), through the same code as the real Qwen/Qwen3-0.6B.  Its shape is Qwen3-0.6B's
(28 layers, hidden 1,024, 16 query / 8 key-value heads of 128, MLP 3,072, a 151,936-word vocabulary, tied
embeddings: ~596 M parameters), so step time, memory and energy are those of the real model; its weights are a
seeded random draw (speed does not depend on them), so what it learns means nothing.  The tokenizer is the
embedded default's (a BPE trained on the synthetic task, model.embedded.vocab_size words): every id it makes is
a row of the large embedding table, and the rows it never makes still cost what they cost in the LM head.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from src.model import embedded_model_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write (an existing one is left as it is)")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    if (out / "config.json").is_file():
        print(f"{out} exists: left as it is")
        return
    defaults = OmegaConf.load(Path(__file__).resolve().parent.parent / "config" / "config.yaml")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir(defaults.model.embedded))
    config = Qwen3Config(
        vocab_size=args.vocab, hidden_size=1024, intermediate_size=3072, num_hidden_layers=args.layers,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(args.seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):   # a random draw is faster on a GPU
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: Qwen3 architecture, {args.layers} layers, vocabulary {args.vocab:,}, {n / 1e6:,.1f} M "
          f"parameters (random weights), tokenizer of {len(tokenizer)} words")


if __name__ == "__main__":
    main()
