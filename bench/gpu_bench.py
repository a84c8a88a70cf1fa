"""How fast this project trains and evaluates on one GPU, next to the plain stack, in one run (Qwen3-0.6B's shape).

    python3 bench/gpu_bench.py [--model DIR] [--results-root DIR] [--parts loop,eval,anchor] [--tiny]

Everything is measured on a local model folder of Qwen3-0.6B's shape (random weights, the 151,936-word
vocabulary; written by this script when missing) with the synthetic task at GSM8K's lengths
(`dataset.synthetic.length_profile=gsm8k`): speed does not depend on the weights, and random weights never stop
generating early, so the evaluation is timed at its worst case.  Parts, in this order, each one's failure recorded
without stopping the others, the record rewritten after each:

  loop    the project's optimiser step (src.train.optimiser_step with fixed LR; the loop's clock, synchronised once
          per step, around it) in the seed's layout (8 micro-batches of 8, gradient checkpointing: the run files of
          Qwen3-0.6B) and in config/presets/gpu-fast.yaml's (one micro-batch of 64, no checkpointing, each decoder
          layer compiled): seconds per step, tokens per second, peak memory, the first steps (the compilation)
          apart; and the host synchronisations of one step of each (torch.cuda.set_sync_debug_mode), by the line of
          code that made them
  eval    src.train.generate_and_score over 1,319 problems x 256 new tokens with the `merged` engine, then twice
          with `static` (the first includes compiling the decoding step), and `generate` (today's) on the first
          256 problems only (its 1,319 would take minutes; the whole set is extrapolated from the batch); the
          teacher-forced loss of the evaluation too (mean_answer_loss).  On the gpu-fast layout's model, after its
          steps (LoRA weights non-zero, so the merge does something)
  anchor  the plain stack, no project code (transformers + PEFT LoRA r=64 on the seven projections, AdamW, bf16
          autocast, full logits through the model's own loss), as the project's anchor measured it on an H100:
          8 x 8 x 256 tokens with checkpointing, 64 x 1 x 256 without; and plain `generate` of 256 prompts of 128
          tokens x 256 new tokens

`--tiny` rehearses all of it on a CPU in minutes: the embedded model, a handful of steps, problems and tokens.
The record goes to <results-root>/<gpu>/gpu_bench.json (bench/results/<gpu>/ by default; on a lent machine pass
--results-root $OUT).  The exact command for a GPU session is in bench/README.md.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch

from harness import setup

from src.model import StepContext, build_planner, compile_decoder_layers
from src.preprocess import PromptFormat, generation_batches, load_problems
from src.train import (Budget, evaluation_mode, generate_and_score, loss_batches, mean_answer_loss,
                       optimiser_step)

RUN = "comparative-4-iter1-Qwen3-0.6B-gsm8k"      # fixed LR: the loop's cost, not a planner's
GSM8K_TEST = 1319


# ----------------------------------------------------------------------------------------------------
# Settings: the GPU's and the CPU rehearsal's
# ----------------------------------------------------------------------------------------------------
def settings(args) -> dict:
    if not args.tiny:
        return dict(data=["model.name=" + str(args.model), "dataset.name=synthetic",
                          "dataset.synthetic.length_profile=gsm8k", f"dataset.synthetic.test_size={GSM8K_TEST}"],
                    seed_layout=[], fast_layout=["+presets@_global_=gpu-fast"], warmup=2, steps=4,
                    problems=GSM8K_TEST, new_tokens=256, generate_problems=256,
                    anchor_shape=dict(layers=28, hidden=1024, intermediate=3072, heads=16, kv_heads=8, head_dim=128,
                                      vocab=151936),
                    anchor_train=[(8, 8, 256, True), (64, 1, 256, False)], anchor_steps=5,
                    anchor_generate=(256, 128, 256), anchor_dtype=torch.bfloat16)
    small = ["training.global_batch_size=8"]
    # float32 on the CPU: bfloat16 matrix products are emulated there and many times slower
    return dict(data=["model.name=embedded", "model.parameter_count=null", "model.dtype=float32",
                      "training.mixed_precision=fp32", "dataset.name=synthetic",
                      "dataset.synthetic.length_profile=gsm8k", "dataset.synthetic.test_size=24",
                      "dataset.synthetic.train_size=400", "training.device=cpu"],
                seed_layout=small + ["training.micro_batch_size=4", "training.gradient_accumulation_steps=2"],
                fast_layout=["+presets@_global_=gpu-fast"] + small + ["training.micro_batch_size=8",
                                                                      "training.gradient_accumulation_steps=1",
                                                                      "evaluation.batch_size=16"],
                warmup=1, steps=2, problems=24, new_tokens=8, generate_problems=8,
                anchor_shape=dict(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, vocab=512),
                anchor_train=[(4, 2, 32, True), (8, 1, 32, False)], anchor_steps=2, anchor_generate=(8, 16, 8),
                anchor_dtype=torch.float32)


def gpu_slug(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100' (the folder bench/results/h100 of earlier sessions); 'cpu' on the CPU."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    model = re.search(r"\b([A-Z]+\d+[A-Z]*)\b", name)
    return (model.group(1) if model else re.sub(r"[^A-Za-z0-9]+", "-", name)).lower()


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def write_qwen3_shape(folder: Path) -> None:
    """A model folder of Qwen3-0.6B's architecture (random weights, bf16) with the embedded default's tokenizer:
    what bench/qwen3_shape.py writes (the same config), made here so that this script needs nothing else."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM
    from src.main import EmbeddedConfig
    from src.model import embedded_model_dir
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir(OmegaConf.structured(EmbeddedConfig)))
    config = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"wrote {folder}: Qwen3-0.6B's shape, random weights")


# ----------------------------------------------------------------------------------------------------
# Part 1: the project's loop in two layouts
# ----------------------------------------------------------------------------------------------------
def loop_layout(name: str, overrides: list[str], s: dict, record: dict, keep: bool = False, backend="inductor"):
    """Warm-up and timed optimiser steps of one layout, as the loop runs them; returns the bench when `keep`."""
    bench = setup(RUN, s["data"] + overrides)
    t, device = bench.cfg.training, bench.device
    if t.compile_layers:      # what build_model does with training.compile_layers (harness builds without it)
        compile_decoder_layers(bench.loaded.peft, backend)
    planner = build_planner(bench.loaded.peft, t)
    batches = bench.batches(s["warmup"] + s["steps"] + 1)
    budget = Budget(1e9, "seconds", device)
    reset_peak(device)
    times, tokens, losses = [], [], []
    for i, micro in enumerate(batches[:-1]):
        started = budget.last
        ctx = StepContext(step=i, elapsed=started, budget_left=budget.fraction_left(), progress=budget.progress(),
                          steps_left=budget.steps_left())
        result = optimiser_step(planner, micro, device, bench.autocast, t.clip_grad_norm, ctx)
        times.append(budget.end_step(started))
        tokens.append(result.tokens)
        losses.append(result.loss)
    timed = times[s["warmup"]:]
    row = {"micro_batch_size": t.micro_batch_size, "gradient_accumulation_steps": t.gradient_accumulation_steps,
           "gradient_checkpointing": t.gradient_checkpointing, "compile_layers": t.compile_layers,
           "warmup_step_s": times[:s["warmup"]], "step_s": sum(timed) / len(timed), "step_s_each": timed,
           "tokens_per_step": sum(tokens[s["warmup"]:]) / len(timed),
           "tokens_per_s": sum(tokens[s["warmup"]:]) / sum(timed), "peak_gib": peak_gib(device),
           "losses": losses, "syncs_per_step": count_syncs(planner, batches[-1], bench, t)}
    record.setdefault("loop", {})[name] = row
    print(f"loop {name}: {row['step_s']:.3f} s/step, {row['tokens_per_s']:,.0f} tokens/s, warm-up "
          f"{', '.join(f'{x:.1f}' for x in row['warmup_step_s'])} s, peak {row['peak_gib']} GiB", flush=True)
    if keep:
        return bench, planner
    planner.token_loss.close()
    del bench, planner
    free(device)
    return None


def count_syncs(planner, micro, bench, t) -> dict | None:
    """Host synchronisations during one optimiser step, by the line of code that caused them (CUDA's sync debug
    mode warns at each); None on the CPU."""
    device = bench.device
    if device.type != "cuda":
        return None
    ctx = StepContext(step=0, elapsed=0.0, budget_left=1.0, progress=0.0, steps_left=100.0)
    torch.cuda.synchronize(device)
    where = Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            optimiser_step(planner, micro, device, bench.autocast, t.clip_grad_norm, ctx)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            where[f"{os.path.relpath(w.filename, REPO) if w.filename.startswith(str(REPO)) else w.filename}:"
                  f"{w.lineno}"] += 1
    torch.cuda.synchronize(device)
    return {"total": sum(where.values()), "micro_batches": len(micro), "by_line": dict(where.most_common())}


# ----------------------------------------------------------------------------------------------------
# Part 2: evaluation
# ----------------------------------------------------------------------------------------------------
def evaluation(bench, planner, s: dict, record: dict) -> None:
    cfg, device, model, tokenizer = bench.cfg, bench.device, bench.loaded.peft, bench.loaded.tokenizer
    e = cfg.evaluation
    fmt = PromptFormat(tokenizer)
    problems = load_problems(cfg.dataset, "test", s["problems"])
    out = record.setdefault("eval", {"problems": len(problems), "max_new_tokens": s["new_tokens"],
                                     "batch_size": e.batch_size, "runs": []})
    prompt_tokens = [len(p) for p in fmt.encode_prompts([p.question for p in problems])]
    out["prompt_tokens_mean"] = sum(prompt_tokens) / len(prompt_tokens)
    out["prompt_tokens_max"] = max(prompt_tokens)

    def timed(label, engine, subset, batch_size):
        batches = generation_batches(fmt, subset, batch_size, cfg.dataset.max_tokens)
        reset_peak(device)
        start = clock(device)
        try:
            with evaluation_mode(model, planner):
                generate_and_score(model, tokenizer, batches, subset, s["new_tokens"], bench.autocast, engine)
            error = None
        except Exception as err:      # recorded; the next engine still runs
            error = f"{type(err).__name__}: {str(err)[:300]}"
            traceback.print_exc()
        seconds = clock(device) - start
        row = {"label": label, "engine": engine, "problems": len(subset), "batch_size": batch_size,
               "seconds": seconds, "new_tokens_per_s": len(subset) * s["new_tokens"] / seconds if not error else None,
               "seconds_for_1319": seconds * GSM8K_TEST / len(subset) if not error else None,
               "peak_gib": peak_gib(device), "error": error}
        out["runs"].append(row)
        print(f"eval {label}: {row['problems']} problems in {seconds:.1f} s"
              + (f" ({row['new_tokens_per_s']:,.0f} new tokens/s)" if not error else f" FAILED {error}"), flush=True)
        write(record)

    timed("merged", "merged", problems, e.batch_size)
    timed("static, first (compiles)", "static", problems, e.batch_size)
    timed("static, again", "static", problems, e.batch_size)
    timed("generate (today's), one batch", "generate", problems[:s["generate_problems"]], 256)
    reset_peak(device)
    start = clock(device)
    with evaluation_mode(model, planner):
        mean_answer_loss(planner.token_loss, loss_batches(fmt, problems, e.batch_size), bench.autocast)
    out["teacher_forced_loss_s"] = clock(device) - start
    print(f"eval teacher-forced loss: {out['teacher_forced_loss_s']:.1f} s", flush=True)


# ----------------------------------------------------------------------------------------------------
# Part 3: the plain stack (no project code), as the project's anchor measured it
# ----------------------------------------------------------------------------------------------------
def anchor(s: dict, device: torch.device, record: dict) -> None:
    """transformers + PEFT, nothing of this project: a model of the shape built from its config, LoRA r=64 on the
    seven projections, AdamW, bf16 weights and autocast (fp32 in the CPU rehearsal), the model's own loss over full
    logits; random tokens."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen3Config
    shape = s["anchor_shape"]
    cfg = Qwen3Config(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"],
                      max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(cfg, dtype=s["anchor_dtype"])
    model = get_peft_model(base, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, betas=(0.9, 0.98),
                            weight_decay=0.01)
    out = record.setdefault("anchor", {"train": [], "generate": None, "dtype": str(s["anchor_dtype"])})
    bf16 = s["anchor_dtype"] == torch.bfloat16
    for micro, accum, seq, ckpt in s["anchor_train"]:
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        else:
            model.gradient_checkpointing_disable()
        model.train()
        x = torch.randint(0, cfg.vocab_size, (micro, seq), device=device)
        reset_peak(device)
        times = []
        try:
            for _ in range(s["anchor_steps"] + 1):
                start = clock(device)
                for _ in range(accum):
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        loss = model(input_ids=x, labels=x).loss / accum
                    loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                times.append(clock(device) - start)
            step = sorted(times[1:])[len(times[1:]) // 2]
            row = {"micro": micro, "accum": accum, "seq": seq, "ckpt": ckpt, "step_s_median": step,
                   "tokens_per_s": micro * accum * seq / step, "peak_gib": peak_gib(device)}
        except torch.OutOfMemoryError:
            row = {"micro": micro, "accum": accum, "seq": seq, "ckpt": ckpt, "oom": True}
            opt.zero_grad(set_to_none=True)
            free(device)
        out["train"].append(row)
        print(f"anchor train {row}", flush=True)
        write(record)
    model.gradient_checkpointing_disable()
    model.eval()
    batch, prompt_len, new = s["anchor_generate"]
    prompt = torch.randint(0, cfg.vocab_size, (batch, prompt_len), device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        model.generate(input_ids=prompt[:, :16], attention_mask=torch.ones_like(prompt[:, :16]), max_new_tokens=4,
                       do_sample=False, pad_token_id=0)
        start = clock(device)
        generated = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                   min_new_tokens=new, do_sample=False, pad_token_id=0)
        seconds = clock(device) - start
    tokens = (generated.shape[1] - prompt_len) * batch
    out["generate"] = {"batch": batch, "prompt_tokens": prompt_len, "new_tokens": new, "seconds": seconds,
                       "new_tokens_per_s": tokens / seconds, "seconds_for_1319": seconds * GSM8K_TEST / batch}
    print(f"anchor generate {out['generate']}", flush=True)
    del model, base, opt
    free(device)


# ----------------------------------------------------------------------------------------------------
# The record
# ----------------------------------------------------------------------------------------------------
RECORD_PATH: Path | None = None


def write(record: dict) -> None:
    RECORD_PATH.parent.mkdir(parents=True, exist_ok=True)
    RECORD_PATH.write_text(json.dumps(record, indent=2, default=str) + "\n")


def versions() -> dict:
    import peft
    import transformers
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "commit": commit}


def main() -> None:
    global RECORD_PATH
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / ".cache" / "qwen3-0.6b-shape"),
                        help="Qwen3-0.6B-shaped model folder (written when missing)")
    parser.add_argument("--results-root", default=str(REPO / "bench" / "results"))
    parser.add_argument("--parts", default="loop,eval,anchor")
    parser.add_argument("--tiny", action="store_true", help="a CPU rehearsal: embedded model, few steps and problems")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compiled layers (eager: a quick CPU rehearsal)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if not args.tiny and device.type != "cuda":
        sys.exit("no CUDA device: run with --tiny for the CPU rehearsal")
    s = settings(args)
    # a run of some parts only gets a name of its own (a lent machine may run the parts in separate calls)
    name = "gpu_bench" + (".tiny" if args.tiny else "") + \
        ("" if parts == {"loop", "eval", "anchor"} else "." + "-".join(sorted(parts))) + ".json"
    RECORD_PATH = Path(args.results_root) / gpu_slug(device) / name
    record = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
              or platform.machine(), "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M"),
              "tiny": args.tiny, "compile_backend": args.compile_backend, **versions(), "errors": {}}
    print(json.dumps(record), flush=True)
    started = time.perf_counter()
    if not args.tiny and not (Path(args.model) / "config.json").is_file():
        write_qwen3_shape(Path(args.model))
    kept = None
    if "loop" in parts or "eval" in parts:
        for layout, overrides, keep in (("seed", s["seed_layout"], False), ("gpu-fast", s["fast_layout"], True)):
            if layout == "seed" and "loop" not in parts:
                continue
            try:
                kept = loop_layout(layout, overrides, s, record, keep, args.compile_backend) or kept
            except Exception as err:
                record["errors"][f"loop {layout}"] = f"{type(err).__name__}: {str(err)[:500]}"
                traceback.print_exc()
            write(record)
    if "eval" in parts and kept is not None:
        try:
            evaluation(*kept, s, record)
        except Exception as err:
            record["errors"]["eval"] = f"{type(err).__name__}: {str(err)[:500]}"
            traceback.print_exc()
        write(record)
    if kept is not None:
        kept[1].token_loss.close()
        kept = None
        free(device)
    if "anchor" in parts:
        try:
            anchor(s, device, record)
        except Exception as err:
            record["errors"]["anchor"] = f"{type(err).__name__}: {str(err)[:500]}"
            traceback.print_exc()
    record["total_s"] = time.perf_counter() - started
    write(record)
    print(f"wrote {RECORD_PATH} ({record['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
