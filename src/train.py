"""The training run: LoRA fine-tuning under a budget, with the learning rate from a planner.

Metric names and the AUC come from src/evaluate.py (defined once there; it reads them back from W&B).

Sections
  1. The budget: B, its clock, the step-time estimate, the final evaluation's reserve, the marks
  2. Tracking: Weights & Biases online, offline, or disabled
  3. Energy and memory
  4. Evaluation: batched greedy generation and exact match
  5. Checkpoints: resume after a crash, refused across experiments
  6. One optimiser step
  7. The recipe: setup -> train (the loop) -> evaluate / checkpoint -> summarise; train(cfg) runs it

The budget B (`training.budget_minutes`) is wall-clock.  The clock starts when the model, data and planner are
ready (start-up, imports, model and data loading, and W&B start-up are not counted) and counts every training
step, every evaluation (including the one at step 0 and the final one), the planner's own work, logging and
checkpoints.  Training stops at the last step boundary from which one more step plus the final evaluation
would not fit in B; the final evaluation then ends at about B: "dev EM at B" is the EM of the model as it is
when B runs out.  On a GPU every clock reading is synchronised.  With `training.budget_steps` the budget is a
number of optimiser steps instead (evaluations then cost nothing): the step-matched control and the planner's
pre-training episodes.

train.py writes no results files: W&B (online, or its offline record under results_dir) is the only store.
"""
from __future__ import annotations

import math
import os
import random
import resource
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from src.evaluate import (AUC, BEST_EM, BUDGET_LEFT, BUDGET_MINUTES, BUDGET_STEPS, BUDGET_UNIT, CONTAM_EM,
                          CONTAM_EM_FLEX, CONTAM_PROBLEMS, DATA_DEVICE, DATA_EPOCHS, DATA_SKIPPED_BAD,
                          DATA_SKIPPED_LONG, DATA_SKIPPED_VALIDATION, ELAPSED, EM, EM_FLEX, ENERGY, ENERGY_AVAILABLE, ENERGY_SOURCE, EPOCH,
                          EVAL_AT, EVAL_DURATION, EVAL_LOSS, EVAL_N_PROBLEMS, EVAL_PROBLEMS, EVAL_SPLIT, FINAL_CORRECT,
                          FINAL_ELAPSED, FINAL_EM, FINAL_EM_FLEX, FINAL_LOSS, FINAL_MODEL_TIME, GRAD_NORM, LOSS, LR,
                          MEAN_STEP_TIME, MEMORY_KIND, MODEL_PARAMS, MODEL_TRAINABLE, PEAK_MEM, PLANNER_FRACTION,
                          PLANNER_PREFIX, PLANNER_TIME, PROBLEM_DIGEST, SKIPPED, SPEED_PROBE, STATUS, STEP_TIME, STEPS,
                          TOKENS_PER_S, auc_over_budget, em_at_mark)
from src.model import StepContext, TokenBatch, answer_positions, build_model, build_planner, quiet_libraries
from src.preprocess import (STOP_STRINGS, MicroBatch, PromptFormat, TrainStream, UserError, collate, generation_batches,
                            load_problems, percent, problem_set_digest, read_jsonl_problems, score_completions)

# ----------------------------------------------------------------------------------------------------
# 1. The budget
# ----------------------------------------------------------------------------------------------------
EVAL_MARGIN = 1.1   # the final evaluation's reserve: 10% above its worst rate so far


class Budget:
    """B and the questions the loop asks about it.

    Units: seconds of wall-clock (`unit="seconds"`: everything counts, evaluations included) or optimiser steps
    (`unit="steps"`: each step is one unit, evaluations are free).  It owns the clock (read at step boundaries
    and around evaluations; synchronised on a GPU), the step-time estimate (an EMA of step durations), the reserve
    for the final evaluation (EVAL_MARGIN × the longest evaluation time per problem so far × its problems)
    and the marks (wall-clock minutes at which the whole dev split is evaluated).

    Stopping rule: a step may start while spent + step estimate + reserve ≤ B (the first step always may), so
    the final evaluation ends at about B.  Planners see b_t = (B − spent)/B and progress = spent / horizon, with
    horizon = B − reserve (the time training may use)."""

    def __init__(self, limit: float, unit: str = "seconds", device: torch.device | None = None,
                 final_problems: int = 0, marks_minutes=(), state: dict | None = None):
        self.limit, self.unit, self.device = float(limit), unit, device
        self.final_problems, self.marks_minutes = final_problems, list(marks_minutes)
        state = state or {}
        self.spent_before = float(state.get("spent", 0.0))   # spent by earlier processes (a resume)
        self.eval_rate = float(state.get("eval_rate", 0.0))  # longest evaluation time per problem so far
        self.marks_done: dict[int, float] = dict(state.get("marks_done", {}))   # mark (min) -> EM there
        self.step_estimate = 0.0
        self.steps_done = 0                                  # optimiser steps counted by a step budget
        self._t0 = time.perf_counter()
        self.last = self.now()                               # the latest clock reading

    # -- the clock ------------------------------------------------------------------------------------------
    def now(self) -> float:
        """Budget spent so far: seconds (synchronised on a GPU: count the work, not its launch) or steps."""
        if self.unit == "steps":
            return self.spent_before + self.steps_done
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self.spent_before + time.perf_counter() - self._t0

    def end_step(self, started: float) -> float:
        """After an optimiser step that started at `started`: one clock reading; updates the step estimate."""
        self.steps_done += 1
        self.last = self.now()
        duration = self.last - started
        self.step_estimate = duration if self.step_estimate == 0 else 0.8 * self.step_estimate + 0.2 * duration
        return duration

    def record_evaluation(self, duration: float, problems: int) -> None:
        """An evaluation took `duration`: the final evaluation's reserve grows to its worst rate so far."""
        if self.unit == "seconds" and problems:
            self.eval_rate = max(self.eval_rate, duration / problems)
        self.last = self.now()

    # -- the questions the loop asks ---------------------------------------------------------------------------
    @property
    def reserve(self) -> float:
        """The final evaluation's expected time, with EVAL_MARGIN: the same evaluation varies by several percent
        from one run to the next on a loaded machine, and the final one is the only one that must fit."""
        return EVAL_MARGIN * self.eval_rate * self.final_problems if self.unit == "seconds" else 0.0

    @property
    def horizon(self) -> float:
        """What training may use: B less the final evaluation's reserve."""
        return max(self.limit - self.reserve, 1e-9)

    def can_step(self) -> bool:
        """Whether one more step and the final evaluation still fit in B (the first step always may)."""
        return self.steps_done == 0 or self.last + self.step_estimate + self.reserve <= self.limit

    def fraction_left(self, spent: float | None = None) -> float:
        """b_t = (B − spent)/B in [0, 1]."""
        spent = self.last if spent is None else spent
        return min(max((self.limit - spent) / self.limit, 0.0), 1.0)

    def progress(self, spent: float | None = None) -> float:
        """Fraction of the training horizon spent, in [0, 1] (what time-based schedules decay over)."""
        spent = self.last if spent is None else spent
        return min(max(spent / self.horizon, 0.0), 1.0)

    def steps_left(self, spent: float | None = None) -> float:
        """Optimiser steps the rest of the horizon is expected to hold."""
        spent = self.last if spent is None else spent
        per_step = 1.0 if self.unit == "steps" else self.step_estimate
        return max(self.horizon - spent, 0.0) / per_step if per_step > 0 else 0.0

    def mark_due(self) -> int | None:
        """A wall-clock mark inside B whose evaluation must start now to end by it, or None."""
        if self.unit != "seconds":
            return None
        for mark in self.marks_minutes:
            if mark not in self.marks_done and 60 * mark < self.limit and \
                    self.last + self.step_estimate + self.reserve >= 60 * mark:
                return mark
        return None

    def periodic_fits(self, problems: int) -> bool:
        """Whether a periodic evaluation of `problems` still leaves room for a step and the final evaluation."""
        cost = self.eval_rate * problems if self.unit == "seconds" else 0.0
        return self.last + cost + self.step_estimate + self.reserve <= self.limit

    def state_dict(self) -> dict:
        return {"spent": self.last, "eval_rate": self.eval_rate, "marks_done": dict(self.marks_done)}


# ----------------------------------------------------------------------------------------------------
# 2. Tracking
# ----------------------------------------------------------------------------------------------------
def wandb_key_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].split("/")[0]
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class Tracker:
    """W&B run: `online` when a key and the network are there, else `offline` under results_dir (said on stdout),
    or `disabled` (trial mode, Optuna trials).  Offline records are synced later with `wandb sync <dir>`."""

    def __init__(self, cfg, results_dir: Path):
        self.cfg, self.results_dir = cfg, results_dir
        self.run = None
        self.mode = cfg.wandb.mode
        # Every row logged so far, {step: {metric: value}}.  It goes into each checkpoint, because a process killed
        # with SIGKILL loses the rows W&B had not yet written to disk (seen: the last few seconds before the kill,
        # from before the checkpoint too); the resumed process records them again (`start(history=...)`).
        self.rows: dict[int, dict] = {}
        self.pending = False                    # a step's row is held by W&B, not yet written (see summary)
        self.first_step = 0          # lowest step the W&B run accepts (an online run resumed on the server: higher)

    def start(self, config: dict, history: dict[int, dict] | None = None) -> None:
        """Open the W&B run.  `history` (a resume) is the checkpoint's rows: they are recorded again first, so the
        resumed record is complete up to the checkpoint whatever the killed process managed to write."""
        self.rows = {s: dict(r) for s, r in (history or {}).items()}
        if self.mode == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb
        self.results_dir.mkdir(parents=True, exist_ok=True)
        mode = self.mode
        if mode == "online" and not wandb_key_available():
            print("W&B: no API key (WANDB_API_KEY or ~/.netrc): logging offline instead")
            mode = "offline"
        kwargs = dict(entity=self.cfg.wandb.entity, project=self.cfg.wandb.project, id=self.cfg.run_id,
                      name=self.cfg.run_id, group=self.cfg.run_id.split("-seed")[0], resume="allow", config=config,
                      dir=str(self.results_dir))
        settings = dict(console="off", init_timeout=float(self.cfg.wandb.init_timeout_s), silent=True)
        if mode == "online":
            # finish() waits at most finish_timeout_s for the upload (by default it retries for as long as the server
            # is away, so a run whose server went down mid-run would never end); the record on disk stays complete
            online = dict(settings, finish_timeout=float(self.cfg.wandb.finish_timeout_s), finish_timeout_raises=True)
            try:
                self.run = wandb.init(mode="online", settings=wandb.Settings(**online), **kwargs)
            except Exception as err:   # unreachable server, bad key: the run goes on offline
                first = (str(err).splitlines() or [type(err).__name__])[0]
                print(f"W&B: online start failed ({first[:160]}): logging offline instead")
                wandb.teardown()         # release the half-started run's id so the offline run can take it
                mode = "offline"
        if mode == "offline":
            self.run = wandb.init(mode="offline", settings=wandb.Settings(**settings), **kwargs)
            folder = Path(self.run.settings.sync_dir)
            print(f"W&B: offline run {self.cfg.run_id}, record in {folder}; upload later with: wandb sync {folder}")
        else:
            print(f"W&B: online run {self.run.url}")
        self.mode = mode
        # An online run resumed on the server continues from the server's last step and W&B drops lower steps with
        # a warning, so only the rows it lacks are sent; an offline record is a new file, so it gets them all.
        self.first_step = self.run.starting_step if mode == "online" else 0
        if self.first_step > max(self.rows, default=-1) + 1:
            print(f"W&B: the online run {self.cfg.run_id} already holds steps up to {self.first_step - 1} from an "
                  f"earlier process; steps up to there are not sent again (delete that W&B run to record them anew)")
        again = [s for s in sorted(self.rows) if s >= self.first_step]
        for s in again:
            self.run.log(self.rows[s], step=s)
            self.pending = True
        if again:
            print(f"W&B: recorded again the {len(again)} logged steps held by the checkpoint (steps {again[0]} to "
                  f"{again[-1]})")

    def log(self, metrics: dict, step: int) -> None:
        row = {k: v for k, v in metrics.items() if v is not None and not _is_nan(v)}
        self.rows.setdefault(step, {}).update(row)
        if self.run is not None and step >= self.first_step:
            self.run.log(row, step=step)
            self.pending = True

    def summary(self, values: dict) -> None:
        if self.run is not None:
            if self.pending:
                # W&B holds the last step's row until a later step or finish(), and writing it then sets the summary
                # to its values: a run-level value under the same key (train/planner_fraction) would be lost
                self.run.log({}, commit=True)
                self.pending = False
            for k, v in values.items():
                if v is not None and not _is_nan(v):
                    self.run.summary[k] = v

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            import wandb
            folder = Path(self.run.settings.sync_dir)
            try:
                self.run.finish(exit_code=exit_code)
            except TimeoutError:   # online, and the server did not take the data in time (it went away mid-run)
                print(f"W&B: the server did not take all of the run's data within wandb.finish_timeout_s="
                      f"{self.cfg.wandb.finish_timeout_s:g} s; nothing is lost, the record on disk is complete: "
                      f"upload it when the server is back with: wandb sync --no-skip-online {folder}")
            # finish() can return before the record file is complete (seen with wandb 0.31 offline); shutting the
            # service down waits for it, so whatever reads the record next (evaluate, a test) sees all of it
            wandb.teardown()
            self.run = None


def _is_nan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


# ----------------------------------------------------------------------------------------------------
# 3. Energy and memory
# ----------------------------------------------------------------------------------------------------
class EnergyMeter:
    """Joules used by the GPU since start: NVML's energy counter, or power sampled every 5 s (trapezoid) where the
    counter is missing.  On a CPU there is no meter: `joules()` is None and the run says so (never 0)."""

    def __init__(self, device: torch.device, sample_s: float = 5.0):
        self.source, self._handle, self._start_mj = "none", None, None
        self._energy_j, self._stop = 0.0, threading.Event()
        if device.type != "cuda":
            return
        try:
            import pynvml
            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._pynvml = pynvml
        except Exception:
            return
        try:
            self._start_mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
            self.source = "nvml_energy_counter"
        except Exception:
            self.source = "nvml_power_sampling"
            self._thread = threading.Thread(target=self._sample, args=(sample_s,), daemon=True)
            self._thread.start()

    def _sample(self, every: float) -> None:
        last_t, last_w = time.perf_counter(), self._power()
        while not self._stop.wait(every):
            now, watts = time.perf_counter(), self._power()
            self._energy_j += (now - last_t) * (watts + last_w) / 2
            last_t, last_w = now, watts

    def _power(self) -> float:
        try:
            return self._pynvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0
        except Exception:
            return 0.0

    def joules(self) -> float | None:
        if self.source == "nvml_energy_counter":
            return (self._pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) - self._start_mj) / 1000.0
        if self.source == "nvml_power_sampling":
            return self._energy_j
        return None

    def stop(self) -> None:
        self._stop.set()


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, "process_max_rss"


# ----------------------------------------------------------------------------------------------------
# 4. Evaluation
# ----------------------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    strict: list[bool]
    flexible: list[bool]
    duration_s: float
    loss: float = math.nan          # teacher-forced mean answer-token loss on the same problems

    @property
    def em(self) -> float:
        return percent(self.strict)

    @property
    def em_flexible(self) -> float:
        return percent(self.flexible)


@contextmanager
def evaluation_mode(model, planner):
    """The model in eval mode (no dropout) and the planner told (Schedule-Free swaps its averaged weights in)."""
    planner.on_eval(True)
    model.eval()
    try:
        yield
    finally:
        model.train()
        planner.on_eval(False)


# How the greedy completions are computed (evaluation.engine).  All three give the same completions: the same greedy
# decoding by transformers' `generate`, stopping at the same strings (tests/test_speed.py compares them string for
# string on the embedded model); they differ in speed.
#   generate  the PEFT model as it trains: every adapted projection runs its base weight and its two LoRA factors
#             (three matrix products and peft's Python per projection and decoding step); the KV cache grows as it
#             decodes (DynamicCache)
#   merged    LoRA merged into the base weights for the evaluation (merged_lora: one matrix product per projection,
#             the base weights restored bit for bit afterwards); otherwise as `generate`
#   static    merged, with a static KV cache sized once for every batch (StaticCache, max_cache_len): on a GPU
#             transformers then compiles the decoding step (torch.compile with CUDA graphs, at the first evaluation,
#             inside the budget) and decoding stops being bound by Python; on the CPU the same code runs uncompiled
# With random weights (nothing stops early) the Qwen3-0.6B shape's evaluation of 1,319 problems × 256 new tokens
# is measured per engine by bench/gpu_bench.py.
EVAL_ENGINES = ("generate", "merged", "static")
STATIC_CACHE_STEP = 128     # the static cache's length is rounded up to this, so that few lengths are ever compiled


@contextmanager
def merged_lora(model):
    """LoRA merged into the base weights inside the block; the base weights bit-identical after it.

    peft's unmerge subtracts the delta it added, which in floating point does not give back the same bits (in bf16
    least of all), and training would then go on from slightly different weights after every evaluation.  So the
    adapted layers' base weights are copied first, and after peft's unmerge (which also resets its merged state)
    the copies are written back.  The copy costs device memory once per evaluation (Qwen3-0.6B's adapted
    projections in bf16: about 0.9 GB).  Works on any model with peft's LoRA layers injected (a PeftModel or its
    base model)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    saved = [(p, p.detach().clone()) for m in layers for p in m.get_base_layer().parameters()]
    try:
        for layer in layers:
            layer.merge()
        yield
    finally:
        for layer in layers:
            if layer.merged:
                layer.unmerge()
        with torch.no_grad():
            for p, copy in saved:
                p.copy_(copy)


@torch.no_grad()
def generate_and_score(peft_model, tokenizer, batches, problems, max_new_tokens: int, autocast,
                       engine: str = "generate") -> tuple[list, list]:
    """Greedy completions for every problem, in length-sorted batches (least padding), scored strict and flexible.
    Generation stops at the end-of-sequence token, at lm-evaluation-harness's GSM8K stop strings or after
    `max_new_tokens`; scoring cuts each completion at the first stop string, as the harness does.  `engine` is one
    of EVAL_ENGINES."""
    from transformers import GenerationConfig
    if engine not in EVAL_ENGINES:
        raise UserError(f"evaluation.engine={engine} is not an engine: use one of {', '.join(EVAL_ENGINES)}")
    gen = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, use_cache=True, stop_strings=list(STOP_STRINGS))
    rows = 0
    if engine == "static":
        # One shape for every batch of this evaluation, so that the compiled decoding step is compiled once: one
        # cache length (transformers also keeps the longest it has seen for later evaluations) and one batch size
        # (a smaller last batch is padded with copies of its last prompt, whose completions are dropped).
        widest = max((ids.shape[1] for _, ids, _ in batches), default=1)
        rows = max((ids.shape[0] for _, ids, _ in batches), default=0)
        gen.cache_implementation = "static"
        gen.max_cache_len = math.ceil((widest + max_new_tokens) / STATIC_CACHE_STEP) * STATIC_CACHE_STEP
    completions = [""] * len(problems)
    device = next(peft_model.parameters()).device
    # Decoder layers compiled for training (training.compile_layers) run eagerly here, except under the static
    # engine on a GPU, where transformers compiles the whole decoding step around them: called with a growing KV
    # cache they would be compiled again for every new length.
    eager = engine != "static" or device.type != "cuda"
    with (merged_lora(peft_model) if engine != "generate" else nullcontext()), \
            (torch.compiler.set_stance("force_eager") if eager else nullcontext()):
        for positions, ids, attn in batches:
            if ids.shape[0] < rows:
                ids, attn = (torch.cat([t, t[-1:].expand(rows - t.shape[0], -1)]) for t in (ids, attn))
            with autocast():
                out = peft_model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                                          generation_config=gen, tokenizer=tokenizer)
            texts = tokenizer.batch_decode(out[:len(positions), ids.shape[1]:], skip_special_tokens=True)
            for pos, text in zip(positions, texts):
                completions[pos] = text
    return score_completions(completions, problems)


def loss_batches(fmt: PromptFormat, problems, batch_size: int) -> list:
    """The problems with their reference solutions as padded batches, for the teacher-forced loss."""
    examples = fmt.encode_examples(problems)
    return [collate(examples[i:i + batch_size], fmt.tokenizer.pad_token_id) for i in range(0, len(examples), batch_size)]


@torch.no_grad()
def mean_answer_loss(token_loss, batches, autocast) -> float:
    """Teacher-forced mean loss over the answer tokens of `batches` (the loss at B, a lower-variance metric).

    Decoder layers compiled for training (training.compile_layers) run eagerly here: in eval mode without gradients
    they would be compiled once more, inside the budget, for a forward pass of seconds that a run makes a few
    times (in the CPU rehearsal of bench/gpu_bench.py that compilation made this loss take 98 s)."""
    total, count = 0.0, 0
    with torch.compiler.set_stance("force_eager"):
        for mb in batches:
            mb = mb.to(next(token_loss.parameters()).device)
            with autocast(), token_loss.no_probe():
                losses = token_loss(mb.input_ids, mb.attention_mask, mb.answer_mask, checkpoint_head=False)
            total += float(losses.double().sum())
            count += losses.numel()
    return total / max(count, 1)


# ----------------------------------------------------------------------------------------------------
# 5. Checkpoints
# ----------------------------------------------------------------------------------------------------
# Keys that do not change what a run trains or how it is measured: a resume may differ in these.
NOT_SHAPING = ("run", "mode", "results_dir", "wandb", "optuna", "checkpointing", "trial")


def fingerprint(cfg) -> dict[str, object]:
    """The configuration that shapes training, flattened: a checkpoint from another experiment is refused."""
    flat: dict[str, object] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix.rstrip(".")] = node

    walk({k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in NOT_SHAPING}, "")
    return flat


def checkpoint_path(results_dir: Path, run_id: str) -> Path:
    return results_dir / run_id / "checkpoint.pt"


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: write a temporary file, then rename, so a crash never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, cfg) -> dict | None:
    """The run's checkpoint, or None.  Refused with one line when unreadable or made by another configuration."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        assert isinstance(state, dict) and "finished" in state
    except Exception:
        raise UserError(f"checkpoint {path} is unreadable (truncated or corrupted): delete it to start the run over")
    saved = state.get("fingerprint")
    if saved is not None:
        now = fingerprint(cfg)
        differ = sorted(k for k in set(saved) | set(now) if saved.get(k, "<absent>") != now.get(k, "<absent>"))
        if differ:
            shown = ", ".join(f"{k} ({saved.get(k, '<absent>')} -> {now.get(k, '<absent>')})" for k in differ[:4])
            more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
            raise UserError(f"checkpoint {path} belongs to another configuration ({shown}{more}): use another "
                            f"results_dir, or delete the checkpoint to start this run over")
    return state


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------
# 6. One optimiser step
# ----------------------------------------------------------------------------------------------------
class Stopwatch:
    """Accumulates the time spent inside `with watch:` blocks (the planner's share of a step).

    On a GPU each block is bracketed by two CUDA events recorded on the stream: the device's time between them, with
    no host wait (a `synchronize` around every block would stall the host each time and let the device run dry).
    `total` reads the events; read after the loop's clock has synchronised (Budget.end_step), it waits for nothing.
    Work of the planner that the device overlaps with the model's costs nothing this way, as it costs the run nothing.
    On the CPU it is the wall clock."""

    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"
        self._seconds = 0.0                 # the CPU's blocks
        self._events: list = []             # the GPU's blocks: (start, end) events

    def __enter__(self):
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._events.append([start, None])
        else:
            self._t0 = time.perf_counter()

    def __exit__(self, *exc):
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events[-1][1] = end
        else:
            self._seconds += time.perf_counter() - self._t0

    @property
    def total(self) -> float:
        """Seconds inside the blocks so far."""
        if not self.cuda:
            return self._seconds
        if self._events:
            self._events[-1][1].synchronize()    # the last block done, so are the others (one stream)
        return sum(start.elapsed_time(end) for start, end in self._events) / 1000.0


@dataclass
class StepResult:
    ok: bool
    loss: float
    grad_norm: float
    eta: float
    tokens: int
    watch: Stopwatch | None = field(default=None, repr=False)    # the planner's calls

    @property
    def planner_s(self) -> float:
        """Time inside the planner's calls (its overhead), in seconds; read lazily (see Stopwatch.total)."""
        return self.watch.total if self.watch is not None else 0.0


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor copied to `device` without making the host wait for the device: through pinned (page-locked)
    memory, asynchronously (a copy from ordinary memory waits for the stream).  On the CPU: the tensor itself."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def optimiser_step(planner, micro_batches, device, autocast, clip: float, ctx: StepContext) -> StepResult:
    """Forward/backward every micro-batch (one backward each), ask the planner for η_t, clip, step.

    The step reads from the device once: the loss and the gradient norm, together, after the last backward (the
    finite check and the planner need them as numbers).  Until then the host only queues work: the micro-batches
    are copied asynchronously, the answer tokens' ids and relative positions are computed on the host from the CPU
    batch, the losses are summed on the device and clipping uses the norm on the device.  Synchronisations inside
    the model's forward or inside a planner are theirs (bench/gpu_bench.py counts them on a GPU)."""
    token_loss, optimizer, params = planner.token_loss, planner.optimizer, planner.params
    n_total = sum(mb.n_answer_tokens for mb in micro_batches)      # the loss is the mean over the whole step
    loss_sum = torch.zeros((), device=device)
    watch = Stopwatch(device)
    probe = planner.needs_probe(ctx.step)
    for index, raw in enumerate(micro_batches):
        mb = MicroBatch(*(to_device(t, device) for t in (raw.input_ids, raw.attention_mask, raw.answer_mask)))
        targets = to_device(raw.input_ids[:, 1:][raw.answer_mask[:, 1:]], device)
        positions = to_device(answer_positions(raw.answer_mask), device)
        with autocast(), (nullcontext() if probe else token_loss.no_probe()):
            losses = token_loss(mb.input_ids, mb.attention_mask, mb.answer_mask)    # (n,) fp32
        with watch:   # the probe and the token weights are the planner's cost
            tokens = TokenBatch(mb, targets, losses.detach(), positions, token_loss.probe_entropy(mb.answer_mask),
                                index, ctx.step)
            weights = planner.weigh_tokens(tokens)                                  # m_{t,i} or None
        weighted = (losses * weights).sum() if weights is not None else losses.sum()
        (weighted / n_total).backward()
        loss_sum += losses.detach().sum()
    with_grad = [p for p in params if p.grad is not None]
    grads = [p.grad for p in with_grad]
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=device)
    loss_total, grad_norm = torch.stack([loss_sum, norm.to(loss_sum.dtype)]).tolist()   # the step's one read
    loss = loss_total / max(n_total, 1)
    n_tokens = sum(mb.n_tokens for mb in micro_batches)
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        planner.on_bad_step()
        return StepResult(False, loss, grad_norm, math.nan, n_tokens)
    ctx.loss, ctx.grad_norm = loss, grad_norm
    with watch:
        eta = planner.plan(ctx)                                                     # η_t (may update the planner)
    if not (math.isfinite(eta) and eta > 0):
        raise RuntimeError(f"planner {type(planner).__name__} returned η={eta} (must be finite and > 0)")
    if clip > 0:
        ctx.grad_scale = min(1.0, clip / (grad_norm + 1e-6))
        torch.nn.utils.clip_grads_with_norm_(with_grad, clip, norm)   # takes the parameters (scales their .grad)
    for group in optimizer.param_groups:
        group["lr"] = eta
    optimizer.step()
    with watch:
        planner.after_step(ctx)
    optimizer.zero_grad(set_to_none=True)
    return StepResult(True, loss, grad_norm, eta, n_tokens, watch)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("training.device=cuda but no CUDA device is visible: use training.device=auto or cpu")
    return torch.device(name)


def make_autocast(device: torch.device, mixed_precision: str):
    if mixed_precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return lambda: torch.autocast(device_type=device.type, enabled=False)


def speed_probe(device: torch.device) -> float:
    """Seconds of a short fixed compute workload (matrix products), run before the budget starts: recorded with
    every run so that a slower machine (or a busy one) is visible next to its results."""
    size, reps = (2048, 20) if device.type == "cuda" else (384, 20)
    a = torch.randn(size, size, device=device, generator=torch.Generator(device=device).manual_seed(0))
    start = time.perf_counter()
    for _ in range(reps):
        a = torch.tanh(a @ a / size)
    float(a.sum())
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------
# 7. The recipe
# ----------------------------------------------------------------------------------------------------
@dataclass
class RunOutcome:
    final_em: float                 # strict EM (percent) at the budget, on the evaluated split
    steps: int
    status: str                     # finished | already_finished | stopped_nonfinite
    history: list[tuple[int, float, float]] = field(default_factory=list)   # (step, model time, EM)
    activity: dict[str, int] = field(default_factory=dict)                   # the planner's learning paths run


class NonFiniteTraining(UserError):
    """Persistent non-finite losses: the run stops with a clear message."""


class Recipe:
    """One run, in the order it happens: `setup` (model, data, planner, resume, tracking), `train` (the loop),
    `evaluate`, `checkpoint`, `summarise`.  `state_dict` is everything a resume needs.

    `on_evaluation(step, model_time, em)` is called after every evaluation (Optuna prunes with it; it may raise);
    `search_info` (the study behind this run's values) goes into the W&B summary."""

    def __init__(self, cfg, on_evaluation=None, search_info: dict | None = None):
        self.cfg, self.on_evaluation, self.search_info = cfg, on_evaluation, search_info or {}
        self.t, self.e = cfg.training, cfg.evaluation
        self.results_dir = Path(cfg.results_dir)
        self.ckpt_path = checkpoint_path(self.results_dir, cfg.run_id)
        self.step = self.skipped = self.bad_in_a_row = self.episode = 0
        self.eval_points: list[tuple[int, float, float]] = []     # (step, model time, strict EM)
        self.planner_s = self.train_s = 0.0                       # the planner's time, the steps' time
        self.evals_enabled = cfg.mode == "full"

    # -- setup ------------------------------------------------------------------------------------------------
    def setup(self) -> dict | None:
        """Build everything; returns the checkpoint when the run already finished (then nothing is built)."""
        cfg, t, e = self.cfg, self.t, self.e
        quiet_libraries()
        resume = load_checkpoint(self.ckpt_path, cfg) if cfg.checkpointing.enabled else None
        if resume is not None and resume["finished"]:
            return resume
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.device = pick_device(t.device)
        self.autocast = make_autocast(self.device, t.mixed_precision)
        loaded = build_model(cfg.model, t.gradient_checkpointing, self.device, t.compile_layers)
        self.model, self.tokenizer = loaded.peft, loaded.tokenizer
        print(f"model: {loaded.source} | {loaded.n_params / 1e6:,.1f} M parameters, {loaded.n_trainable / 1e6:,.2f} "
              f"M trainable (LoRA r={cfg.model.lora.r}) | device {self.device}")
        fmt = PromptFormat(loaded.tokenizer)
        self.stream = TrainStream(cfg.dataset, fmt, t.micro_batch_size, cfg.dataset.max_tokens, cfg.seed, t.max_epochs)
        split = cfg.dataset.eval_split if e.split == "test" else "validation"     # a search's trials: validation
        self.dev = load_problems(cfg.dataset, split, e.max_problems)
        self.contamination = read_jsonl_problems(Path(cfg.dataset.contamination_path), "dataset.contamination_path") \
            if cfg.dataset.contamination_path else None
        self.dev_batches = generation_batches(fmt, self.dev, e.batch_size, cfg.dataset.max_tokens)
        # Periodic evaluations (and the one at step 0) may use a fixed random subset, to spend less of the budget
        # on evaluation; the evaluations at the marks and at the end always use the whole dev split.
        subset = sorted(random.Random(0).sample(range(len(self.dev)), e.periodic_problems)) \
            if e.periodic_problems and e.periodic_problems < len(self.dev) else list(range(len(self.dev)))
        self.periodic_dev = [self.dev[i] for i in subset]
        self.periodic_batches = generation_batches(fmt, self.periodic_dev, e.batch_size, cfg.dataset.max_tokens) \
            if len(subset) < len(self.dev) else self.dev_batches
        self.contam_batches = generation_batches(fmt, self.contamination, e.batch_size, cfg.dataset.max_tokens) \
            if self.contamination else None
        self.loss_batches = {"whole": loss_batches(fmt, self.dev, e.batch_size),     # teacher-forced, per evaluation
                             "subset": loss_batches(fmt, self.periodic_dev, e.batch_size)}
        probe_sample = TrainStream(cfg.dataset, fmt, t.micro_batch_size, cfg.dataset.max_tokens, cfg.seed, 1)
        first = [b for b in (probe_sample.next() for _ in range(16)) if b is not None]
        self.planner = build_planner(self.model, t, results_dir=self.results_dir, trial=cfg.mode == "trial",
                                     probe_batches=first)
        self.initial_params = [p.detach().clone() for p in self.planner.params]   # each episode starts here
        for note in self.planner.notes:
            print(note)
        print(f"data: {cfg.dataset.name} | dev {len(self.dev)} problems"
              + (f" | contamination set {len(self.contamination)}" if self.contamination else "")
              + f" | planner {t.scheduler.type} | nodes {self.planner.graph.n_nodes}")
        if resume is not None:
            self.load_state_dict(resume)
            print(f"resuming {cfg.run_id} at step {self.step} with {resume['budget']['spent']:.1f} "
                  f"{'s' if t.budget_steps is None else 'steps'} of the budget already spent")
        self.stream.prime()
        if self.stream.empty:
            raise UserError(f"dataset {cfg.dataset.name} split '{cfg.dataset.train_split}' has no usable training row "
                            f"({self.stream.skipped_bad} malformed, {self.stream.skipped_long} longer than "
                            f"dataset.max_tokens={cfg.dataset.max_tokens}); fix the data or raise max_tokens")
        self.tracker = Tracker(cfg, self.results_dir)
        self.tracker.start(OmegaConf.to_container(cfg, resolve=True), history=(resume or {}).get("history"))
        self.energy = EnergyMeter(self.device)
        probe_s = speed_probe(self.device)
        self.tracker.summary({MODEL_PARAMS: loaded.n_params, MODEL_TRAINABLE: loaded.n_trainable,
                              BUDGET_MINUTES: float(t.budget_minutes), EVAL_N_PROBLEMS: len(self.dev),
                              BUDGET_UNIT: "steps" if t.budget_steps else "minutes", BUDGET_STEPS: t.budget_steps,
                              SPEED_PROBE: probe_s, EVAL_SPLIT: e.split,
                              PROBLEM_DIGEST: problem_set_digest(self.dev), DATA_DEVICE: str(self.device),
                              **self.search_info})
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.energy.source == "none":
            self.tracker.summary({ENERGY_AVAILABLE: False})
        limit, unit = (t.budget_steps, "steps") if t.budget_steps else (60.0 * t.budget_minutes, "seconds")
        self.budget = Budget(limit, unit, self.device, len(self.dev), e.marks_minutes, (resume or {}).get("budget"))
        self.last_ckpt = self.budget.last
        return None

    # -- the loop ---------------------------------------------------------------------------------------------
    def train(self) -> RunOutcome:
        """Optimiser steps until the budget, the step cap or the data runs out; then the final evaluation.
        With `training.episodes` > 1 (the planner's pre-training) the budget is run through that many times, each
        time from fresh adapters and optimiser state, while the planner keeps what it learned."""
        if self.step == 0 and self.evals_enabled and self.e.at_start:
            self.evaluate("start")
        while True:
            outcome = self.train_episode()
            if outcome is not None:
                return outcome
            if self.episode + 1 >= self.t.episodes:
                break
            self.start_episode(self.episode + 1)
        final = self.evaluate("final")
        return self.summarise(final)

    def train_episode(self) -> RunOutcome | None:
        """The loop of one budget.  Returns a RunOutcome only when the run stops early (non-finite losses)."""
        t, budget = self.t, self.budget
        first = self.step
        while self.step - first < t.total_steps and budget.can_step():
            micro = [self.stream.next() for _ in range(t.gradient_accumulation_steps)]
            if any(mb is None for mb in micro):                     # max_epochs reached
                break
            started = budget.last
            ctx = StepContext(step=self.step, elapsed=started, budget_left=budget.fraction_left(),
                              progress=budget.progress(), steps_left=budget.steps_left())
            result = optimiser_step(self.planner, micro, self.device, self.autocast, t.clip_grad_norm, ctx)
            duration = budget.end_step(started)
            self.step += 1
            self.log_step(result, duration)
            if self.bad_in_a_row >= t.max_bad_steps:
                self.stop_nonfinite()
            if self.evals_enabled:
                mark = budget.mark_due()
                if mark is not None:
                    budget.marks_done[mark] = self.evaluate(f"{mark} min mark").em
                elif self.e.interval_steps > 0 and self.step % self.e.interval_steps == 0 and \
                        budget.periodic_fits(len(self.periodic_dev)):
                    self.evaluate("periodic")
            if self.cfg.checkpointing.enabled and \
                    budget.last - self.last_ckpt >= 60 * self.cfg.checkpointing.interval_minutes:
                self.checkpoint()
        return None

    def start_episode(self, episode: int) -> None:
        """A new budget from b = 1 on fresh adapters and optimiser state; the planner forgets the run it was
        planning but keeps what it learned (the planner's pre-training: docs/method.md, warm start)."""
        self.episode = episode
        with torch.no_grad():
            for p, initial in zip(self.planner.params, self.initial_params):
                p.copy_(initial)
        self.planner.make_optimizer()
        self.planner.start_episode()
        self.budget = Budget(self.budget.limit, self.budget.unit, self.device, len(self.dev), self.e.marks_minutes,
                             {"spent": 0.0, "eval_rate": self.budget.eval_rate})
        print(f"episode {episode + 1}/{self.t.episodes}: a new budget of {self.budget.limit:g} "
              f"{'steps' if self.budget.unit == 'steps' else 's'} on fresh adapters")

    def log_step(self, result: StepResult, duration: float) -> None:
        """One W&B row per attempted step (a skipped one too: no hole, nothing overwritten)."""
        budget, now = self.budget, self.budget.last
        row = {ELAPSED: now, BUDGET_LEFT: budget.fraction_left(), SKIPPED: self.skipped}
        if not result.ok:
            self.skipped += 1
            self.bad_in_a_row += 1
            row[SKIPPED] = self.skipped
            print(f"step {self.step}: non-finite loss or gradient (loss {result.loss}, grad norm {result.grad_norm}); "
                  f"update skipped ({self.skipped} so far)")
            self.tracker.log(row, step=self.step)
            return
        self.bad_in_a_row = 0
        self.planner_s += result.planner_s
        self.train_s += duration
        row.update({LOSS: result.loss, LR: result.eta, GRAD_NORM: result.grad_norm,
                    TOKENS_PER_S: result.tokens / max(duration, 1e-9), STEP_TIME: duration,
                    PLANNER_TIME: result.planner_s, PLANNER_FRACTION: result.planner_s / max(duration, 1e-9),
                    EPOCH: self.stream.epoch, DATA_SKIPPED_BAD: self.stream.skipped_bad,
                    DATA_SKIPPED_LONG: self.stream.skipped_long,
                    DATA_SKIPPED_VALIDATION: self.stream.skipped_validation, PEAK_MEM: peak_memory_gib(self.device)[0],
                    ENERGY: self.energy.joules()})
        row.update({f"{PLANNER_PREFIX}{k}": v for k, v in self.planner.log().items()})
        self.tracker.log(row, step=self.step)
        if now - getattr(self, "_last_print", -math.inf) >= (10 if budget.unit == "seconds" else 50) or self.step == 1:
            self._last_print = now
            unit = "s" if budget.unit == "seconds" else " steps"
            print(f"step {self.step:5d} | {now:7.1f}/{budget.limit:.0f}{unit} | loss {result.loss:.4f} | "
                  f"lr {result.eta:.2e} | {row[TOKENS_PER_S]:,.0f} tok/s", flush=True)

    # -- evaluation -------------------------------------------------------------------------------------------
    def evaluate(self, kind: str) -> EvalResult:
        """Greedy generation and exact match on the dev split (the whole of it at the marks and at the end, the
        fixed subset at step 0 and periodically), and the teacher-forced answer loss on the same problems.  Its
        time is spent from the budget."""
        whole = kind not in ("start", "periodic")
        problems, batches = (self.dev, self.dev_batches) if whole else (self.periodic_dev, self.periodic_batches)
        model_time, started = self.budget.now(), time.perf_counter()
        with evaluation_mode(self.model, self.planner):
            strict, flexible = generate_and_score(self.model, self.tokenizer, batches, problems,
                                                  self.e.max_new_tokens, self.autocast, self.e.engine)
            loss = mean_answer_loss(self.planner.token_loss, self.loss_batches["whole" if whole else "subset"],
                                    self.autocast)
        self.budget.record_evaluation(self.budget.now() - model_time, len(problems))   # in the budget's units
        result = EvalResult(strict, flexible, time.perf_counter() - started, loss)      # wall-clock seconds
        self.eval_points.append((self.step, model_time, result.em))
        self.tracker.log({EM: result.em, EM_FLEX: result.em_flexible, EVAL_AT: model_time,
                          EVAL_PROBLEMS: len(problems), EVAL_DURATION: result.duration_s, ELAPSED: self.budget.last,
                          EVAL_LOSS: loss}, step=self.step)
        print(f"eval ({kind}) step {self.step} | {model_time:7.1f} | EM strict {result.em:5.1f}% flexible "
              f"{result.em_flexible:5.1f}% | {result.duration_s:.1f}s" + f" | loss {loss:.4f}")
        if self.on_evaluation is not None:
            self.on_evaluation(self.step, model_time, result.em)
        return result

    # -- checkpoints ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"finished": False, "fingerprint": fingerprint(self.cfg),
                "params": [p.detach().cpu().clone() for p in self.planner.params],
                "optimizer": self.planner.optimizer.state_dict(), "planner": self.planner.state_dict(),
                "data": self.stream.state(), "rng": rng_state(), "step": self.step, "skipped": self.skipped,
                "eval_points": self.eval_points, "budget": self.budget.state_dict(), "history": self.tracker.rows,
                "episode": self.episode}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for p, saved in zip(self.planner.params, state["params"]):
                p.copy_(saved)
        self.planner.optimizer.load_state_dict(state["optimizer"])
        self.planner.load_state_dict(state["planner"])
        self.stream.skip_to(state["data"])
        set_rng_state(state["rng"])
        self.step, self.skipped, self.eval_points = state["step"], state["skipped"], state["eval_points"]
        self.episode = state["episode"]

    def checkpoint(self) -> None:
        save_checkpoint(self.ckpt_path, self.state_dict())
        self.last_ckpt = self.budget.last

    # -- the end ----------------------------------------------------------------------------------------------
    def stop_nonfinite(self):
        self.tracker.summary({STATUS: "stopped_nonfinite", STEPS: self.step, SKIPPED: self.skipped})
        self.tracker.finish(exit_code=1)
        self.energy.stop()
        raise NonFiniteTraining(f"{self.cfg.run_id}: {self.bad_in_a_row} consecutive steps had a non-finite loss or "
                                f"gradient (last at step {self.step}); lower training.optimizer.lr_init or check "
                                f"the data, then re-run")

    def summarise(self, final: EvalResult) -> RunOutcome:
        """The W&B summary (final and best values, marks, AUC, energy, memory), the contamination check (after the
        budget, not counted in it), the planner's own end (its pre-training checkpoint) and the last checkpoint."""
        budget, limit = self.budget, self.budget.limit
        summary = {FINAL_EM: final.em, FINAL_EM_FLEX: final.em_flexible, FINAL_LOSS: final.loss,
                   FINAL_ELAPSED: budget.last, FINAL_MODEL_TIME: self.eval_points[-1][1],
                   BEST_EM: max(e for _, _, e in self.eval_points),
                   AUC: auc_over_budget([(t, e) for _, t, e in self.eval_points], limit), STEPS: self.step,
                   MEAN_STEP_TIME: self.train_s / max(self.step - self.skipped, 1), SKIPPED: self.skipped,
                   FINAL_CORRECT: "".join("1" if c else "0" for c in final.strict), STATUS: "finished",
                   DATA_EPOCHS: self.stream.epoch, ENERGY: self.energy.joules(),
                   PEAK_MEM: peak_memory_gib(self.device)[0], MEMORY_KIND: peak_memory_gib(self.device)[1],
                   ENERGY_SOURCE: self.energy.source,
                   PLANNER_FRACTION: self.planner_s / self.train_s if self.train_s > 0 else None,
                   **{f"{PLANNER_PREFIX}activity/{k}": v for k, v in self.planner.activity.items()}}
        for mark in self.e.marks_minutes:
            if budget.unit != "seconds":
                continue
            if 60 * mark < limit and mark in budget.marks_done:
                summary[em_at_mark(mark)] = budget.marks_done[mark]
            elif abs(60 * mark - limit) < 1e-6:
                summary[em_at_mark(mark)] = final.em
        if self.contam_batches is not None:
            with evaluation_mode(self.model, self.planner):
                strict, flexible = generate_and_score(self.model, self.tokenizer, self.contam_batches,
                                                      self.contamination, self.e.max_new_tokens, self.autocast,
                                                      self.e.engine)
            summary.update({CONTAM_EM: percent(strict), CONTAM_EM_FLEX: percent(flexible),
                            CONTAM_PROBLEMS: len(self.contamination)})
            print(f"contamination set: EM strict {percent(strict):.1f}% flexible {percent(flexible):.1f}% "
                  f"(after the budget; not counted in it)")
        self.tracker.summary(summary)
        self.planner.finish(self.results_dir)
        if self.cfg.checkpointing.enabled:
            save_checkpoint(self.ckpt_path, {"finished": True, "fingerprint": fingerprint(self.cfg),
                                             "final_em": final.em, "step": self.step})
        self.tracker.finish()
        self.energy.stop()
        if self.planner.activity:
            print("planner learning paths run: " + ", ".join(f"{k} {v}" for k, v in self.planner.activity.items()))
        unit = "s" if budget.unit == "seconds" else " steps"
        print(f"done: {self.step} steps in {budget.last:.1f}{unit} of a {limit:.0f}{unit} budget | final dev EM "
              f"strict {final.em:.2f}% flexible {final.em_flexible:.2f}% ({len(self.dev)} problems)")
        return RunOutcome(final.em, self.step, "finished", self.eval_points, dict(self.planner.activity))


def train(cfg, on_evaluation=None, search_info: dict | None = None) -> RunOutcome:
    """One full training run as configured (see Recipe)."""
    recipe = Recipe(cfg, on_evaluation, search_info)
    finished = recipe.setup()
    if finished is not None:
        print(f"{cfg.run_id}: already finished (checkpoint {recipe.ckpt_path}); delete it to train again")
        return RunOutcome(finished["final_em"], finished["step"], "already_finished")
    return recipe.train()
