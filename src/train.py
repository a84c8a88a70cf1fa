"""The training loop: LoRA fine-tuning under a wall-clock budget, with the LR from a planner.

Sections
  1. Metric names (shared with evaluate.py, which reads them back from W&B)
  2. The budget clock
  3. Tracking: Weights & Biases online, offline, or disabled
  4. Energy and memory
  5. Evaluation: batched greedy generation and exact match
  6. Checkpoints: resume after a crash
  7. One optimiser step
  8. The run: set-up, the loop, the budget check, evaluations, the summary

The budget B (`training.budget_minutes`) is wall-clock.  The clock starts when the model, data and planner are
ready (start-up, imports, model and data loading, and W&B start-up are not counted) and counts every training
step, every evaluation (including the one at step 0 and the final one), the planner's own work, logging and
checkpoints.  Training stops at the last step boundary from which one more step plus the final evaluation
would not fit in B; the final evaluation then ends at about B: "dev EM at B" is the EM of the model as it is
when B runs out.  On a GPU every clock reading is synchronised.

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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from src.model import (PLANNERS, StepContext, TokenBatch, TokenLoss, adapter_graph, answer_positions, build_model,
                       frequent_tokens, quiet_libraries)
from src.preprocess import (PromptFormat, TrainStream, UserError, generation_batches, load_problems, percent,
                            problem_set_digest, read_jsonl_problems, score_completions)

# ----------------------------------------------------------------------------------------------------
# 1. Metric names
# ----------------------------------------------------------------------------------------------------
# History (every step): train/*, time/*, memory/*, energy/*, planner/*.  History (every evaluation): eval/*.
LOSS, LR, GRAD_NORM, TOKENS_PER_S = "train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"
STEP_TIME, SKIPPED, EPOCH = "train/step_time_s", "train/skipped_steps", "train/epoch"
PLANNER_TIME, PLANNER_FRACTION = "train/planner_time_s", "train/planner_fraction"   # the planner's own cost
ELAPSED, BUDGET_LEFT = "time/elapsed_s", "time/budget_left"
EM, EM_FLEX = "eval/exact_match", "eval/exact_match_flexible"          # strict (primary) and flexible, percent
EVAL_AT, EVAL_DURATION = "eval/model_time_s", "eval/duration_s"          # clock time of the evaluated model
EVAL_PROBLEMS = "eval/problems"                                          # problems in this evaluation
CONTAM_EM, CONTAM_EM_FLEX = "contamination/exact_match", "contamination/exact_match_flexible"
ENERGY, PEAK_MEM = "energy/joules", "memory/peak_gib"
# Summary (final values)
FINAL_EM, FINAL_EM_FLEX = "final/exact_match", "final/exact_match_flexible"
BEST_EM, AUC = "best/exact_match", "final/auc_em_over_b"
FINAL_CORRECT, PROBLEM_DIGEST = "final/correct_strict", "final/problem_digest"


def em_at_mark(minutes: int) -> str:
    return f"final/em_at_{minutes}min"


# ----------------------------------------------------------------------------------------------------
# 2. The budget clock
# ----------------------------------------------------------------------------------------------------
class BudgetClock:
    """Wall-clock seconds spent from the budget; `spent_s` carries time spent before a resume."""

    def __init__(self, budget_s: float, device: torch.device, spent_s: float = 0.0):
        self.budget_s, self.device, self.spent_s = budget_s, device, spent_s
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)   # CUDA is asynchronous: count the work, not its launch
        return self.spent_s + time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()


def auc_over_budget(points: list[tuple[float, float]], budget_s: float) -> float:
    """(1/B)∫_0^B EM(t) dt, EM linear between evaluations (t = clock time of the evaluated model) and held at its
    last value until B.  Percent."""
    if not points:
        return math.nan
    pts = sorted(points)
    area, (t_prev, e_prev) = pts[0][0] * pts[0][1], pts[0]
    for t, e in pts[1:]:
        area += (t - t_prev) * (e + e_prev) / 2
        t_prev, e_prev = t, e
    area += max(budget_s - t_prev, 0.0) * e_prev
    return area / budget_s


# ----------------------------------------------------------------------------------------------------
# 3. Tracking
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
        if again:
            print(f"W&B: recorded again the {len(again)} logged steps held by the checkpoint (steps {again[0]} to "
                  f"{again[-1]})")

    def log(self, metrics: dict, step: int) -> None:
        row = {k: v for k, v in metrics.items() if v is not None and not _is_nan(v)}
        self.rows.setdefault(step, {}).update(row)
        if self.run is not None and step >= self.first_step:
            self.run.log(row, step=step)

    def summary(self, values: dict) -> None:
        if self.run is not None:
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
# 4. Energy and memory
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
# 5. Evaluation
# ----------------------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    strict: list[bool]
    flexible: list[bool]
    duration_s: float

    @property
    def em(self) -> float:
        return percent(self.strict)

    @property
    def em_flexible(self) -> float:
        return percent(self.flexible)


@torch.no_grad()
def evaluate(peft_model, tokenizer, batches, problems, planner, max_new_tokens: int, autocast,
             clock: BudgetClock) -> EvalResult:
    """Greedy completions for every problem, in length-sorted batches (least padding), scored strict and flexible.

    Generation stops at the end-of-sequence token or `max_new_tokens`.  Its time is spent from the budget."""
    from transformers import GenerationConfig
    start = clock.elapsed()
    planner.on_eval(True)
    peft_model.eval()
    gen = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, use_cache=True)
    completions = [""] * len(problems)
    device = next(peft_model.parameters()).device
    try:
        for positions, ids, attn in batches:
            with autocast():
                out = peft_model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                                          generation_config=gen)
            texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
            for pos, text in zip(positions, texts):
                completions[pos] = text
    finally:
        peft_model.train()
        planner.on_eval(False)
    strict, flexible = score_completions(completions, problems)
    return EvalResult(strict, flexible, clock.elapsed() - start)


# ----------------------------------------------------------------------------------------------------
# 6. Checkpoints
# ----------------------------------------------------------------------------------------------------
def checkpoint_path(results_dir: Path, run_id: str) -> Path:
    return results_dir / run_id / "checkpoint.pt"


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: write a temporary file, then rename, so a crash never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


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
# 7. One optimiser step
# ----------------------------------------------------------------------------------------------------
@dataclass
class StepResult:
    ok: bool
    loss: float
    grad_norm: float
    eta: float
    tokens: int
    planner_s: float = 0.0     # time inside the planner's calls (its overhead)


class Stopwatch:
    """Accumulates the time spent inside `with watch:` blocks (synchronised on a GPU)."""

    def __init__(self, device: torch.device):
        self.device, self.total = device, 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def __enter__(self):
        self._t0 = self._now()

    def __exit__(self, *exc):
        self.total += self._now() - self._t0


def fault_steps() -> set[int]:
    """Steps whose loss is replaced by NaN (GRAFF_FAULT_NAN_STEPS="5,6"): fault injection for tests."""
    text = os.environ.get("GRAFF_FAULT_NAN_STEPS", "")
    return {int(s) for s in text.split(",") if s.strip()}


def optimiser_step(lm: TokenLoss, planner, optimizer, params, micro_batches, device, autocast, clip: float,
                   ctx: StepContext, clock: BudgetClock, inject_nan: bool) -> StepResult:
    """Forward/backward every micro-batch (one backward each), ask the planner for η_t, clip, step."""
    n_total = sum(mb.n_answer_tokens for mb in micro_batches)      # the loss is the mean over the whole step
    loss_sum = torch.zeros((), device=device)
    watch = Stopwatch(device)
    for index, raw in enumerate(micro_batches):
        mb = raw.to(device)
        with autocast():
            losses = lm(mb.input_ids, mb.attention_mask, mb.answer_mask)          # (n,) fp32
        if inject_nan:
            losses = losses * float("nan")
        with watch:   # the probe and the token weights are the planner's cost
            tokens = TokenBatch(mb, mb.input_ids[:, 1:][mb.answer_mask[:, 1:]], losses.detach(),
                                answer_positions(mb.answer_mask), lm.probe_entropy(mb.answer_mask), index)
            weights = planner.weigh_tokens(tokens)                                  # m_{t,i} or None
        weighted = (losses * weights).sum() if weights is not None else losses.sum()
        (weighted / n_total).backward()
        loss_sum += losses.detach().sum()
    loss = float(loss_sum) / max(n_total, 1)
    grads = [p.grad for p in params if p.grad is not None]
    grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    n_tokens = sum(mb.n_tokens for mb in micro_batches)
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        planner.on_bad_step()
        return StepResult(False, loss, grad_norm, math.nan, n_tokens)
    ctx.loss, ctx.grad_norm, ctx.elapsed_s = loss, grad_norm, clock.elapsed()
    with watch:
        eta = planner.plan(ctx)                                                     # η_t (may update the planner)
    if not (math.isfinite(eta) and eta > 0):
        raise RuntimeError(f"planner {type(planner).__name__} returned η={eta} (must be finite and > 0)")
    if clip > 0:
        ctx.grad_scale = min(1.0, clip / (grad_norm + 1e-6))
        torch.nn.utils.clip_grads_with_norm_(grads, clip, torch.tensor(grad_norm))
    for group in optimizer.param_groups:
        group["lr"] = eta
    optimizer.step()
    with watch:
        planner.after_step(ctx)
    optimizer.zero_grad(set_to_none=True)
    return StepResult(True, loss, grad_norm, eta, n_tokens, watch.total)


# ----------------------------------------------------------------------------------------------------
# 8. The run
# ----------------------------------------------------------------------------------------------------
@dataclass
class RunOutcome:
    final_em: float                 # strict dev EM (percent) at the budget
    steps: int
    status: str                     # finished | already_finished | stopped_nonfinite
    history: list[tuple[int, float, float]] = field(default_factory=list)   # (step, model time, EM)


class NonFiniteTraining(UserError):
    """Persistent non-finite losses: the run stops with a clear message."""


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


def train(cfg, on_evaluation=None, search_info: dict | None = None) -> RunOutcome:
    """One full training run as configured.  `on_evaluation(step, model_time_s, em)` is called after every
    evaluation (Optuna uses it to prune); it may raise to stop the run.  `search_info` (the Optuna study behind
    this run's values) goes into the W&B summary."""
    quiet_libraries()
    results_dir = Path(cfg.results_dir)
    t_cfg, e_cfg = cfg.training, cfg.evaluation
    ckpt_path = checkpoint_path(results_dir, cfg.run_id)
    resume = torch.load(ckpt_path, map_location="cpu", weights_only=False) \
        if cfg.checkpointing.enabled and ckpt_path.is_file() else None
    if resume is not None and resume["finished"]:
        print(f"{cfg.run_id}: already finished (checkpoint {ckpt_path}); delete it to train again")
        return RunOutcome(resume["final_em"], resume["step"], "already_finished")

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = pick_device(t_cfg.device)
    autocast = make_autocast(device, t_cfg.mixed_precision)

    # -- model, data, planner --------------------------------------------------------------------------
    loaded = build_model(cfg.model, t_cfg.gradient_checkpointing, device)
    print(f"model: {loaded.source} | {loaded.n_params / 1e6:,.1f} M parameters, {loaded.n_trainable / 1e6:,.2f} M "
          f"trainable (LoRA r={cfg.model.lora.r}) | device {device}")
    lm = TokenLoss(loaded.peft)
    fmt = PromptFormat(loaded.tokenizer)
    stream = TrainStream(cfg.dataset, fmt, t_cfg.micro_batch_size, cfg.dataset.max_tokens, cfg.seed,
                         t_cfg.max_epochs)
    dev = load_problems(cfg.dataset, cfg.dataset.eval_split, e_cfg.max_problems)
    contamination = read_jsonl_problems(Path(cfg.dataset.contamination_path), "dataset.contamination_path") \
        if cfg.dataset.contamination_path else None
    dev_batches = generation_batches(fmt, dev, e_cfg.batch_size, cfg.dataset.max_tokens)
    # Periodic evaluations (and the one at step 0) may use a fixed random subset, to spend less of the budget on
    # evaluation; the evaluations at the marks and at the end always use the whole dev split.
    subset = sorted(random.Random(0).sample(range(len(dev)), e_cfg.periodic_problems)) \
        if e_cfg.periodic_problems and e_cfg.periodic_problems < len(dev) else list(range(len(dev)))
    periodic_dev = [dev[i] for i in subset]
    periodic_batches = generation_batches(fmt, periodic_dev, e_cfg.batch_size, cfg.dataset.max_tokens) \
        if len(subset) < len(dev) else dev_batches
    contam_batches = generation_batches(fmt, contamination, e_cfg.batch_size, cfg.dataset.max_tokens) \
        if contamination else None
    params = [p for p in loaded.peft.parameters() if p.requires_grad]
    graph = adapter_graph(loaded.peft)
    sched = cfg.training.scheduler
    planner_cls = PLANNERS[sched.type]
    knobs = OmegaConf.masked_copy(sched, list(planner_cls.knobs)) if planner_cls.knobs else OmegaConf.create({})
    planner = planner_cls(knobs, t_cfg.optimizer, lm, params, graph, results_dir=results_dir,
                          trial=cfg.mode == "trial")
    for note in planner.notes:
        print(note)
    optimizer = planner.make_optimizer()
    if planner.uses_probe:
        sample = TrainStream(cfg.dataset, fmt, t_cfg.micro_batch_size, cfg.dataset.max_tokens, cfg.seed, 1)
        first = [b for b in (sample.next() for _ in range(16)) if b is not None]
        lm.probe_ids = frequent_tokens(first, t_cfg.probe_vocab).to(device)
    print(f"data: {cfg.dataset.name} | dev {len(dev)} problems"
          + (f" | contamination set {len(contamination)}" if contamination else "")
          + f" | planner {sched.type} | nodes {graph.n_nodes}")

    # -- resume ------------------------------------------------------------------------------------------
    step, skipped, consecutive_bad = 0, 0, 0
    eval_points: list[tuple[int, float, float]] = []      # (step, model time, strict EM)
    marks_done: dict[int, float] = {}
    spent = 0.0
    if resume is not None:
        with torch.no_grad():
            for p, saved in zip(params, resume["params"]):
                p.copy_(saved)
        optimizer.load_state_dict(resume["optimizer"])
        planner.load_state_dict(resume["planner"])
        stream.skip_to(resume["data"])
        set_rng_state(resume["rng"])
        step, skipped = resume["step"], resume["skipped"]
        eval_points, marks_done, spent = resume["eval_points"], resume["marks"], resume["spent_s"]
        print(f"resuming {cfg.run_id} at step {step} with {spent:.1f} s of the budget already spent")

    tracker = Tracker(cfg, results_dir)
    tracker.start(OmegaConf.to_container(cfg, resolve=True), history=(resume or {}).get("history"))
    tracker.summary({"model/parameters": loaded.n_params, "model/trainable_parameters": loaded.n_trainable,
                     "budget/minutes": float(t_cfg.budget_minutes), "eval/n_problems": len(dev),
                     PROBLEM_DIGEST: problem_set_digest(dev), "data/device": str(device), **(search_info or {})})
    energy = EnergyMeter(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if energy.source == "none":
        tracker.summary({"energy/available": False})

    stream.prime()
    budget_s = 60.0 * t_cfg.budget_minutes
    clock = BudgetClock(budget_s, device, spent_s=spent)
    step_est = 0.0
    eval_rate = (resume or {}).get("eval_rate", 0.0)      # longest evaluation time per problem so far (s)
    eval_est = eval_rate * len(dev)                       # the final evaluation's reserve
    last_ckpt = clock.elapsed()
    last_print = -math.inf
    inject = fault_steps()
    planner_total = train_total = 0.0
    status = "finished"
    evals_enabled = cfg.mode == "full"

    def run_eval(kind: str) -> EvalResult:
        nonlocal eval_rate, eval_est
        full = kind not in ("start", "periodic")
        problems, batches = (dev, dev_batches) if full else (periodic_dev, periodic_batches)
        model_time = clock.elapsed()
        result = evaluate(loaded.peft, loaded.tokenizer, batches, problems, planner, e_cfg.max_new_tokens,
                          autocast, clock)
        eval_rate = max(eval_rate, result.duration_s / len(problems))
        eval_est = eval_rate * len(dev)
        eval_points.append((step, model_time, result.em))
        tracker.log({EM: result.em, EM_FLEX: result.em_flexible, EVAL_AT: model_time, EVAL_PROBLEMS: len(problems),
                     EVAL_DURATION: result.duration_s, ELAPSED: clock.elapsed()}, step=step)
        print(f"eval ({kind}) step {step} | {model_time:7.1f}s | EM strict {result.em:5.1f}% flexible "
              f"{result.em_flexible:5.1f}% | {result.duration_s:.1f}s")
        if on_evaluation is not None:
            on_evaluation(step, model_time, result.em)
        return result

    if resume is None and evals_enabled and e_cfg.at_start:
        run_eval("start")

    # -- the loop ----------------------------------------------------------------------------------------
    exhausted = False
    while True:
        # The budget check: stop when one more step and the final evaluation would not fit in B.
        elapsed = clock.elapsed()
        if step >= t_cfg.total_steps or exhausted:
            break
        if step > 0 and elapsed + step_est + eval_est > budget_s:
            break
        micro = [stream.next() for _ in range(t_cfg.gradient_accumulation_steps)]
        if any(mb is None for mb in micro):   # max_epochs reached
            exhausted = True
            break
        t0 = clock.elapsed()
        ctx = StepContext(step=step, elapsed_s=t0, budget_s=budget_s, horizon_s=max(budget_s - eval_est, 1e-9))
        result = optimiser_step(lm, planner, optimizer, params, micro, device, autocast, t_cfg.clip_grad_norm, ctx,
                                clock, step in inject)
        t1 = clock.elapsed()
        duration = t1 - t0
        step_est = duration if step_est == 0 else 0.8 * step_est + 0.2 * duration
        if not result.ok:
            skipped += 1
            consecutive_bad += 1
            print(f"step {step}: non-finite loss or gradient (loss {result.loss}, grad norm {result.grad_norm}); "
                  f"update skipped ({skipped} so far)")
            tracker.log({SKIPPED: skipped, ELAPSED: t1, BUDGET_LEFT: max(budget_s - t1, 0) / budget_s},
                        step=step)
            if consecutive_bad >= t_cfg.max_bad_steps:
                status = "stopped_nonfinite"
                break
            step += 1
            continue
        consecutive_bad = 0
        step += 1
        planner_total += result.planner_s
        train_total += duration
        metrics = {LOSS: result.loss, LR: result.eta, GRAD_NORM: result.grad_norm,
                   TOKENS_PER_S: result.tokens / max(duration, 1e-9), STEP_TIME: duration, SKIPPED: skipped,
                   PLANNER_TIME: result.planner_s, PLANNER_FRACTION: result.planner_s / max(duration, 1e-9),
                   ELAPSED: t1, BUDGET_LEFT: max(budget_s - t1, 0) / budget_s, EPOCH: stream.epoch,
                   "data/skipped_bad_rows": stream.skipped_bad, "data/skipped_long_rows": stream.skipped_long,
                   PEAK_MEM: peak_memory_gib(device)[0], ENERGY: energy.joules()}
        metrics.update({f"planner/{k}": v for k, v in planner.log().items()})
        tracker.log(metrics, step=step)
        if t1 - last_print >= 10 or step == 1:
            last_print = t1
            print(f"step {step:5d} | {t1:7.1f}/{budget_s:.0f}s | loss {result.loss:.4f} | lr {result.eta:.2e} | "
                  f"{metrics[TOKENS_PER_S]:,.0f} tok/s", flush=True)
        # Evaluations: periodic, and at each mark (minutes) inside the budget so that it ends by the mark.
        if evals_enabled:
            now = clock.elapsed()
            fits = now + eval_rate * len(periodic_dev) + step_est + eval_est <= budget_s
            for mark in e_cfg.marks_minutes:
                if mark not in marks_done and 60 * mark < budget_s and now + step_est + eval_est >= 60 * mark:
                    marks_done[mark] = run_eval(f"{mark} min mark").em
                    fits = False
            if fits and e_cfg.interval_steps > 0 and step % e_cfg.interval_steps == 0:
                run_eval("periodic")
        if cfg.checkpointing.enabled and clock.elapsed() - last_ckpt >= 60 * cfg.checkpointing.interval_minutes:
            save_checkpoint(ckpt_path, dict(finished=False, **_ckpt_state(params, optimizer, planner, stream, step,
                                                                          skipped, eval_points, marks_done, clock,
                                                                          eval_rate), history=tracker.rows))
            last_ckpt = clock.elapsed()

    if status == "stopped_nonfinite":
        tracker.summary({"status": status, "train/steps": step, SKIPPED: skipped})
        tracker.finish(exit_code=1)
        energy.stop()
        raise NonFiniteTraining(f"{cfg.run_id}: {consecutive_bad} consecutive steps had a non-finite loss or "
                                f"gradient (last at step {step}); lower training.optimizer.lr_init or check the "
                                f"data, then re-run")

    # -- the final evaluation and the summary ------------------------------------------------------------
    final = run_eval("final")
    final_time = clock.elapsed()
    summary = {FINAL_EM: final.em, FINAL_EM_FLEX: final.em_flexible, "final/elapsed_s": final_time,
               "final/model_time_s": eval_points[-1][1], BEST_EM: max(e for _, _, e in eval_points),
               AUC: auc_over_budget([(t, e) for _, t, e in eval_points], budget_s), "train/steps": step,
               SKIPPED: skipped, FINAL_CORRECT: "".join("1" if c else "0" for c in final.strict),
               "status": status, "data/epochs_completed": stream.epoch, ENERGY: energy.joules(),
               PEAK_MEM: peak_memory_gib(device)[0], "memory/kind": peak_memory_gib(device)[1],
               "energy/source": energy.source,
               PLANNER_FRACTION: planner_total / train_total if train_total > 0 else None}
    for mark in e_cfg.marks_minutes:
        if 60 * mark < budget_s and mark in marks_done:
            summary[em_at_mark(mark)] = marks_done[mark]
        elif abs(60 * mark - budget_s) < 1e-6:
            summary[em_at_mark(mark)] = final.em
    if contam_batches is not None:
        contam = evaluate(loaded.peft, loaded.tokenizer, contam_batches, contamination, planner,
                          e_cfg.max_new_tokens, autocast, clock)
        summary.update({CONTAM_EM: contam.em, CONTAM_EM_FLEX: contam.em_flexible,
                        "contamination/n_problems": len(contamination)})
        print(f"contamination set: EM strict {contam.em:.1f}% flexible {contam.em_flexible:.1f}% "
              f"(after the budget; not counted in it)")
    tracker.summary(summary)
    planner.finish(results_dir)
    if cfg.checkpointing.enabled:
        save_checkpoint(ckpt_path, dict(finished=True, final_em=final.em, step=step))
    tracker.finish()
    energy.stop()
    print(f"done: {step} steps in {final_time:.1f}s of a {budget_s:.0f}s budget | final dev EM strict "
          f"{final.em:.2f}% flexible {final.em_flexible:.2f}% ({len(dev)} problems)")
    return RunOutcome(final.em, step, status, eval_points)


def _ckpt_state(params, optimizer, planner, stream, step, skipped, eval_points, marks, clock, eval_rate) -> dict:
    return {"params": [p.detach().cpu().clone() for p in params], "optimizer": optimizer.state_dict(),
            "planner": planner.state_dict(), "data": stream.state(), "rng": rng_state(), "step": step,
            "skipped": skipped, "eval_points": eval_points, "marks": marks, "spent_s": clock.elapsed(),
            "eval_rate": eval_rate}
