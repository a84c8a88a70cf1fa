"""Models, probes and learning-rate planners.

Sections
  1. The planner contract: StepContext, TokenBatch, Planner, the registry and build_planner (the training loop
     talks to every method through these; it has no per-method branch)
  2. Building models: the embedded tiny Qwen3, hub and local checkpoints, LoRA
  3. The adapter graph: one node per adapter block, edges within and between layers
  4. The forward pass: per-token answer losses (chunked LM head) and the first-layer entropy probe
  5. Shared estimators: per-block dot products and the curvature along the update
  6. Time-based schedules and Schedule-Free AdamW
  7. SALeLR, BATS, REACTOR (baselines this project defines: docs/method.md)
  8. GRAFF (the proposed method: docs/method.md)

Notation (docs/method.md): t optimiser step, θ_t trainable (adapter) parameters, g_t = ∇L_t(θ_t), u_t the optimiser's
update direction (θ_{t+1} = θ_t − η_t·u_t), η_t the learning rate, b_t = (B − elapsed)/B the budget left,
λ̂ curvature along the update, h_t the planner's latent node states, W its linear decoder, m_{t,i} token
multipliers, R_T the compute-normalised regret.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from src.preprocess import CACHE_DIR, MicroBatch, UserError, hub_offline, route_warnings_to_stdout, synthetic_corpus

LORA_TARGETS_HELP = "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"


def quiet_libraries() -> None:
    """Keep stderr for real errors: the pipeline fails a run on any error text there.  Libraries'
    deprecation notices are dropped; any other warning is printed as one line on stdout."""
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(peft|transformers|torch)\..*")
    route_warnings_to_stdout()


# ----------------------------------------------------------------------------------------------------
# 1. The planner contract
# ----------------------------------------------------------------------------------------------------
@dataclass
class StepContext:
    """What the loop tells a planner about optimiser step t.  Budget quantities come from the run's Budget (src/
    train.py): seconds of wall-clock, or optimiser steps for a budget of steps."""
    step: int                 # optimiser steps attempted before this one
    elapsed: float            # budget spent when the step started
    budget_left: float        # b_t = (B − spent) / B, in [0, 1]
    progress: float           # fraction of the training horizon (B less the final evaluation's reserve) spent
    steps_left: float         # optimiser steps the rest of the horizon is expected to hold (≥ 0)
    loss: float = math.nan    # this step's mean answer-token loss (unweighted)
    grad_norm: float = math.nan   # before clipping
    grad_scale: float = 1.0   # factor gradient clipping applied (≤ 1)


@dataclass
class TokenBatch:
    """One micro-batch as a planner sees it after the forward pass and before backward.  Shapes (n,) over the
    micro-batch's answer tokens (row-major), except `batch` (the padded tensors, on the device)."""
    batch: MicroBatch
    targets: torch.Tensor            # token ids
    losses: torch.Tensor             # per-token losses, detached
    position: torch.Tensor           # relative position within the answer, in [0, 1]
    entropy: torch.Tensor | None     # first-layer probe entropy in [0, 1], when the planner asked for it
    index: int                       # micro-batch index within the step


class Planner:
    """One interface for every learning-rate planner.  Per optimiser step t the loop calls, in order:

        weigh_tokens(tokens)  once per micro-batch, after its forward and before its backward: token
                              multipliers (n,) with mean 1 over the micro-batch's answer tokens, or None
        plan(ctx) -> η_t      after the backward of all micro-batches (raw gradients g_t in .grad), before
                              clipping and the optimiser step; a planner may run its own optimiser here
        after_step(ctx)       after the optimiser step (updated θ_{t+1} and still g_t in .grad)
        on_bad_step()         instead of plan/after_step when the step was skipped (non-finite loss or gradient)
        on_eval(active)       around every evaluation (Schedule-Free swaps its averaged weights in)
        log() -> dict         internals for W&B under planner/...
        start_episode()       a new budget on fresh adapters (pre-training): forget the run, keep what was learned
        finish(results_dir)   once at the end (GRAFF's pre-training saves the planner)

    `cfg` is the planner's own settings (`training.scheduler`, typed by its config class in src/main.py), `opt_cfg`
    the optimiser's (`training.optimizer`).  `make_optimizer` builds the model's optimiser (AdamW unless the method
    is an optimiser, like Schedule-Free).  `activity` counts how often each of the planner's learning paths ran
    (trial mode checks that every one of them runs)."""

    uses_probe: ClassVar[bool] = False
    learning_paths: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg, opt_cfg, token_loss: TokenLoss, params: list[nn.Parameter], graph: AdapterGraph,
                 results_dir: Path | None = None, trial: bool = False):
        self.cfg, self.opt_cfg, self.token_loss, self.params, self.graph = cfg, opt_cfg, token_loss, params, graph
        self.results_dir, self.trial = results_dir, trial     # where planner files live; a trial-mode run?
        self.lr_init = float(opt_cfg.lr_init)
        self.eta = self.lr_init
        self.optimizer: torch.optim.Optimizer | None = None
        self.notes: list[str] = []                            # lines the loop prints once at start
        self.activity = {path: 0 for path in self.learning_paths}

    def make_optimizer(self) -> torch.optim.Optimizer:
        self.optimizer = torch.optim.AdamW(self.params, lr=self.lr_init, betas=tuple(self.opt_cfg.betas),
                                           weight_decay=self.opt_cfg.weight_decay)
        return self.optimizer

    def weigh_tokens(self, tokens: TokenBatch) -> torch.Tensor | None:
        return None

    def plan(self, ctx: StepContext) -> float:
        return self.lr_init

    def after_step(self, ctx: StepContext) -> None:
        pass

    def on_bad_step(self) -> None:
        pass

    def on_eval(self, active: bool) -> None:
        pass

    def log(self) -> dict[str, float]:
        return {}

    def start_episode(self) -> None:
        pass

    def finish(self, results_dir: Path) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


PLANNERS: dict[str, type[Planner]] = {}     # training.scheduler.type -> planner class (filled by @register)


def register(kind: str):
    def add(cls: type[Planner]) -> type[Planner]:
        PLANNERS[kind] = cls
        return cls
    return add


def build_planner(model: nn.Module, training_cfg, results_dir: Path | None = None, trial: bool = False,
                  probe_batches: Sequence[MicroBatch] = ()) -> Planner:
    """The planner of `training_cfg.scheduler` on a PEFT model, with its per-token loss, the trainable parameters,
    the adapter graph and the model's optimiser (`planner.optimizer`).  When the planner reads the first-layer
    probe, its sub-vocabulary is the `training_cfg.probe_vocab` most frequent answer tokens of `probe_batches`."""
    token_loss = TokenLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    planner = PLANNERS[training_cfg.scheduler.type](training_cfg.scheduler, training_cfg.optimizer, token_loss,
                                                    params, adapter_graph(model), results_dir=results_dir,
                                                    trial=trial)
    planner.make_optimizer()
    if planner.uses_probe and probe_batches:
        token_loss.probe_ids = frequent_tokens(probe_batches, training_cfg.probe_vocab).to(params[0].device)
    return planner


def normalise_weights(w: torch.Tensor) -> torch.Tensor:
    """Rescale positive token weights to mean 1 (they reweight the loss, never rescale it)."""
    return w * (w.numel() / w.sum().clamp(min=1e-12))


# ----------------------------------------------------------------------------------------------------
# 2. Building models
# ----------------------------------------------------------------------------------------------------
EMBEDDED = "embedded"
EMBEDDED_VERSION = 1   # bump when the builder changes, so cached embedded models are rebuilt
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def embedded_model_dir(spec) -> Path:
    """Build once and cache a Qwen3-architecture model from `model.embedded` with a locally trained tokenizer.

    The tokenizer is a byte-level BPE trained on the synthetic task's text (no download); the weights are a
    seeded random initialisation.  The folder is an ordinary Hugging Face checkpoint, loaded by the same code
    as any local model directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    values = {k: spec[k] for k in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate",
                                   "vocab_size", "max_positions", "init_seed")}
    key = hashlib.sha256(json.dumps({**values, "v": EMBEDDED_VERSION}, sort_keys=True).encode()).hexdigest()[:12]
    folder = CACHE_DIR / "embedded" / f"qwen3-{spec.layers}l-{spec.hidden}h-{key}"
    if (folder / "config.json").is_file():
        return folder
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(synthetic_corpus(), trainers.BpeTrainer(
        vocab_size=spec.vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|pad|>")
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim, max_position_embeddings=spec.max_positions, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(spec.init_seed)
    model = Qwen3ForCausalLM(config)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.replace(folder)
    except OSError:   # another process finished first: its copy is identical
        pass
    return folder


def parse_count(text: str) -> float:
    """'0.6B' -> 6e8, '70M' -> 7e7, '7B' -> 7e9."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMB]?)\s*", str(text), flags=re.I)
    if not match:
        raise UserError(f"model.parameter_count={text!r} is not a size like 0.6B or 70M; fix it or set null")
    return float(match.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}[match.group(2).upper()]


@dataclass
class LoadedModel:
    peft: nn.Module          # PeftModelForCausalLM
    tokenizer: object
    source: str              # the folder or hub id it came from
    n_params: int            # all parameters of the base model
    n_trainable: int


def build_model(model_cfg, gradient_checkpointing: bool, device: torch.device) -> LoadedModel:
    """The base model (embedded, local folder or hub id) wrapped with PEFT LoRA on the configured projections."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = model_cfg.name
    source = str(embedded_model_dir(model_cfg.embedded)) if name == EMBEDDED else name
    local = Path(source).expanduser()
    kwargs = {"cache_dir": str(CACHE_DIR / "hub")}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        base = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[model_cfg.dtype], attn_implementation="sdpa",
                                                    **kwargs)
    except Exception as err:   # a missing, empty, truncated or foreign model folder: one line, never a traceback
        if not local.exists() and hub_offline():
            raise UserError(f"model '{name}' is not cached in {CACHE_DIR / 'hub'} and the Hugging Face hub is "
                            f"unreachable: run once with network access, or set model.name to a local model folder")
            # no traceback: the chained exception is dropped by the entry point
        first = (str(err).splitlines() or [type(err).__name__])[0][:200]
        what = "the local model folder" if local.exists() else "the model"
        raise UserError(f"could not load {what} '{name}' ({type(err).__name__}: {first}); check model.name (a hub id "
                        f"or a complete local folder: config.json, tokenizer and weights)") from None
    if tokenizer.pad_token_id is None:   # Mistral has no pad token; padding positions are masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    n_params = sum(p.numel() for p in base.parameters())
    if model_cfg.parameter_count is not None:
        nominal = parse_count(model_cfg.parameter_count)
        if not 0.5 <= n_params / nominal <= 2.0:
            raise UserError(f"model '{name}' has {n_params / 1e6:,.1f} M parameters but model.parameter_count="
                            f"{model_cfg.parameter_count}: check model.name, or correct/null parameter_count")
    present = {n.split(".")[-1] for n, _ in base.named_modules()}
    missing = [t for t in model_cfg.lora.target_modules if t not in present]
    if missing:
        raise UserError(f"model '{name}' has no modules named {missing} for LoRA; model.lora.target_modules "
                        f"must name linear layers of this architecture (Qwen3 and Mistral: {LORA_TARGETS_HELP})")
    lora = LoraConfig(r=model_cfg.lora.r, lora_alpha=model_cfg.lora.alpha, lora_dropout=model_cfg.lora.dropout,
                      target_modules=list(model_cfg.lora.target_modules), task_type="CAUSAL_LM",
                      modules_to_save=list(model_cfg.lora.modules_to_save) or None)
    model = get_peft_model(base, lora)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # non-reentrant checkpointing needs no inputs that require grad; the hook PEFT adds for the reentrant
        # kind would also break GRAFF's forward-mode JVP (torch.func refuses requires_grad_ inside a transform)
        base.disable_input_require_grads()
    model.config.use_cache = False   # training forwards never need the KV cache; generate() asks for it itself
    # from_pretrained leaves the base model in eval mode, and get_peft_model only sets its own new modules to
    # train: without this the decoder layers would skip gradient checkpointing (transformers applies it only in
    # training mode) until the first evaluation switched the whole model to train.  Found on an H100, where
    # GRAFF's steps (its JVP restores training mode on the whole model) checkpointed and the others' did not.
    model.train()
    model.to(device)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return LoadedModel(model, tokenizer, source, n_params, n_trainable)


# ----------------------------------------------------------------------------------------------------
# 3. The adapter graph
# ----------------------------------------------------------------------------------------------------
# Nodes: one per adapter *block*: the attention block (q, k, v, o adapters) and the MLP block (gate, up, down
# adapters) of every decoder layer, plus one node per fully trained module (modules_to_save: embeddings, LM
# head).  Grouping by block rather than by projection keeps the graph small (2 nodes per layer) while still
# separating the two kinds of computation whose curvature differs most.
# Edges (both directions): consecutive blocks in forward order (attention -> MLP within a layer, MLP of layer l
# -> attention of layer l+1, embeddings -> first block, last block -> head), and same-kind blocks of
# consecutive layers (attention l <-> attention l+1, MLP l <-> MLP l+1).
_LAYER_RE = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.")


@dataclass
class AdapterGraph:
    names: list[str]                      # node names, forward order ("L3.attn", "L3.mlp", "embed", "head")
    params: list[list[nn.Parameter]]      # trainable parameters of each node
    edges: torch.Tensor                   # (2, E) long: source, destination

    @property
    def n_nodes(self) -> int:
        return len(self.names)


def adapter_graph(model: nn.Module) -> AdapterGraph:
    groups: dict[tuple, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        match = _LAYER_RE.search(name)
        if match:
            key = (1, int(match.group(1)), 0 if match.group(2) == "self_attn" else 1, "")
        elif "embed" in name:
            key = (0, 0, 0, "embed")
        else:   # LM head and any other fully trained module come last
            key = (2, 0, 0, name.split(".modules_to_save")[0].split(".")[-1])
        groups.setdefault(key, []).append(param)
    keys = sorted(groups)
    names = [f"L{k[1]}.{'attn' if k[2] == 0 else 'mlp'}" if k[0] == 1 else k[3] for k in keys]
    pairs = set()
    for i in range(len(keys) - 1):
        pairs.add((i, i + 1))
    for i, a in enumerate(keys):
        for j, b in enumerate(keys):
            if a[0] == b[0] == 1 and b[1] == a[1] + 1 and a[2] == b[2]:
                pairs.add((i, j))
    both = sorted(pairs | {(j, i) for i, j in pairs})
    edges = torch.tensor(both, dtype=torch.long).t().reshape(2, -1)
    return AdapterGraph(names, [groups[k] for k in keys], edges)


# ----------------------------------------------------------------------------------------------------
# 4. The forward pass
# ----------------------------------------------------------------------------------------------------
class TokenLoss(nn.Module):
    """Per-token cross-entropy on answer tokens only, and the first-layer entropy probe.

    Calls the decoder stack and the LM head separately so that logits are computed only at answer positions,
    in chunks under activation checkpointing: no (tokens × vocabulary) fp32 tensor is ever kept for backward
    (with Qwen3's 151,936-word vocabulary that tensor dominates memory).  It is an nn.Module so that GRAFF can
    call it with substituted parameters (torch.func) through the same code as training."""

    def __init__(self, peft_model: nn.Module, chunk_tokens: int = 4096):
        super().__init__()
        self.core = peft_model.get_base_model()      # the *ForCausalLM with LoRA layers injected
        self.chunk_tokens = chunk_tokens
        self.probe_ids: torch.Tensor | None = None   # (V_s,) token ids of the entropy probe's sub-vocabulary
        self._layer0_out: torch.Tensor | None = None
        self._probing = True
        self._hook = self.core.model.layers[0].register_forward_hook(self._keep_layer0)

    def close(self) -> None:
        """Detach the probe's hook from the model (before another TokenLoss is built on the same model)."""
        self._hook.remove()

    def _keep_layer0(self, module, args, output):
        if self.probe_ids is not None and self._probing:
            self._layer0_out = output[0] if isinstance(output, tuple) else output

    @contextmanager
    def no_probe(self):
        """Forward passes inside keep nothing for the probe (evaluation losses, the planner's own passes)."""
        self._probing = False
        try:
            yield
        finally:
            self._probing = True

    def forward(self, input_ids, attention_mask, answer_mask, checkpoint_head: bool = True):
        """Returns per-token losses (n,) in fp32, n = number of answer tokens, in row-major order."""
        hidden = self.core.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        select = answer_mask[:, 1:]                       # (B, S-1): position s-1 predicts token s
        h = hidden[:, :-1][select]                        # (n, H)
        targets = input_ids[:, 1:][select]                # (n,)
        head = self.core.lm_head
        pieces = []
        for start in range(0, h.shape[0], self.chunk_tokens):
            hc, yc = h[start:start + self.chunk_tokens], targets[start:start + self.chunk_tokens]
            if checkpoint_head and torch.is_grad_enabled():
                pieces.append(checkpoint(_chunk_ce, head, hc, yc, use_reentrant=False))
            else:
                pieces.append(_chunk_ce(head, hc, yc))
        return torch.cat(pieces) if pieces else h.new_zeros(0, dtype=torch.float32)

    @torch.no_grad()
    def probe_entropy(self, answer_mask: torch.Tensor) -> torch.Tensor | None:
        """Token entropy H_i after the first adapter layer, at the answer positions of the last forward: (n,).

        A logit lens (final norm + LM head) on layer 0's output, restricted to the V_s most frequent answer
        tokens: the full-vocabulary lens costs as much as the LM head itself (SPEC §8 notes); the sub-vocabulary
        costs V_s/V of it (4,096 of 151,936 words: 2.7%).  It is an uncertainty signal, not a calibrated
        entropy.  Normalised by log(V_s), so it lies in [0, 1] for any model."""
        if self.probe_ids is None or self._layer0_out is None:
            return None
        h0 = self._layer0_out[:, :-1][answer_mask[:, 1:]]                # (n, H)
        weight = self.core.lm_head.weight[self.probe_ids]                # (V_s, H)
        logits = (self.core.model.norm(h0) @ weight.t()).float()         # (n, V_s)
        logp = logits.log_softmax(-1)
        self._layer0_out = None
        return -(logp.exp() * logp).sum(-1) / math.log(max(len(self.probe_ids), 2))


def _chunk_ce(head: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), targets, reduction="none")


def answer_positions(answer_mask: torch.Tensor) -> torch.Tensor:
    """Relative position of every answer token within its answer, in [0, 1]: (n,)."""
    select = answer_mask[:, 1:]
    index = select.long().cumsum(1) - 1                                  # 0..len-1 within each row
    length = select.sum(1, keepdim=True).clamp(min=2) - 1
    return (index.float() / length.float())[select]


def frequent_tokens(batches: Sequence[MicroBatch], k: int) -> torch.Tensor:
    """The k most frequent answer-token ids in some training batches (the entropy probe's sub-vocabulary)."""
    targets = torch.cat([b.input_ids[:, 1:][b.answer_mask[:, 1:]] for b in batches])
    ids, counts = targets.unique(return_counts=True)
    return ids[counts.argsort(descending=True)[:k]].sort().values


# ----------------------------------------------------------------------------------------------------
# 5. Shared estimators
# ----------------------------------------------------------------------------------------------------
def block_dots(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], owner: torch.Tensor,
               n_blocks: int) -> torch.Tensor:
    """Per-block inner products Σ_{p∈block} ⟨x_p, y_p⟩ in fp32: (n_blocks,).  `owner[p]` is p's block."""
    per = torch.stack([torch.dot(x.reshape(-1).float(), y.reshape(-1).float()) for x, y in zip(xs, ys)])
    return torch.zeros(n_blocks, device=per.device).index_add_(0, owner.to(per.device), per)


class SecantCurvature:
    """Hessian-free curvature along the optimiser's update, per block and in total (shared by GRAFF and SALeLR).

    The step is θ_{t+1} = θ_t − η_t·u_t.  The secant H·(θ_{t+1} − θ_t) ≈ g_{t+1} − g_t, dotted with a direction v_t,
    gives with a_t = ⟨g_t, v_t⟩ and b_t = ⟨g_{t+1}, v_t⟩
        λ̂_t = (a_t − b_t) / (η_t · a_t)  ≈  vᵀHu / ∇Lᵀv,
    the curvature along the update in units of the first-order decrease.  With v = u, on the one-dimensional
    quadratic model along u, the step lowers the loss iff η_t·λ̂_t < 2 whatever the optimiser (for gradient
    descent λ̂ is the Rayleigh quotient of H along g; for Adam, the sharpness of its preconditioned step), which is
    why the edge-of-stability guard η·λ̂ ≤ 1.9 is stated on this quantity.

    Why v is not simply u: g_t's mini-batch noise ξ_t is part of u_t (Adam's step contains (1−β1)·P·g_t), so
    ⟨g_t, u_t⟩ carries +⟨ξ_t, (1−β1)Pξ_t⟩ that ⟨g_{t+1}, u_t⟩ does not (ξ_{t+1} is independent of u_t).  The naive
    estimate is then biased toward c/η_t whenever noise dominates the gradient, late in training above all, and a
    planner that lowers η when λ̂ rises feeds the bias back into λ̂ (lower η, higher λ̂, lower η...).  Here v_t is
    the part of AdamW's step that was fixed before g_t arrived: v_t = β1·m_{t−1} / ((1−β1^k)(√v̂_{t−1} + ε)) + λ_wd·θ_t
    (momentum and weight decay, preconditioned as of step t−1), computed before the step and independent of ξ_t,
    so a_t and b_t are unbiased; with β1 = 0.9 it is 90% of the step, and vᵀHu/∇Lᵀv measures the same curvature.
    No estimate is made at the first step (no momentum yet).  Optimisers without Adam state use v = u.

    Cost: a copy of θ, the update and v, and three dot products per step; no extra forward or backward pass.
    Single estimates are noisy (two mini-batches, and a ratio whose denominator can come near 0): `lam_max` is
    the ratio of EMAs (`ema`), EMA[(a−b)/η] / EMA[a], a consistent estimate that a near-zero a_t cannot blow up,
    read as max(·, 0).  `b_total` = ⟨g_{t+1}, u_t⟩ (unbiased as it is) is GRAFF's hypergradient."""

    def __init__(self, params: Sequence[nn.Parameter], owner: torch.Tensor, n_blocks: int, ema: float):
        self.params, self.owner, self.n_blocks, self.ema = list(params), owner, n_blocks, ema
        self._before: list[torch.Tensor] | None = None
        self.u: list[torch.Tensor] | None = None       # u_t, same shapes as params
        self.v: list[torch.Tensor] | None = None       # v_t: u_t without g_t's own share
        self.eta = 0.0                                 # η_t of the step u_t belongs to
        self.a_blocks: torch.Tensor | None = None      # ⟨g_t, v_t⟩ per block: (n_blocks,)
        self.lam_blocks = torch.zeros(n_blocks)        # latest per-block λ̂ (0 where unknown)
        self.lam = float("nan")                        # latest total λ̂ (one pair of steps)
        self.num_ema = self.den_ema = 0.0              # EMA[(a−b)/η], EMA[a] (their ratio needs no debiasing)
        self._held = 0.0                               # the last λ̂_max measured with EMA[a] > 0
        self.b_total = 0.0                             # ⟨g_{t+1}, u_t⟩ over all parameters (GRAFF's hypergradient)
        self._v_next: list = []                        # v_t of the coming step (set before it)
        self._groups: dict | None = None               # parameter -> its optimiser group

    @property
    def lam_max(self) -> float:
        """The curvature the guard and SALeLR use: max(EMA[(a−b)/η] / EMA[a], 0); 0 while unknown.  While
        EMA[a] ≤ 0 (no first-order decrease left along v to measure it against) the last value holds: "no
        evidence" must not read as "flat" and let η jump back up."""
        if self.den_ema > 1e-30:
            self._held = max(self.num_ema / self.den_ema, 0.0)
        return self._held

    @torch.no_grad()
    def observe(self) -> bool:
        """After the backward of step t+1 (raw gradients in .grad): estimate λ̂ for step t.  False if no u_t."""
        if self.u is None or self.a_blocks is None:
            return False
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self.b_total = float(block_dots(grads, self.u, self.owner, self.n_blocks).sum())
        b_blocks = block_dots(grads, self.v, self.owner, self.n_blocks)
        a_blocks = self.a_blocks
        a_total, b_total = float(a_blocks.sum()), float(b_blocks.sum())
        self.pair = (a_total, b_total)                 # ⟨g_t, v_t⟩, ⟨g_{t+1}, v_t⟩ (for tests and logging)
        valid = a_blocks > 1e-30
        lam_blocks = torch.where(valid, (a_blocks - b_blocks) / (self.eta * a_blocks.clamp(min=1e-30)),
                                 torch.zeros_like(a_blocks))
        self.lam_blocks = lam_blocks.cpu()
        if self.eta > 0:
            self.lam = (a_total - b_total) / (self.eta * a_total) if abs(a_total) > 1e-30 else float("nan")
            self.num_ema = self.ema * self.num_ema + (1 - self.ema) * (a_total - b_total) / self.eta
            self.den_ema = self.ema * self.den_ema + (1 - self.ema) * a_total
        return True

    @torch.no_grad()
    def before_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Before the optimiser step: keep θ_t and the direction v_t (see the class docstring)."""
        self._before = [p.detach().clone() for p in self.params]
        if optimizer is not None and self._groups is None:
            self._groups = {id(q): group for group in optimizer.param_groups for q in group["params"]}
        self._v_next = [committed_direction(p, optimizer, (self._groups or {}).get(id(p))) for p in self.params]

    @torch.no_grad()
    def after_step(self, eta: float, grad_scale: float) -> None:
        """After the optimiser step (g_t, clipped, still in .grad): u_t = (θ_t − θ_{t+1})/η_t and a_t = ⟨g_t, v_t⟩
        with g_t unclipped."""
        if self._before is None or eta <= 0:
            return
        self.u = [(b - p.detach()) / eta for b, p in zip(self._before, self.params)]
        if any(v is False for v in self._v_next):      # the first AdamW step: no momentum, no estimate
            self.reset_pair()
            return
        self.v = [u if v is None else v for u, v in zip(self.u, self._v_next)]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self.a_blocks = block_dots(grads, self.v, self.owner, self.n_blocks) / grad_scale
        self.eta, self._before = eta, None

    def reset_pair(self) -> None:
        """Forget u_t (after a skipped step, the next gradient no longer pairs with it)."""
        self.u, self.v, self.a_blocks, self._before = None, None, None, None

    def state_dict(self) -> dict:
        return {"num_ema": self.num_ema, "den_ema": self.den_ema, "lam": self.lam, "eta": self.eta,
                "held": self._held}

    def load_state_dict(self, state: dict) -> None:
        self.num_ema, self.den_ema, self.lam, self.eta, self._held = (state["num_ema"], state["den_ema"],
                                                                      state["lam"], state["eta"], state["held"])


def committed_direction(p: nn.Parameter, optimizer, group: dict | None):
    """The part of AdamW's coming update of p that does not depend on the coming gradient:
    β1·m_{t−1} / ((1−β1^k)(√v̂_{t−1} + ε)) + λ_wd·θ_t, with k the coming step's number.  None for an optimiser
    without Adam state (the caller then uses the update itself); False before AdamW's first step."""
    if optimizer is None or group is None or "betas" not in group or "eps" not in group:
        return None
    state = optimizer.state.get(p, {})
    if "exp_avg" not in state or float(state["step"]) < 1:
        return False
    beta1, beta2 = group["betas"]
    done = float(state["step"])                                     # k − 1 steps taken
    denom = (state["exp_avg_sq"] / (1 - beta2 ** done)).sqrt() + group["eps"]
    return beta1 * state["exp_avg"] / ((1 - beta1 ** (done + 1)) * denom) + group["weight_decay"] * p.detach()


# ----------------------------------------------------------------------------------------------------
# 6. Time-based schedules and Schedule-Free AdamW
# ----------------------------------------------------------------------------------------------------
# transformers' schedulers are functions of the step count; these are functions of elapsed wall-clock time as
# a fraction p of the training horizon (the budget minus the final evaluation's reserve), because the number of
# steps a budget buys is not known in advance.  They are this project's own, written to match the shapes of
# transformers' `get_cosine_schedule_with_warmup` and `get_wsd_schedule` with steps replaced by time.
def warmup_multiplier(p: float, warmup: float) -> float:
    return min(1.0, p / warmup) if warmup > 0 else 1.0


def cosine_multiplier(p: float, warmup: float, min_ratio: float) -> float:
    """Linear warmup over [0, warmup], then half a cosine from 1 to min_ratio at p = 1."""
    if p < warmup:
        return warmup_multiplier(p, warmup)
    q = min((p - warmup) / max(1.0 - warmup, 1e-9), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * q))


def linear_multiplier(p: float, warmup: float) -> float:
    """Linear warmup, then linear decay to 0 at p = 1 (Li et al. 2020, budgeted training)."""
    if p < warmup:
        return warmup_multiplier(p, warmup)
    return max(0.0, 1.0 - (p - warmup) / max(1.0 - warmup, 1e-9))


def wsd_multiplier(p: float, warmup: float, decay: float, min_ratio: float) -> float:
    """Warmup-stable-decay: linear warmup, constant, then linear decay to min_ratio over the last `decay`."""
    if p < warmup:
        return warmup_multiplier(p, warmup)
    start = 1.0 - decay
    if p < start:
        return 1.0
    q = min((p - start) / max(decay, 1e-9), 1.0)
    return 1.0 - (1.0 - min_ratio) * q


# A multiplier of exactly 0 would make the optimiser step a no-op and AdamW's update direction undefined; the
# last instant of a decay-to-zero schedule gets this floor instead (a planner never returns η ≤ 0).
MIN_MULTIPLIER = 1e-3


@register("constant")
class ConstantLR(Planner):
    """comparative-4: η_t = lr_init."""


@register("cosine")
class CosineLR(Planner):
    """comparative-5: human-tuned cosine with warmup, decaying over the wall-clock budget."""

    def plan(self, ctx):
        self.eta = self.lr_init * max(cosine_multiplier(ctx.progress, self.cfg.warmup_fraction, self.cfg.min_lr_ratio),
                                      MIN_MULTIPLIER)
        return self.eta


@register("linear")
class LinearDecayLR(Planner):
    """comparative-6: linear decay to zero at the end of the budget (Li et al. 2020)."""

    def plan(self, ctx):
        self.eta = self.lr_init * max(linear_multiplier(ctx.progress, self.cfg.warmup_fraction), MIN_MULTIPLIER)
        return self.eta


@register("wsd")
class WarmupStableDecayLR(Planner):
    """comparative-7: warmup-stable-decay on wall-clock time (the MiniCPM schedule)."""

    def plan(self, ctx):
        mult = wsd_multiplier(ctx.progress, self.cfg.warmup_fraction, self.cfg.decay_fraction, self.cfg.min_lr_ratio)
        self.eta = self.lr_init * max(mult, MIN_MULTIPLIER)
        return self.eta


@register("schedulefree")
class ScheduleFreeAdamW(Planner):
    """comparative-8: Schedule-Free AdamW (Defazio et al. 2024) from the `schedulefree` package.

    The optimiser keeps two weight sequences; training runs at the interpolated point y and evaluation must see
    the averaged x: `optimizer.eval()` before every evaluation and `optimizer.train()` after (and at start)."""

    def make_optimizer(self):
        import schedulefree
        self.optimizer = schedulefree.AdamWScheduleFree(self.params, lr=self.lr_init, betas=tuple(self.opt_cfg.betas),
                                                        weight_decay=self.opt_cfg.weight_decay,
                                                        warmup_steps=self.cfg.warmup_steps)
        self.optimizer.train()
        return self.optimizer

    def on_eval(self, active):
        if active:
            self.optimizer.eval()
        else:
            self.optimizer.train()

    def log(self):
        return {"optimizer_train_mode": float(self.optimizer.param_groups[0]["train_mode"])}


# ----------------------------------------------------------------------------------------------------
# 7. SALeLR, BATS, REACTOR
# ----------------------------------------------------------------------------------------------------
def _owner_index(graph: AdapterGraph, params: Sequence[nn.Parameter]) -> tuple[torch.Tensor, int]:
    """Block index of every trainable parameter (all trainable parameters belong to some node)."""
    where = {id(p): i for i, group in enumerate(graph.params) for p in group}
    return torch.tensor([where[id(p)] for p in params], dtype=torch.long), graph.n_nodes


@register("salelr")
class SALeLR(Planner):
    """comparative-3: sharpness-aware LR, η_t = lr_init · median(λ̂_≤t) / λ̂_t, clipped to `lr_mult_range`.

    In the spirit of SALR (arXiv 2011.05348), which rescales the LR by sharpness relative to its running median;
    as SPEC §9 defines SALeLR, the rescaling is by the *inverse* sharpness (smaller steps where the loss is
    sharper).  λ̂_t is the secant curvature shared with GRAFF (SecantCurvature), smoothed by `curvature_ema`."""
    learning_paths = ("curvature",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        owner, n = _owner_index(self.graph, self.params)
        self.curv = SecantCurvature(self.params, owner, n, self.cfg.curvature_ema)
        self.history: list[float] = []

    def plan(self, ctx):
        if self.curv.observe():
            self.activity["curvature"] += 1
        lam = self.curv.lam_max
        if lam > 0:
            self.history.append(lam)
            reference = float(torch.tensor(self.history).median())
            lo, hi = self.cfg.lr_mult_range
            self.eta = self.lr_init * min(max(reference / lam, lo), hi)
        else:
            self.eta = self.lr_init
        self.curv.before_step(self.optimizer)
        return self.eta

    def after_step(self, ctx):
        self.curv.after_step(self.eta, ctx.grad_scale)

    def on_bad_step(self):
        self.curv.reset_pair()

    def log(self):
        return {"lambda_max": self.curv.lam_max, "lambda_raw": self.curv.lam,
                "eta_lambda_max": self.eta * self.curv.lam_max}

    def state_dict(self):
        return {"curv": self.curv.state_dict(), "history": self.history}

    def load_state_dict(self, state):
        self.curv.load_state_dict(state["curv"])
        self.history = list(state["history"])


@register("bats")
class BATS(Planner):
    """comparative-2: token-aware tuning from difficulty measured after the full backward pass.

    Difficulty is tracked per vocabulary entry: D[v] is an EMA (`difficulty_ema`) of the loss of answer tokens
    whose target is v, updated after each step's backward.  The next step's tokens get weights
    w_i ∝ (D[y_i] / mean D)^`difficulty_power`, clipped to `weight_range` and renormalised to mean 1, so harder
    tokens count more.  Tokens never seen yet get the mean difficulty.  The LR itself is lr_init (the method
    reweights tokens; it does not schedule)."""
    learning_paths = ("difficulty",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        vocab = self.token_loss.core.get_output_embeddings().weight.shape[0]
        device = self.params[0].device
        self.difficulty = torch.zeros(vocab, device=device)     # D[v]
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._last_weights: torch.Tensor | None = None

    def weigh_tokens(self, tokens):
        self._pending.append((tokens.targets, tokens.losses))
        if not bool(self.seen.any()):
            return None
        mean = self.difficulty[self.seen].mean().clamp(min=1e-6)
        d = torch.where(self.seen[tokens.targets], self.difficulty[tokens.targets], mean)
        w = (d.clamp(min=1e-6) / mean) ** self.cfg.difficulty_power
        lo, hi = self.cfg.weight_range
        w = normalise_weights(normalise_weights(w).clamp(lo, hi))
        self._last_weights = w
        return w

    @torch.no_grad()
    def after_step(self, ctx):
        beta = self.cfg.difficulty_ema
        self.activity["difficulty"] += bool(self._pending)
        for targets, losses in self._pending:
            total = torch.zeros_like(self.difficulty).index_add_(0, targets, losses.float())
            count = torch.zeros_like(self.difficulty).index_add_(0, targets, torch.ones_like(losses, dtype=torch.float))
            hit = count > 0
            batch_mean = total[hit] / count[hit]
            old = self.difficulty[hit]
            self.difficulty[hit] = torch.where(self.seen[hit], beta * old + (1 - beta) * batch_mean, batch_mean)
            self.seen |= hit
        self._pending = []

    def on_bad_step(self):
        self._pending = []

    def log(self):
        out = {"tokens_tracked": float(self.seen.sum())}
        if self._last_weights is not None:
            out.update(token_weight_std=float(self._last_weights.std()), token_weight_max=float(self._last_weights.max()))
        return out

    def state_dict(self):
        return {"difficulty": self.difficulty.cpu(), "seen": self.seen.cpu()}

    def load_state_dict(self, state):
        self.difficulty.copy_(state["difficulty"])
        self.seen.copy_(state["seen"])


@register("reactor")
class REACTOR(Planner):
    """comparative-1: an RL controller of the LR, trained by REINFORCE.

    Policy: a Gaussian π(a | s) = N(μ_φ(s), σ²) over a = log(η_t / lr_init), μ_φ linear, log σ a learned scalar.
    State s_t (6 features): budget left b_t; log(L̃_t / L̃_0) with L̃ an EMA of the step loss; the EMA's recent
    slope; the coefficient of variation of this step's per-token losses and the mean first-layer probe entropy
    (the "token-aware" inputs: how uneven and how uncertain the tokens are); the previous action.
    Reward for action a_{t-1}: r_t = (L̃_{t-1} − L̃_t) / Δt_t, the loss decrease per second of wall-clock, so that
    the controller is paid for progress within the budget.  Update per step, with its own Adam (`controller_lr`):
    φ ← φ + ∇[(r_t − β_t)/σ_r · log π(a_{t-1}|s_{t-1}) + `entropy_bonus` · H(π(·|s_{t-1}))],
    where β_t is an EMA baseline of the reward (`baseline_decay`) and σ_r an EMA of the reward's spread (the
    advantage is normalised so that the entropy bonus keeps the same relative weight whatever the loss scale).
    The action is clipped to log `lr_mult_range` before use."""
    uses_probe = True
    learning_paths = ("policy",)
    N_STATE = 6

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.policy = nn.Linear(self.N_STATE, 1)
        nn.init.zeros_(self.policy.weight)
        nn.init.zeros_(self.policy.bias)
        self.log_std = nn.Parameter(torch.tensor(math.log(self.cfg.init_std)))
        self.opt = torch.optim.Adam([*self.policy.parameters(), self.log_std], lr=self.cfg.controller_lr)
        self.loss_ema = math.nan
        self.loss0 = math.nan
        self.prev_loss_ema = math.nan
        self.baseline = 0.0
        self.reward_var = 1.0
        self.n_rewards = 0
        self.prev: tuple[torch.Tensor, float, float] | None = None   # (state, action, time)
        self._token_stats = [0.0, 0.0, 0]
        self.last = {}

    def weigh_tokens(self, tokens):   # reads token statistics; does not reweight
        losses = tokens.losses.float()
        cv = float(losses.std() / losses.mean().clamp(min=1e-6)) if losses.numel() > 1 else 0.0
        ent = float(tokens.entropy.mean()) if tokens.entropy is not None and tokens.entropy.numel() else 0.0
        s = self._token_stats
        s[0], s[1], s[2] = s[0] + cv, s[1] + ent, s[2] + 1
        return None

    def state_vector(self, ctx: StepContext, prev_action: float) -> torch.Tensor:
        cv, ent, n = self._token_stats
        slope = (self.prev_loss_ema - self.loss_ema) / max(abs(self.loss0), 1e-6) \
            if math.isfinite(self.prev_loss_ema) else 0.0
        return torch.tensor([ctx.budget_left, math.log(max(self.loss_ema, 1e-6) / max(self.loss0, 1e-6)),
                             100.0 * slope, cv / max(n, 1), ent / max(n, 1), prev_action], dtype=torch.float32)

    def reinforce(self, state: torch.Tensor, action: float, reward: float) -> dict:
        """One REINFORCE update for (state, action) with `reward`; returns what it used (for logging/tests)."""
        decay = self.cfg.baseline_decay
        if self.n_rewards == 0:
            self.baseline = reward
        advantage = (reward - self.baseline) / math.sqrt(self.reward_var + 1e-12)
        dist = torch.distributions.Normal(self.policy(state).squeeze(), self.log_std.exp())
        objective = advantage * dist.log_prob(torch.tensor(action)) + self.cfg.entropy_bonus * dist.entropy()
        self.opt.zero_grad()
        (-objective).backward()
        self.opt.step()
        self.reward_var = decay * self.reward_var + (1 - decay) * (reward - self.baseline) ** 2
        self.baseline = decay * self.baseline + (1 - decay) * reward
        self.n_rewards += 1
        self.activity["policy"] += 1
        return {"reward": reward, "advantage": advantage, "baseline": self.baseline}

    def plan(self, ctx):
        loss = ctx.loss
        self.prev_loss_ema = self.loss_ema
        self.loss_ema = loss if not math.isfinite(self.loss_ema) else 0.9 * self.loss_ema + 0.1 * loss
        if not math.isfinite(self.loss0):
            self.loss0 = self.loss_ema
        info = {}
        if self.prev is not None:
            state, action, t_prev = self.prev
            reward = (self.prev_loss_ema - self.loss_ema) / max(ctx.elapsed - t_prev, 1e-6)
            info = self.reinforce(state, action, reward)
        prev_action = self.prev[1] if self.prev is not None else 0.0
        state = self.state_vector(ctx, prev_action)
        with torch.no_grad():
            mean, std = float(self.policy(state)), float(self.log_std.exp())
            action = mean + std * float(torch.randn(()))
        lo, hi = (math.log(v) for v in self.cfg.lr_mult_range)
        self.eta = self.lr_init * math.exp(min(max(action, lo), hi))
        self.prev = (state, action, ctx.elapsed)
        self._token_stats = [0.0, 0.0, 0]
        entropy = 0.5 * math.log(2 * math.pi * math.e * std ** 2)
        self.last = {"multiplier": self.eta / self.lr_init, "policy_mean": mean, "policy_std": std,
                     "entropy": entropy, **info}
        return self.eta

    def on_bad_step(self):
        self.prev = None
        self._token_stats = [0.0, 0.0, 0]

    def log(self):
        return dict(self.last)

    def state_dict(self):
        return {"policy": self.policy.state_dict(), "log_std": self.log_std.detach().clone(),
                "opt": self.opt.state_dict(),
                "scalars": [self.loss_ema, self.loss0, self.prev_loss_ema, self.baseline, self.reward_var,
                            self.n_rewards]}

    def load_state_dict(self, state):
        self.policy.load_state_dict(state["policy"])
        with torch.no_grad():
            self.log_std.copy_(state["log_std"])
        self.opt.load_state_dict(state["opt"])
        (self.loss_ema, self.loss0, self.prev_loss_ema, self.baseline, self.reward_var,
         self.n_rewards) = state["scalars"]


# ----------------------------------------------------------------------------------------------------
# 8. GRAFF
# ----------------------------------------------------------------------------------------------------
GRAFF_FORMAT = "graff-planner-v1"
N_NODE_FEATURES = 4    # x_{t,i} = [η·λ̂_i / guard, H̄_t, b_t, log(‖g_i‖ / mean_j ‖g_j‖)]
N_EDGE_FEATURES = 2    # e_ij = [x_i[0] − x_j[0], H̄_t]
N_TOKEN_FEATURES = 2   # φ_{t,i} = [z-scored probe entropy H_i, relative answer position − 1/2]


class GraffNet(nn.Module):
    """The planner's learnable part.  No parameter depends on the number of nodes, so one checkpoint serves
    every model size (zero-shot transfer, SPEC §8).

    Encoder (message passing, `rounds` rounds, then a GRU update of the persistent state):
        z⁰_i = tanh(A [x_i, h_i])                                          (N, D)
        z^{r+1}_i = z^r_i + mean_{j→i} tanh(M_r [z^r_i, z^r_j, e_ji])       with edges
        z^{r+1}_i = z^r_i + tanh(M_r [z^r_i, z^r_i, 0])                     without edges (ablation: per-node MLP)
        h_t = GRUCell(z^R, h_{t−1})                                        (N, D)
    Decoder: one linear map W ∈ R^{(1+K)×(D+1)} applied to h̄_t = [mean_i h_{t,i}; 1]:
        log η_t = log lr_init + W_0 · h̄_t
        s_{t,i} = Σ_k φ_{t,i,k} · (W_k · h̄_t),   m_{t,i} = normalise(exp(2·tanh(s_{t,i}/2)))
    W starts at zero: η = lr_init and m ≡ 1 until the planner has learned otherwise."""

    def __init__(self, hidden: int, rounds: int, use_edges: bool):
        super().__init__()
        self.hidden, self.use_edges = hidden, use_edges
        self.inp = nn.Linear(N_NODE_FEATURES + hidden, hidden)
        self.rounds = nn.ModuleList(nn.Linear(2 * hidden + N_EDGE_FEATURES, hidden) for _ in range(rounds))
        self.gru = nn.GRUCell(hidden, hidden)
        self.W = nn.Parameter(torch.zeros(1 + N_TOKEN_FEATURES, hidden + 1))

    def encode(self, h: torch.Tensor, x: torch.Tensor, edges: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """h (N, D), x (N, F), edges (2, E), e (E, 2) -> h' (N, D)."""
        z = torch.tanh(self.inp(torch.cat([x, h], -1)))
        for layer in self.rounds:
            if self.use_edges and edges.shape[1] > 0:
                src, dst = edges
                msg = torch.tanh(layer(torch.cat([z[dst], z[src], e], -1)))                 # (E, D)
                agg = torch.zeros_like(z).index_add_(0, dst, msg)
                deg = torch.zeros(z.shape[0], 1).index_add_(0, dst, torch.ones(len(dst), 1)).clamp(min=1)
                z = z + agg / deg
            else:
                z = z + torch.tanh(layer(torch.cat([z, z, torch.zeros(z.shape[0], N_EDGE_FEATURES)], -1)))
        return self.gru(z, h)

    @staticmethod
    def readout(h: torch.Tensor) -> torch.Tensor:
        """h̄ = [mean_i h_i; 1]: (D+1,)."""
        return torch.cat([h.mean(0), torch.ones(1)])


def token_multipliers(coeffs: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """m_i = normalise(exp(2·tanh(s_i/2))) with s_i = φ_i · coeffs: (n,), mean 1, each within a factor e⁴ of
    the others (bounded so that no token can take over the loss)."""
    s = phi @ coeffs
    return normalise_weights(torch.exp(2.0 * torch.tanh(s / 2.0)))


def project_halfspace(w: torch.Tensor, x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Euclidean projection of w onto the slab {w : lo ≤ w·x ≤ hi} (both half-spaces have normal x)."""
    s = float(w @ x)
    if s > hi:
        return w - (s - hi) / float(x @ x) * x
    if s < lo:
        return w + (lo - s) / float(x @ x) * x
    return w


@dataclass
class _Pending:
    """What step t leaves for the hypergradient at step t+1."""
    eta: torch.Tensor                       # η_t with its graph to W and the encoder
    readout: torch.Tensor                   # h̄ the token multipliers of step t were decoded from (detached)
    batch: MicroBatch | None = None         # the sequences of step t used for the token hypergradient (JVP)
    phi: torch.Tensor | None = None         # their token features (n_j, K)
    n_tokens: int = 1                       # answer tokens in the whole of step t (the loss's denominator)


@register("graff")
class GRAFF(Planner):
    """GRAFF: a graph-recurrent, budget-aware, differentiable LR planner (SPEC §8).

    Choices the seed leaves open, and why:
    * Nodes are adapter blocks (attention, MLP) per layer plus fully trained modules (see adapter_graph);
      edges link consecutive blocks and same-kind blocks of consecutive layers.
    * Curvature Δλ_i: the secant estimate along the update, per block (SecantCurvature): Hessian-free, no extra
      pass.  λ̂_max, the guard's curvature, is SecantCurvature.lam_max: max(0, EMA[(a−b)/η] / EMA[a]) over the
      total (`curvature_ema`), held at its last value while EMA[a] ≤ 0: the curvature along the whole update,
      measured in the geometry of the optimiser in use (for AdamW, along its preconditioned step), so
      η·λ̂ < 2 is exactly "this step lowers the loss on the quadratic model along u".
    * H_i: the first-layer logit-lens entropy on a sub-vocabulary (TokenLoss.probe_entropy).  Per token it feeds
      the token multipliers; its mean H̄_t is a node/edge feature of every node (there is one probe layer).
    * How m reaches tokens: m_{t,i} multiplies token i's loss in the step after h_t was computed (the loss is
      Σ_i m_i ℓ_i / n); m has mean 1 over each micro-batch, so it reweights and never rescales.
    * How gradients reach W: the one-step hypergradient (Baydin et al. 2018).  With θ_{t+1} = θ_t − η_t u_t,
      ∂L_{t+1}/∂η_t = −⟨g_{t+1}, u_t⟩, a dot product over the adapters after the model's ordinary backward at
      t+1, pushed through η_t's graph (kept from step t) into W and the encoder: no second backward, no
      REINFORCE.  For m: u_t ≈ P Σ_i m_i ∇ℓ_{t,i}/n (P Adam's preconditioner, as a diagonal), so
      ∂L_{t+1}/∂m_{t,i} ≈ −η_t ⟨P g_{t+1}, ∇ℓ_{t,i}⟩ / n for every i at once: one forward-mode JVP of step t's
      per-token losses in the direction P g_{t+1} (torch.func.jvp, attention on the math kernel, which has
      forward-mode derivatives), on `jvp_sequences` sequences of step t to bound its cost.  The m term
      reaches W's token rows only (recomputed with the current W from the stored h̄ and φ: the graph from two
      steps back would span an update of W); the encoder learns through η.
    * R_T = (L_T − L_best)/time_T: L_best and time_T do not depend on W, so ∇_W R_T is ∇_W L_T / time_T; the
      one-step surrogate optimises the newest term of L_T.  The factor 1/time_T (and the running average's
      1/T) only rescales the gradient, which Adam's normalisation removes; we drop it rather than let the
      outer step size fade with time.  R_T itself is logged as planner/regret.
    * Guard: log η_t = log lr_init + W_0·h̄_t is linear in W, so {W : η_t·λ̂_max ≤ γ} is a half-space; W_0 is
      projected onto it (and onto the safety slab `lr_mult_range`) whenever h_t or λ̂_max changes, after the
      outer update and before η_t is used.  With `freeze` the projection applies to a per-step copy, so W itself
      never changes.
    * h_t is a plain tensor carried across steps (never a parameter); gradients are truncated at one step
      (h_{t−1} enters the GRU detached).
    """
    uses_probe = True
    learning_paths = ("outer", "token_gradient", "curvature")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.net = GraffNet(self.cfg.hidden_dim, self.cfg.gnn_rounds, self.cfg.use_edges)
        self.outer = torch.optim.Adam(self.net.parameters(), lr=self.cfg.outer_lr)
        self.h = torch.zeros(self.graph.n_nodes, self.cfg.hidden_dim)     # h_t: state, not a parameter
        owner, n = _owner_index(self.graph, self.params)
        self.curv = SecantCurvature(self.params, owner, n, self.cfg.curvature_ema)
        self.edges = self.graph.edges
        self.pending: _Pending | None = None
        self.readout_now = GraffNet.readout(self.h)                      # h̄ the next step's m is decoded from
        self.jvp_batch: MicroBatch | None = None                         # step t's sequences for the JVP
        self.jvp_phi: torch.Tensor | None = None                         # their token features φ (n_j, K)
        self.step_tokens, self.entropy_sum = 0, 0.0                      # answer tokens and Σ H_i this step
        self.last_m: torch.Tensor | None = None
        self.loss_sum, self.n_losses, self.best_loss = 0.0, 0, math.inf
        self.last: dict[str, float] = {}
        if self.cfg.warm_start_ckpt:
            self.load_planner(resolve_path(self.cfg.warm_start_ckpt, self.results_dir))

    # -- checkpoints of the planner alone (warm start / transfer) --------------------------------------------
    def planner_checkpoint(self) -> dict:
        return {"format": GRAFF_FORMAT, "hidden_dim": self.cfg.hidden_dim, "gnn_rounds": self.cfg.gnn_rounds,
                "net": self.net.state_dict(), "outer": self.outer.state_dict(), "n_nodes": self.graph.n_nodes}

    def load_planner(self, path: Path) -> None:
        if not path.is_file():
            raise UserError(f"GRAFF warm-start checkpoint {path} does not exist: give an existing file, the file "
                            f"name a pretrain-… run saves (it is then produced), or null to start cold")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            raise UserError(f"GRAFF warm-start checkpoint {path} is not a readable torch file; re-create it with "
                            f"the pre-training run") from None
        if not isinstance(state, dict) or state.get("format") != GRAFF_FORMAT:
            raise UserError(f"{path} is not a GRAFF planner checkpoint ({GRAFF_FORMAT}); re-create it with the "
                            f"pre-training run")
        if (state["hidden_dim"], state["gnn_rounds"]) != (self.cfg.hidden_dim, self.cfg.gnn_rounds):
            raise UserError(f"{path} holds a planner with hidden_dim={state['hidden_dim']}, gnn_rounds="
                            f"{state['gnn_rounds']}, but this run asks for hidden_dim={self.cfg.hidden_dim}, "
                            f"gnn_rounds={self.cfg.gnn_rounds}: make training.scheduler match the checkpoint")
        self.net.load_state_dict(state["net"])
        self.outer.load_state_dict(state["outer"])     # Adam's moments carry over...
        for group in self.outer.param_groups:          # ...but the configured outer_lr stays what the run says
            group["lr"] = self.cfg.outer_lr

    def finish(self, results_dir):
        if self.cfg.save_ckpt:
            path = resolve_path(self.cfg.save_ckpt, results_dir)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.planner_checkpoint(), path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)

    # -- token multipliers (forward of step t) ------------------------------------------------------------
    def token_features(self, tokens: TokenBatch) -> torch.Tensor:
        """φ (n, K): z-scored probe entropy and centred relative position (both dimensionless)."""
        ent = tokens.entropy.float() if tokens.entropy is not None else torch.zeros_like(tokens.losses)
        z = (ent - ent.mean()) / ent.std().clamp(min=1e-6) if ent.numel() > 1 else torch.zeros_like(ent)
        return torch.stack([z, tokens.position.float() - 0.5], -1).cpu()

    def weigh_tokens(self, tokens):
        phi = self.token_features(tokens)
        with torch.no_grad():
            m = token_multipliers(self.net.W[1:] @ self.readout_now, phi)     # (n,), decoded from h_{t-1}
        if tokens.index == 0 and self.cfg.jvp_sequences > 0:   # keep the step's first sequences for the JVP
            keep = min(self.cfg.jvp_sequences, tokens.batch.input_ids.shape[0])
            self.jvp_batch = tokens.batch.select(slice(0, keep))
            self.jvp_phi = phi[:self.jvp_batch.n_answer_tokens]
        if tokens.entropy is not None:
            self.entropy_sum += float(tokens.entropy.sum())
        self.step_tokens += tokens.losses.numel()
        self.last_m = m
        return m.to(tokens.losses.device)

    # -- after backward of step t (g_t in .grad) ---------------------------------------------------------
    def plan(self, ctx):
        paired = self.curv.observe()                          # λ̂ of the previous update (needs g_t)
        self.activity["curvature"] += paired
        outer_norm = self.outer_update() if self.pending is not None and paired else 0.0
        self.pending = None
        x = self.node_features(ctx)
        h = self.net.encode(self.h, x, self.edges, self.edge_features(x))
        readout = GraffNet.readout(h)
        W0 = self.guarded_eta_row(readout.detach())
        log_mult = W0 @ readout
        eta = self.lr_init * torch.exp(log_mult)
        self.eta = float(eta.detach())
        # this step leaves η_t (with graph) and the sequences it used for m, for the hypergradient at t+1
        self.pending = _Pending(eta=eta, readout=self.readout_now, batch=self.jvp_batch, phi=self.jvp_phi,
                                n_tokens=max(self.step_tokens, 1))
        self.h = h.detach()
        self.readout_now = readout.detach()
        self.jvp_batch, self.jvp_phi, self.step_tokens, self.entropy_sum = None, None, 0, 0.0
        self.track_regret(ctx)
        m = self.last_m
        self.last = {"eta": self.eta, "lambda_max": self.curv.lam_max, "lambda_raw": self.curv.lam,
                     "eta_lambda_max": self.eta * self.curv.lam_max, "outer_grad_norm": outer_norm,
                     "token_mult_mean": float(m.mean()) if m is not None else 1.0,
                     "token_mult_std": float(m.std()) if m is not None and m.numel() > 1 else 0.0,
                     "entropy_mean": float(x[0, 1]), "budget_left": ctx.budget_left,
                     "w_norm": float(self.net.W.detach().norm()), "h_norm": float(self.h.norm())}
        self.curv.before_step(self.optimizer)
        return self.eta

    def after_step(self, ctx):
        self.curv.after_step(self.eta, ctx.grad_scale)

    def on_bad_step(self):
        self.curv.reset_pair()
        self.pending, self.jvp_batch, self.jvp_phi, self.step_tokens, self.entropy_sum = None, None, None, 0, 0.0

    def node_features(self, ctx: StepContext) -> torch.Tensor:
        """x_t (N, 4) from the latest curvature, probe entropy, budget and per-block gradient norms."""
        n = self.graph.n_nodes
        stability = (self.curv.eta * self.curv.lam_blocks / self.cfg.stability_guard).clamp(-5, 5)
        ent = self.entropy_sum / max(self.step_tokens, 1)                # H̄_t, in [0, 1]
        budget = ctx.budget_left if self.cfg.use_budget else 0.0
        with torch.no_grad():
            norms = torch.stack([torch.sqrt(sum((p.grad.float() ** 2).sum() for p in group if p.grad is not None)
                                            + torch.zeros((), device=group[0].device)) for group in self.graph.params])
            norms = norms.cpu()
        rel = torch.log(norms.clamp(min=1e-12) / norms.mean().clamp(min=1e-12)).clamp(-5, 5)
        return torch.stack([stability.float(), torch.full((n,), ent), torch.full((n,), budget), rel.float()], -1)

    def edge_features(self, x: torch.Tensor) -> torch.Tensor:
        src, dst = self.edges
        return torch.stack([x[src, 0] - x[dst, 0], x[src, 1]], -1)

    def guarded_eta_row(self, readout: torch.Tensor) -> torch.Tensor:
        """W_0 projected onto {w : lo ≤ log lr_init + w·h̄ ≤ min(hi, log(γ/λ̂_max))}.  In place unless frozen."""
        lo, hi = (math.log(v) for v in self.cfg.lr_mult_range)
        if self.curv.lam_max > 0:
            guard = math.log(self.cfg.stability_guard / (self.curv.lam_max * self.lr_init)) - 1e-4
            hi = min(hi, guard)
            lo = min(lo, hi)    # the guard wins over the safety floor
        with torch.no_grad():
            projected = project_halfspace(self.net.W[0].detach(), readout, lo, hi)
            if not self.cfg.freeze:
                self.net.W[0].copy_(projected)
        return self.net.W[0] if not self.cfg.freeze else projected

    # -- the outer update (hypergradient) -----------------------------------------------------------------
    def outer_update(self) -> float:
        """Adam step on W and the encoder from the one-step hypergradient of L_{t+1} (see class docstring)."""
        p = self.pending
        self.pending = None
        if self.cfg.freeze:
            return 0.0
        surrogate = -self.curv.b_total * p.eta                       # ∂L_{t+1}/∂η_t = −⟨g_{t+1}, u_t⟩
        if p.batch is not None and p.phi is not None and p.phi.numel():
            c = self.token_coefficients(p)                          # ∂L_{t+1}/∂m_{t,i}, detached (n_j,)
            m = token_multipliers(self.net.W[1:] @ p.readout, p.phi)
            surrogate = surrogate + (c * m).sum()
        self.outer.zero_grad()
        surrogate.backward()
        self.activity["outer"] += 1
        norm = float(torch.sqrt(sum((q.grad ** 2).sum() for q in self.net.parameters() if q.grad is not None)))
        if math.isfinite(norm):
            self.outer.step()
        return norm

    def token_coefficients(self, p: _Pending) -> torch.Tensor:
        """c_i = −η_t ⟨P g_{t+1}, ∇ℓ_{t,i}⟩ / n via one forward-mode JVP over the kept sequences: (n_j,)."""
        named = [(n, q) for n, q in self.token_loss.named_parameters() if q.requires_grad]
        state = self.optimizer.state if self.optimizer is not None else {}
        beta1, beta2 = self.opt_cfg.betas
        tangents = {}
        for name, q in named:
            g = q.grad if q.grad is not None else torch.zeros_like(q)
            st = state.get(q, {})
            if "exp_avg_sq" in st:   # Adam's diagonal preconditioner P = (1−β1)/(1−β1^t) / (√v̂ + ε)
                t = float(st["step"])
                vhat = st["exp_avg_sq"] / (1 - beta2 ** t)
                g = g * ((1 - beta1) / (1 - beta1 ** t)) / (vhat.sqrt() + 1e-8)
            tangents[name] = g.detach()
        d = per_token_jvp(self.token_loss, p.batch, tangents).float().cpu()[: p.phi.shape[0]]
        self.activity["token_gradient"] += 1
        return -float(p.eta.detach()) * d / p.n_tokens

    def track_regret(self, ctx: StepContext) -> None:
        """R_T = (L̄_T − L_best) / time_T: L̄_T the running average loss, L_best the lowest step loss so far.

        (The minimum of the running average itself would make R_T ≡ 0 while the loss falls: uninformative.)
        """
        if math.isfinite(ctx.loss):
            self.loss_sum += ctx.loss
            self.n_losses += 1
            self.best_loss = min(self.best_loss, ctx.loss)
        avg = self.loss_sum / max(self.n_losses, 1)
        self.last_regret = (avg - self.best_loss) / max(ctx.elapsed, 1e-9) if self.n_losses else 0.0

    def log(self):
        return {**self.last, "regret": getattr(self, "last_regret", 0.0)}

    def state_dict(self):
        return {"planner": self.planner_checkpoint(), "h": self.h, "curv": self.curv.state_dict(),
                "readout_now": self.readout_now,
                "regret": [self.loss_sum, self.n_losses, self.best_loss]}

    def load_state_dict(self, state):
        self.net.load_state_dict(state["planner"]["net"])
        self.outer.load_state_dict(state["planner"]["outer"])
        self.h = state["h"]
        self.readout_now = state["readout_now"]
        self.curv.load_state_dict(state["curv"])
        self.loss_sum, self.n_losses, self.best_loss = state["regret"]


def per_token_jvp(lm: TokenLoss, batch: MicroBatch, tangents: dict[str, torch.Tensor]) -> torch.Tensor:
    """d_i = ⟨v, ∇_θ ℓ_i⟩ for every answer token i of `batch` at once: one forward-mode JVP, (n,), detached.

    θ are the trainable parameters, v = `tangents` (by parameter name).  Attention runs on the math kernel (the
    fused ones have no forward-mode derivative), in eval mode (no dropout: the derivative of the deterministic
    loss) and without the entropy probe.  Forward mode, because the method allows one backward pass of the
    model per step (SPEC §8).  Reverse-over-reverse (J v = ∂/∂u ⟨Jᵀu, v⟩) gives the same values with two more
    backward passes over these sequences; measured (bench/jvp_cost.py), it was 1.5x faster on 2 CPU cores,
    1.9x faster on one H100 machine and 5% slower on another (README, *Planner overhead*)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    primals = {name: q.detach() for name, q in lm.named_parameters() if q.requires_grad}
    was_training = lm.training
    lm.eval()
    probe, lm.probe_ids = lm.probe_ids, None
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            def losses(params):
                return torch.func.functional_call(lm, params, (batch.input_ids, batch.attention_mask,
                                                               batch.answer_mask), {"checkpoint_head": False})
            _, d = torch.func.jvp(losses, (primals,), (tangents,))
    finally:
        lm.probe_ids = probe
        lm.train(was_training)
    return d.detach()


def resolve_path(path: str, results_dir: Path | None) -> Path:
    """A relative planner checkpoint path lives under results_dir."""
    p = Path(path).expanduser()
    return p if p.is_absolute() or results_dir is None else Path(results_dir) / p


