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
update direction (θ_{t+1} = θ_t − η_t·u_t), η_t the learning rate, b_t the training budget left (1 − progress),
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
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import nnls
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
    step: int = 0                    # the optimiser step t it belongs to


class Planner:
    """One interface for every learning-rate planner.  Per optimiser step t the loop calls, in order:

        needs_probe(step)     before step t's forwards: whether its tokens need the first-layer probe entropy
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
        self.cfg, self.opt_cfg = plain(cfg), opt_cfg
        self.token_loss, self.params, self.graph = token_loss, params, graph
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

    def needs_probe(self, step: int) -> bool:
        return self.uses_probe

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


def plain(settings) -> SimpleNamespace:
    """A planner's settings copied into a plain object (lists as lists): a planner reads them every step, and a
    read from an OmegaConf node costs about 15 µs (GRAFF reads about ten per step)."""
    items = settings.items() if hasattr(settings, "items") else vars(settings).items()
    return SimpleNamespace(**{k: list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v
                              for k, v in items})


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
EMBEDDED_VERSION = 2   # bump when the builder or its tokenizer corpus changes, so cached models are rebuilt
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


def build_model(model_cfg, gradient_checkpointing: bool, device: torch.device,
                compile_layers: bool = False) -> LoadedModel:
    """The base model (embedded, local folder or hub id) wrapped with PEFT LoRA on the configured projections;
    with `compile_layers` (training.compile_layers) each decoder layer is compiled (compile_decoder_layers)."""
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
    if compile_layers:
        compile_decoder_layers(model)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return LoadedModel(model, tokenizer, source, n_params, n_trainable)


def compile_decoder_layers(peft_model: nn.Module, backend: str = "inductor") -> None:
    """torch.compile every decoder layer in place (`nn.Module.compile`), its LoRA layers included.

    Per layer rather than the whole model: the layers share one code object, so one compiled graph serves all of
    them (their weights are its inputs), and what would break a whole-model graph (the masks, TokenLoss's
    answer-token selection and chunked LM head) stays eager around it.  Shapes are symbolic from the start
    (`dynamic=True`): micro-batches of every length (TrainStream buckets by length) share a graph, where static
    shapes would compile each length again.  Training makes two graphs: the first layer (whose input needs no
    gradient when the embeddings are frozen) and the others; the evaluation runs the layers eagerly (src/train.py,
    generate_and_score and mean_answer_loss).  The compilation happens in the first steps and is counted in the
    budget.  On an H100 the plain transformers + PEFT stack went from 35.4 k to 70.5 k tokens/s with this and a
    chunked LM head (the project's anchors); bench/gpu_bench.py measures this loop.  Not tried with GRAFF, whose
    forward-mode JVP (torch.func) runs the same layers.  `backend` is torch.compile's (the tests use "eager" on the
    CPU, where inductor's compilation is slow)."""
    for layer in peft_model.get_base_model().get_decoder().layers:
        layer.compile(backend=backend, dynamic=True)


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
        self._has_dropout: bool | None = None        # found at the first `deterministic` pass
        self._hook = self.core.model.layers[0].register_forward_hook(self._keep_layer0)

    def has_dropout(self) -> bool:
        """Whether a forward in training mode is random (a dropout module or attention dropout with p > 0)."""
        return any((isinstance(m, nn.Dropout) and m.p > 0) or float(getattr(m, "attention_dropout", 0) or 0) > 0
                   for m in self.core.modules())

    @contextmanager
    def deterministic(self):
        """Forward passes inside are deterministic: in eval mode where the model has dropout; where it has none the
        mode is left as it is (the same numbers; switching walks every module: 1.7 ms of the 13 ms that GRAFF's token
        products took on the embedded model)."""
        if self._has_dropout is None:
            self._has_dropout = self.has_dropout()
        was_training = self.training
        if self._has_dropout:
            self.eval()
        try:
            yield
        finally:
            if self._has_dropout:
                self.train(was_training)

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
        tokens: the full-vocabulary lens costs as much as the LM head itself (docs/method.md); the sub-vocabulary
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
def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors as one fp32 vector (P,), a copy.  The estimators below do their arithmetic on such vectors: a
    few operations per estimate instead of a few per parameter tensor (58 on the embedded model)."""
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def unflat(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A flat vector (P,) back as views shaped like `like`."""
    return [piece.view_as(p) for piece, p in zip(vector.split([p.numel() for p in like]), like)]


def flat_grads(params: Sequence[nn.Parameter]) -> torch.Tensor:
    """The gradients in .grad as one fp32 vector (P,), zeros where a parameter has none."""
    return flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])


@dataclass
class AdamView:
    """AdamW's state of a list of parameters as flat fp32 vectors (P,): the moments m (exp_avg) and v (exp_avg_sq),
    and per element its step count k and its group's β1, β2, ε and weight decay λ_wd (each a number where all
    parameters share it).  The vectors are read from the optimiser's state when first used, then kept: a view is
    a snapshot for one moment between two optimiser steps (the noise temperature and the committed direction share
    one; the curvature's denominator needs v alone)."""
    states: list[dict]
    k: torch.Tensor | float
    beta1: torch.Tensor | float
    beta2: torch.Tensor | float
    eps: torch.Tensor | float
    wd: torch.Tensor | float

    @cached_property
    def m(self) -> torch.Tensor:
        return flat([st["exp_avg"] for st in self.states])

    @cached_property
    def v(self) -> torch.Tensor:
        return flat([st["exp_avg_sq"] for st in self.states])

    @cached_property
    def v_hat(self) -> torch.Tensor:
        return self.v / (1 - self.beta2 ** self.k)

    @cached_property
    def preconditioner_inverse(self) -> torch.Tensor:
        """P⁻¹ = √v̂ + ε: the metric of AdamW's last step."""
        return self.v_hat.sqrt() + self.eps


def adam_view(params: Sequence[nn.Parameter], optimizer) -> AdamView | bool | None:
    """AdamW's state of `params`: an AdamView; None for an optimiser without Adam state (no `betas`, or none at
    all); False while a parameter has none yet (before its first step)."""
    if optimizer is None:
        return None
    groups = {id(q): g for g in optimizer.param_groups for q in g["params"]}
    if any("betas" not in groups.get(id(p), {}) or "eps" not in groups.get(id(p), {}) for p in params):
        return None
    states = [optimizer.state.get(p, {}) for p in params]
    if any("exp_avg" not in st or float(st["step"]) < 1 for st in states):
        return False
    def per_element(values):      # one number where every parameter has the same (the usual case: cheaper)
        if all(x == values[0] for x in values):
            return float(values[0])
        sizes = torch.tensor([p.numel() for p in params], device=params[0].device)
        return torch.tensor(values, dtype=torch.float32, device=params[0].device).repeat_interleave(sizes)

    settings = [groups[id(p)] for p in params]
    return AdamView(states=states, k=per_element([float(st["step"]) for st in states]),
                    beta1=per_element([g["betas"][0] for g in settings]),
                    beta2=per_element([g["betas"][1] for g in settings]),
                    eps=per_element([g["eps"] for g in settings]),
                    wd=per_element([g.get("weight_decay", 0.0) for g in settings]))


class UpdateCurvature:
    """Curvature along the optimiser's update, in the optimiser's own geometry, per block and in total (GRAFF and
    SALeLR; docs/method.md, "Curvature").

    The step is θ_{t+1} = θ_t − η_t·u_t, so the secant gives g_t − g_{t+1} ≈ η_t·H·u_t.  Dotted with a direction v_t
    and divided by the step's squared length in the preconditioner's metric:

        λ̂_t = ⟨g_t − g_{t+1}, v_t⟩ / (η_t · ⟨v_t, P⁻¹u_t⟩)  ≈  vᵀHu / vᵀP⁻¹u

    with P = AdamW's diagonal preconditioner 1/(√v̂_t + ε) of step t.  For v = u this is the Rayleigh quotient of the
    preconditioned Hessian P^½HP^½ along the step: the sharpness AdamW's stability is about (Cohen et al. 2022:
    adaptive methods are stable while η·λ_max(PH) < (2 + 2β1)/(1 − β1)).  The denominator is a squared length,
    positive whatever the loss does, so the estimate stays valid to the end of training.  (A quotient divided by
    the first-order progress ⟨g_t, v_t⟩ instead dies once momentum overshoots and that progress turns ≤ 0: measured
    after 44 steps in a 5-minute run.)

    v_t is the part of AdamW's step fixed before g_t arrived (momentum and weight decay, `committed_direction`), not
    u_t itself: g_t's mini-batch noise ξ_t is part of u_t, so ⟨g_t, u_t⟩ would carry +⟨ξ_t, (1−β1)Pξ_t⟩ that
    ⟨g_{t+1}, u_t⟩ does not, a bias toward 1/η that grows as noise dominates.  With v_t independent of ξ_t and of
    ξ_{t+1}, numerator and denominator are unbiased; with β1 = 0.9, v_t is 90% of the step.  Optimisers without Adam
    state use v = u and P = 1.  No estimate at the first step (no momentum yet).

    Single estimates are noisy (two mini-batches): `lam_max` is the ratio of EMAs EMA[num] / EMA[η·den] (`ema`),
    read as max(·, 0): each pair weighs in by the length of its step.  The numerator's mini-batch noise does not
    shrink with η, so a pair taken at a tiny η (the first steps of a warmup) carries almost only noise; dividing
    each pair's numerator by its η (EMA[num/η] / EMA[den]) blew that noise up ×1/η and let one warmup pair set λ̂
    for hundreds of steps (measured: 39,539 at step 2 of a 600-step run vs about 1,700 in the same run under a
    time budget, bench/RESULTS.md 2026-11-30).
    `hypergradient` = −⟨g_{t+1}, u_t⟩ = ∂L_{t+1}/∂η_t (exact for AdamW: decoupled decay).
    Cost per estimate: a copy of θ, u and v, and four dot products; no extra forward or backward pass."""

    def __init__(self, params: Sequence[nn.Parameter], owner: torch.Tensor, n_blocks: int, ema: float):
        self.params, self.n_blocks, self.ema = list(params), n_blocks, ema
        self.owner = owner.to(self.params[0].device)       # each parameter tensor's block
        self.sizes = [p.numel() for p in self.params]
        self.theta_t: torch.Tensor | None = None        # θ_t (P,), kept from before the step until the next one
        self.u: torch.Tensor | None = None              # u_t (P,)
        self.v: torch.Tensor | None = None              # v_t (P,)
        self.eta = 0.0                                  # η_t of the step u_t belongs to
        self.grad_scale = 1.0                           # the clipping factor of step t
        self.a_blocks: torch.Tensor | None = None       # ⟨g_t, v_t⟩ per block (g_t unclipped)
        self.den_blocks: torch.Tensor | None = None     # ⟨v_t, P⁻¹u_t⟩ per block
        self.lam_blocks = torch.zeros(n_blocks)         # latest per-block λ̂ (0 where unknown)
        self.lam = float("nan")                         # latest total λ̂ (one pair of steps)
        self.num_ema = self.den_ema = 0.0               # EMA[a − b], EMA[η·den]
        self.hypergradient = float("nan")               # −⟨g_{t+1}, u_t⟩ of the latest pair
        self.pair: tuple[float, float, float] | None = None   # (a, b, den) of the latest pair, in total
        self.p_inv: torch.Tensor | None = None          # P⁻¹ = √v̂ + ε after step t (None without Adam state)
        self.g_t: torch.Tensor | None = None            # g_t (P,), raw (before clipping)
        self.g_next: torch.Tensor | None = None         # g_{t+1} (P,) of the latest pair, raw
        self._v_next: torch.Tensor | bool | None = None
        self._optimizer = None

    def block_dots(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-block inner products Σ_{j∈block} x_j·y_j of flat vectors: (n_blocks,).  A dot per parameter tensor,
        then a sum per block (a scatter over all P elements at once is 4x slower on a CPU)."""
        per = torch.stack([torch.dot(a, b) for a, b in zip(x.split(self.sizes), y.split(self.sizes))])
        return torch.zeros(self.n_blocks, device=x.device).index_add_(0, self.owner, per)

    @property
    def lam_max(self) -> float:
        """λ̂ = max(EMA[a − b] / EMA[η·den], 0); 0 while unknown."""
        return max(self.num_ema / self.den_ema, 0.0) if self.den_ema > 1e-30 else 0.0

    @property
    def pending(self) -> bool:
        """A step's u_t is waiting for the next gradient."""
        return self.u is not None

    @torch.no_grad()
    def before_step(self, optimizer: torch.optim.Optimizer | None = None,
                    adam: AdamView | bool | None = None, grads: torch.Tensor | None = None) -> None:
        """Before the optimiser step t (raw g_t in .grad): keep θ_t, g_t and the committed direction v_t (`adam`:
        the optimiser's state now, `grads`: g_t flat, when the caller has read them already)."""
        self.g_t = grads if grads is not None else flat_grads(self.params)
        self.theta_t = flat(self.params)
        self._v_next = committed_direction(self.theta_t, adam if adam is not None else
                                           adam_view(self.params, optimizer))
        self._optimizer = optimizer

    @torch.no_grad()
    def after_step(self, eta: float, grad_scale: float) -> None:
        """After the optimiser step: u_t, a_t = ⟨g_t, v_t⟩ (g_t as kept by `before_step`, before clipping) and the
        denominator ⟨v_t, P⁻¹u_t⟩ with P the preconditioner step t used."""
        if self.theta_t is None or eta <= 0:
            return
        self.u = (self.theta_t - flat(self.params)) / eta
        if self._v_next is False:                       # the first AdamW step: no momentum, no estimate
            self.reset_pair()
            return
        self.v = self.u if self._v_next is None else self._v_next
        self.a_blocks = self.block_dots(self.g_t, self.v)            # g_t as it was before clipping
        view = adam_view(self.params, self._optimizer)
        self.p_inv = view.preconditioner_inverse if isinstance(view, AdamView) else None
        metric = self.u * self.p_inv if self.p_inv is not None else self.u
        self.den_blocks = self.block_dots(self.v, metric)
        self.eta, self.grad_scale = eta, grad_scale

    @torch.no_grad()
    def observe(self) -> bool:
        """After the backward of step t+1 (raw g_{t+1} in .grad): the estimate of the pair (t, t+1).  False when
        there is no pair to complete."""
        if self.u is None or self.a_blocks is None:
            return False
        grads = self.g_next = flat_grads(self.params)
        self.hypergradient = -float((grads * self.u).sum())
        b_blocks = self.block_dots(grads, self.v)
        num, den = self.a_blocks - b_blocks, self.den_blocks
        a, b, d = (float(x) for x in torch.stack([self.a_blocks.sum(), b_blocks.sum(), den.sum()]).tolist())
        self.pair = (a, b, d)
        valid = den > 1e-30
        self.lam_blocks = torch.where(valid, num / (self.eta * den.clamp(min=1e-30)), torch.zeros_like(den)).cpu()
        if d > 1e-30:
            self.lam = (a - b) / (self.eta * d)
            self.num_ema = self.ema * self.num_ema + (1 - self.ema) * (a - b)
            self.den_ema = self.ema * self.den_ema + (1 - self.ema) * self.eta * d
        self.u = self.v = self.a_blocks = self.den_blocks = None     # θ_t stays until the next before_step
        return True

    def preconditioned_next_gradient(self) -> torch.Tensor:
        """P g_{t+1}, flat (P,), of the latest pair: its raw gradient g_{t+1} times the preconditioner AdamW holds
        until step t+1 (read after step t), what `preconditioned_gradient` reads at t+1, without reading it again."""
        return self.g_next / self.p_inv if self.p_inv is not None else self.g_next

    def reset_pair(self) -> None:
        """Forget u_t (after a skipped step the next gradient no longer pairs with it)."""
        self.u, self.v, self.a_blocks, self.den_blocks = None, None, None, None

    def state_dict(self) -> dict:
        return {"num_ema": self.num_ema, "den_ema": self.den_ema, "lam": self.lam, "eta": self.eta}

    def load_state_dict(self, state: dict) -> None:
        self.num_ema, self.den_ema, self.lam, self.eta = (state["num_ema"], state["den_ema"], state["lam"],
                                                          state["eta"])


def committed_direction(theta: torch.Tensor, adam: AdamView | bool | None) -> torch.Tensor | bool | None:
    """The part of AdamW's coming update that does not depend on the coming gradient, flat (P,):
    β1·m_{t−1} / ((1−β1^k)(√v̂_{t−1} + ε)) + λ_wd·θ_t, with k the coming step's number.  None for an optimiser
    without Adam state (the caller then uses the update itself); False before AdamW's first step."""
    if not isinstance(adam, AdamView):
        return adam
    return adam.beta1 * adam.m / ((1 - adam.beta1 ** (adam.k + 1)) * adam.preconditioner_inverse) + adam.wd * theta


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
    as this project defines SALeLR, the rescaling is by the *inverse* sharpness (smaller steps where the loss is
    sharper).  λ̂_t is the curvature along the update shared with GRAFF (UpdateCurvature), smoothed by
    `curvature_ema`."""
    learning_paths = ("curvature",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        owner, n = _owner_index(self.graph, self.params)
        self.curv = UpdateCurvature(self.params, owner, n, self.cfg.curvature_ema)
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
# The method and every choice it leaves open are in docs/method.md; this section follows its notation.
GRAFF_FORMAT = "graff-planner-v4"   # v4: pre-trained with gradient clipping applied (v3 and before: not)
N_NODE_FEATURES = 5    # x_{t,i} = [η_t·λ̂_i / edge, H̄_t, b_t, log(b_t + ε_b), log(‖g_i‖ / mean_j ‖g_j‖)]
N_EDGE_FEATURES = 2    # e_ij = [x_i[0] − x_j[0], H̄_t]
N_TOKEN_FEATURES = 2   # φ_{t,i} = [z-scored probe entropy H_i, relative answer position − 1/2]
N_READOUT_EXTRA = 3    # r_t = [h̄_t; b_t; log(b_t + ε_b); 1]: the decoder sees the budget directly
BUDGET_EPS = 0.01      # ε_b: log(b + ε_b) stays finite at the end of the budget (b = 0)
FD_STEPS = 0.25        # the token products' finite-difference step δ = FD_STEPS·η_u (a quarter of a step's movement)
# The terminal update's safeguards, as measured on the noisy quadratic (docs/method.md, "The update rule"):
TRUST = 0.1            # one update changes log η(b) by at most this much anywhere over the remaining budget
KAPPA_RANGE = (0.0, 4.0)   # κ, the decay exponent: never a rise toward the end, never steeper than (b + ε)^4
RHO_RANGE = (-8.0, 8.0)    # ρ
MIN_STEPS = 20         # the forecast is refitted and followed from this step on (before: too little history)


def adam_edge(beta1: float) -> float:
    """AdamW's edge of stability on the preconditioned sharpness: η·λ_max(PH) < (2 + 2β1)/(1 − β1) (Cohen et al.
    2022).  GRAFF's guard η·λ̂ ≤ γ·edge/2 keeps the method's γ = 1.9 < 2 meaning "just inside the edge"."""
    return (2.0 + 2.0 * beta1) / (1.0 - beta1)


class GraffNet(nn.Module):
    """The planner's learnable part: the encoder and the decoder W.  No parameter depends on the number of nodes,
    so one checkpoint serves every model size (zero-shot transfer).

    Encoder (message passing, `rounds` rounds, then a GRU update of the persistent state):
        z⁰_i = tanh(A [x_i, h_i])                                          (N, D)
        z^{r+1}_i = z^r_i + mean_{j→i} tanh(M_r [z^r_i, z^r_j, e_ji])       with edges
        z^{r+1}_i = z^r_i + tanh(M_r [z^r_i, z^r_i, 0])                     without edges (ablation: per-node MLP)
        h_t = GRUCell(z^R, h_{t−1})                                        (N, D)
    Decoder: one linear map W ∈ R^{(1+K)×(D+3)} on r_t = [h̄_t; b_t; log(b_t + ε_b); 1] (h̄_t = mean_i h_{t,i}):
        log η_t = log lr_init + W_0 · r_t      — so η_t = lr_init·e^{c}·(b_t + ε_b)^κ·e^{ρ b_t}·e^{w_h·h̄_t}
        s_{t,i} = Σ_k φ_{t,i,k} · (W_k · r_t),   m_{t,i} = normalise(exp(2·tanh(s_{t,i}/2)))
    W_0's budget coefficients (ρ, κ) can express a decay to the end of the budget (κ > 0), a constant (0, 0) or
    a late rise; W starts at zero: η = lr_init and m ≡ 1 until the planner has learned otherwise."""

    def __init__(self, hidden: int, rounds: int, use_edges: bool):
        super().__init__()
        self.hidden, self.use_edges = hidden, use_edges
        self.inp = nn.Linear(N_NODE_FEATURES + hidden, hidden)
        self.rounds = nn.ModuleList(nn.Linear(2 * hidden + N_EDGE_FEATURES, hidden) for _ in range(rounds))
        self.gru = nn.GRUCell(hidden, hidden)
        self.W = nn.Parameter(torch.zeros(1 + N_TOKEN_FEATURES, hidden + N_READOUT_EXTRA))

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


def budget_features(b: float, use_budget: bool = True) -> list[float]:
    """[b, log(b + ε_b), 1]: the budget's part of the readout r, as numbers (both budget entries 0 without the
    budget feature, ablation b)."""
    return [b, math.log(b + BUDGET_EPS), 1.0] if use_budget else [0.0, 0.0, 1.0]


def readout(h_bar: torch.Tensor, budget_left, use_budget: bool = True) -> torch.Tensor:
    """r = [h̄; b; log(b + ε_b); 1]: (D+3,) for a number b, or (n, D+3) for a tensor of budget values b (n,)."""
    if not isinstance(budget_left, torch.Tensor):
        return torch.cat([h_bar, torch.tensor(budget_features(float(budget_left), use_budget), dtype=h_bar.dtype)])
    b = budget_left.to(h_bar.dtype)
    extra = torch.stack([b, torch.log(b + BUDGET_EPS)], -1) if use_budget else torch.zeros(*b.shape, 2,
                                                                                           dtype=h_bar.dtype)
    return torch.cat([h_bar.expand(b.shape[0], -1), extra, torch.ones(b.shape[0], 1, dtype=h_bar.dtype)], -1)


def log_lr_multiplier(r: torch.Tensor, w0: torch.Tensor, state_bound: float) -> torch.Tensor:
    """log(η/lr_init) before the slab and the guard: W_0's budget part [ρ, κ, c]·[b, log(b + ε_b), 1] (the learned
    budget schedule) plus its state part W_0[:D]·h̄ clamped to ±`state_bound` (soft_clamp): the run's state moves
    η within a factor e^{±state_bound} of the schedule, so a pre-trained W whose state part meets states it never
    saw cannot send η to the slab's edge.  r is (D+3,) or (n, D+3); linear in W_0 inside the band."""
    w0 = w0.to(r.dtype)
    return r[..., -3:] @ w0[-3:] + soft_clamp(r[..., :-3] @ w0[:-3], -state_bound, state_bound)


def log_lr_multiplier_value(r: list[float], w0: list[float], state_bound: float) -> float:
    """`log_lr_multiplier` in plain numbers (r and W_0 as lists): a step that needs no gradient computes η in a few
    µs instead of about twenty tensor operations."""
    state = sum(x * w for x, w in zip(r[:-3], w0[:-3]))
    return sum(x * w for x, w in zip(r[-3:], w0[-3:])) + min(max(state, -state_bound), state_bound)


def token_multipliers(coeffs: torch.Tensor, phi: torch.Tensor, bound: float) -> torch.Tensor:
    """m_i = normalise(exp(β·tanh(s_i/β))) with s_i = φ_i · coeffs and β = `bound`: (n,), mean 1 over `phi`'s
    tokens, each within a factor e^{2β} of the others (bounded so that no token can take over the loss)."""
    s = phi @ coeffs
    return normalise_weights(torch.exp(bound * torch.tanh(s / bound)))


# -- GRAFF's forecast of the loss at the end of the budget (docs/method.md, "The forecast model") ----------------
# Designed and measured on a noisy quadratic (bench/noisy_quadratic.py, bench/results/noisy_quadratic.txt).
def momentum_moments(a: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Stationary moments of one coordinate of momentum SGD on a unit quadratic (curvature 1, preconditioner 1,
    gradient-noise variance 1, step a = ηκ):  m_t = β m_{t−1} + (1−β)(x_t + ξ_t),  x_{t+1} = x_t − a m_t.
    Returns (r, G): r = E[x²] relative to plain SGD's a/(2 − a); G = E[m_t²], so that the stationary one-step
    hypergradient of a mode with noise injection n is η·n·G.  β = 0: r = 1, G = 2/(2 − a); β = 0.9: G ≈ 0.053.
    Solves the 2×2 discrete Lyapunov equation Σ = AΣAᵀ + bbᵀ of the state (x_t, m_{t−1}) exactly (3 unknowns),
    elementwise in a."""
    a = np.asarray(a, dtype=np.float64)
    if beta == 0.0:
        return np.ones_like(a), 2.0 / (2.0 - a)
    b1 = 1.0 - beta
    A11, A12, A21, A22 = 1.0 - a * b1, -a * beta, b1 * np.ones_like(a), beta * np.ones_like(a)
    B1, B2 = -a * b1, b1 * np.ones_like(a)
    M = np.zeros(a.shape + (3, 3))                    # unknowns S11, S12, S22 of S = A S Aᵀ + b bᵀ
    M[..., 0, 0], M[..., 0, 1], M[..., 0, 2] = 1 - A11 * A11, -2 * A11 * A12, -A12 * A12
    M[..., 1, 0], M[..., 1, 1], M[..., 1, 2] = -A11 * A21, 1 - (A11 * A22 + A12 * A21), -A12 * A22
    M[..., 2, 0], M[..., 2, 1], M[..., 2, 2] = -A21 * A21, -2 * A21 * A22, 1 - A22 * A22
    rhs = np.stack([B1 * B1, B1 * B2, B2 * B2], -1)
    S11, S12, S22 = np.moveaxis(np.linalg.solve(M, rhs[..., None])[..., 0], -1, 0)
    Em2 = b1 * b1 * S11 + 2 * b1 * beta * S12 + beta * beta * S22 + b1 * b1
    return S11 / (a / (2.0 - a)), Em2


class TrajectoryForecast:
    """Online fit of the few-mode surrogate and its differentiable terminal-loss forecast (module docstring).

    observe(step, eta, loss, hypergrad=None, temperature=None)
        after step `step` ran with LR `eta`: `loss` is the mini-batch loss measured at θ_step (before the step);
        `temperature` T = Σ_i (v̂_i − m̂_i²)/(√v̂_i + ε) from the optimiser's moments (None if unknown);
        `hypergrad` the measured ∂ℓ_step/∂η_{step−1} = −⟨g_step, u_{step−1}⟩ (None if unknown; used only with
        use_hypergrad=True).  One call per step, in order.
    refit() -> dict            refit θ on the whole history; diagnostics (chi2 ≈ 1 for a fit within the noise)
    terminal_loss(eta_future)  L̂_T (0-d tensor) for the LRs of the remaining steps (1-D tensor, any length ≥ 1),
                               differentiable in eta_future; valid after a refit with `ready` True
    ready                      a fit exists, is finite and its loss residuals are < max_chi2 × the noise

    Knobs: eta_ref (the LR scale the curvature grid is built around: the run's η_0), horizon (steps the budget
    is expected to buy; only sets the grid and buffer sizes), n_modes, span (η_ref·κ range), bin, ridge,
    tau_beta (β of the EMA behind m̂ in T), tau_rel (relative error assumed for the floor rows), momentum (β1 of
    the optimiser, for the hypergradient rows), use_tau, use_hypergrad, hg_weight, max_chi2.
    History is kept in numpy buffers (O(K) work per step); only the forecast is torch."""

    def __init__(self, eta_ref: float, horizon: int, n_modes: int = 16, span: tuple[float, float] | None = None,
                 bin: int = 5, ridge: float = 1e-4, use_tau: bool = True, tau_beta: float = 0.9,
                 tau_rel: float = 0.1, use_hypergrad: bool = False, momentum: float = 0.0, hg_weight: float = 1.0,
                 max_chi2: float = 25.0):
        self.eta_ref, self.horizon, self.bin, self.ridge = float(eta_ref), int(horizon), int(bin), float(ridge)
        self.use_tau, self.c_tau, self.tau_rel = use_tau, (1.0 - tau_beta) / (1.0 + tau_beta), float(tau_rel)
        self.use_hypergrad, self.momentum, self.hg_weight = use_hypergrad, float(momentum), float(hg_weight)
        self.max_chi2 = float(max_chi2)
        lo, hi = span if span is not None else (0.1 / max(horizon, 1), 1.0)
        self.kappa_np = np.logspace(math.log10(lo), math.log10(hi), n_modes) / self.eta_ref
        self.kappa = torch.from_numpy(self.kappa_np.copy())
        self.K = K = n_modes
        self._a_tab = np.logspace(-7, math.log10(1.95), 400)          # r(a), G(a) tabulated over a = ηκ
        self._r_tab, self._G_tab = momentum_moments(self._a_tab, self.momentum)
        self._log_a_tab = np.log(self._a_tab)
        self.phi, self.psi = np.ones(K), np.zeros(K)                   # Φ(τ), Ψ(τ) of the step about to run
        cap = max(horizon, 16) + 1
        self.PHI, self.PSI = np.zeros((cap, K)), np.zeros((cap, K))   # per step τ: Φ(τ), Ψ(τ)
        self.ETA = np.zeros(cap)                                       # η_τ
        self.LOSS, self.TAU, self.HG = (np.full(cap, np.nan) for _ in range(3))   # ℓ_τ, T_τ, ∂ℓ_{τ+1}/∂η_τ
        self.n = 0
        self.theta_np: np.ndarray | None = None                        # (1 + 2K,): L∞, a, n
        self.theta: torch.Tensor | None = None
        self.ready = False
        self.diag: dict[str, float] = {}

    # -- history --------------------------------------------------------------------------------------------
    def _grow(self) -> None:
        for name in ("PHI", "PSI", "ETA", "LOSS", "TAU", "HG"):
            a = getattr(self, name)
            setattr(self, name, np.concatenate([a, np.full_like(a, 0.0 if name in ("PHI", "PSI", "ETA") else np.nan)]))

    def _r(self, a: np.ndarray) -> np.ndarray:
        return np.interp(np.log(np.clip(a, 1e-7, 1.95)), self._log_a_tab, self._r_tab)

    def _r_torch(self, a: torch.Tensor) -> torch.Tensor:
        """r(a) as a differentiable piecewise-linear interpolation in log a (1 for plain SGD)."""
        if self.momentum == 0.0:
            return torch.ones_like(a)
        lt = torch.from_numpy(np.log(self._a_tab))
        rt = torch.from_numpy(self._r_tab)
        la = torch.log(a.clamp(1e-7, 1.95))
        i = torch.searchsorted(lt, la.detach().contiguous()).clamp(1, lt.numel() - 1)
        w = (la - lt[i - 1]) / (lt[i] - lt[i - 1])
        return rt[i - 1] + w * (rt[i] - rt[i - 1])

    def _G(self, a: np.ndarray) -> np.ndarray:
        return np.interp(np.log(np.clip(a, 1e-7, 1.95)), self._log_a_tab, self._G_tab)

    def observe(self, step: int, eta: float, loss: float, hypergrad: float | None = None,
                temperature: float | None = None) -> None:
        i = self.n
        if i == self.PHI.shape[0]:
            self._grow()
        if hypergrad is not None and math.isfinite(hypergrad) and i > 0:
            self.HG[i - 1] = hypergrad
        self.PHI[i], self.PSI[i], self.ETA[i] = self.phi, self.psi, eta
        if math.isfinite(loss):
            self.LOSS[i] = loss
        if temperature is not None and math.isfinite(temperature) and temperature > 0:
            self.TAU[i] = temperature
        a = eta * self.kappa_np
        f = np.minimum((1.0 - a) ** 2, 1e3)                           # an unstable mode grows; bounded for numerics
        self.phi = np.minimum(f * self.phi, 1e30)
        self.psi = np.minimum(f * self.psi + eta * eta * self._r(a), 1e30)
        self.n = i + 1

    @property
    def n_obs(self) -> int:
        return self.n

    # -- fit ------------------------------------------------------------------------------------------------
    @staticmethod
    def _noise_level(y: np.ndarray) -> float:
        """Robust per-observation noise std from successive differences (the signal moves slowly)."""
        if y.size < 4:
            return float(np.abs(y).mean()) + 1e-12
        return float(1.4826 * np.median(np.abs(np.diff(y))) / math.sqrt(2.0)) + 1e-12

    def _bin(self, rows: np.ndarray, y: np.ndarray):
        """Means over bins of `bin` consecutive rows (the newest bin complete); per-bin weight √count."""
        n = (rows.shape[0] // self.bin) * self.bin
        if n == 0:
            return rows, y, np.ones(rows.shape[0])
        start = rows.shape[0] - n
        Ab = rows[start:].reshape(-1, self.bin, rows.shape[1]).mean(1)
        yb = y[start:].reshape(-1, self.bin).mean(1)
        return Ab, yb, np.full(Ab.shape[0], math.sqrt(self.bin))

    def refit(self) -> dict:
        """Non-negative least squares for θ = (L∞, a, n) over the binned rows of the whole history."""
        K, t = self.K, self.n
        self.ready = False
        ok = np.isfinite(self.LOSS[:t])
        if ok.sum() < 3 * self.bin:
            return {"ok": 0.0}
        k, eta = self.kappa_np, self.ETA[:t, None]
        A = np.concatenate([np.ones((t, 1)), self.PHI[:t], self.PSI[:t]], 1)
        blocks_A, blocks_y = [], []
        s_l = self._noise_level(self.LOSS[:t][ok])
        Ab, yb, c = self._bin(A[ok], self.LOSS[:t][ok])
        blocks_A.append(Ab * (c / s_l)[:, None])
        blocks_y.append(yb * c / s_l)
        n_loss = Ab.shape[0]
        a = eta * k
        e_eq = eta * self._r(a) / (k * np.maximum(2.0 - a, 1e-3))      # equilibrium content per unit n at η_τ
        okt = np.isfinite(self.TAU[:t])
        if self.use_tau and okt.sum() >= 3 * self.bin:
            F = np.concatenate([np.zeros((t, 1 + K)), e_eq], 1)[okt]
            yF = (self.ETA[:t] * self.TAU[:t] / (4.0 * (1.0 - self.c_tau)))[okt]
            Fb, fb, cf = self._bin(F, yF)
            wf = cf / (self.tau_rel * np.maximum(np.abs(fb), 1e-300))
            blocks_A.append(Fb * wf[:, None])
            blocks_y.append(fb * wf)
        okh = np.isfinite(self.HG[:t])
        if self.use_hypergrad and okh.sum() >= 3 * self.bin:
            lin = -2.0 * k * (1.0 - a)                                   # d/dη of (1 − ηκ)²
            H = np.concatenate([np.zeros((t, 1)), lin * self.PHI[:t], lin * (self.PSI[:t] - e_eq)
                                + eta * self._G(a)], 1)[okh]
            yH = self.HG[:t][okh]
            s_h = self._noise_level(yH)
            Hb, hb, ch = self._bin(H, yH)
            blocks_A.append(Hb * (self.hg_weight * ch / s_h)[:, None])
            blocks_y.append(hb * self.hg_weight * ch / s_h)
        M, rhs = np.concatenate(blocks_A), np.concatenate(blocks_y)
        scale = np.maximum(np.linalg.norm(M, axis=0), 1e-300)
        P = M.shape[1]
        Xs, rr = M / scale, rhs
        if self.ridge > 0:                                               # ridge on the normalised a, n (not L∞)
            Xs = np.concatenate([Xs, math.sqrt(self.ridge * M.shape[0]) * np.eye(P)[1:]])
            rr = np.concatenate([rhs, np.zeros(P - 1)])
        try:
            x, _ = nnls(Xs, rr, maxiter=50 * P)
        except (RuntimeError, ValueError):
            return {"ok": 0.0}
        theta = x / scale
        res = M @ theta - rhs
        chi2 = float((res[:n_loss] ** 2).mean())
        self.theta_np, self.theta = theta, torch.from_numpy(theta.copy())
        self.ready = bool(np.isfinite(theta).all()) and chi2 < self.max_chi2
        e_now = self.state().numpy()
        self.diag = {"ok": float(self.ready), "chi2": chi2, "L_inf": float(theta[0]),
                     "reducible": float(e_now.sum()), "floor_per_eta": float((theta[1 + K:] / k).sum() / 2),
                     "loss_noise": s_l}
        return self.diag

    def state(self) -> torch.Tensor:
        """e(t): the fitted loss share of every mode at the step about to run (K,)."""
        K = self.K
        return torch.from_numpy(self.theta_np[1:1 + K] * self.phi + self.theta_np[1 + K:] * self.psi)

    # -- forecast -------------------------------------------------------------------------------------------
    def terminal_loss(self, eta_future: torch.Tensor, from_start: bool = False) -> torch.Tensor:
        """L̂_T for LRs η_t..η_{T−1} of the remaining steps (1-D, any length ≥ 1): differentiable in eta_future.
        from_start: the LRs η_0..η_{T−1} of the whole episode instead, rolled out from the fitted start e(0) = a."""
        K = self.K
        L_inf, n = self.theta[0], self.theta[1 + K:]
        e = self.theta[1:1 + K] if from_start else self.state()
        eta = eta_future.reshape(-1, 1).to(torch.float64)
        a = eta * self.kappa
        logf = torch.log((1.0 - a) ** 2 + 1e-300)                              # (n_rem, K)
        total = logf.sum(0)
        after = total - logf.cumsum(0)                                          # Σ_{τ'>τ} log f_τ'
        # an unstable schedule (ηκ > 2 for long) gives a huge but finite forecast, never inf·0 = nan
        total, after = total.clamp(max=60.0), after.clamp(max=60.0)
        noise = (self._r_torch(a) * eta ** 2 * torch.exp(after)).sum(0)        # (K,)
        return L_inf + (e * torch.exp(total) + n * noise).sum()

    def predict_history(self) -> np.ndarray:
        """The fitted loss at every observed step (diagnostics)."""
        return np.concatenate([np.ones((self.n, 1)), self.PHI[:self.n], self.PSI[:self.n]], 1) @ self.theta_np

    def state_dict(self) -> dict:
        """Everything, for a checkpoint (arrays and scalars: the history is the forecast's state)."""
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)
        self._log_a_tab = np.log(self._a_tab)        # derived (and absent from checkpoints made before it was kept)


class _InwardClamp(torch.autograd.Function):
    """clamp(x, lo, hi) whose gradient passes where a descent step would move x back inside [lo, hi] (or x is
    inside or on the bound), and is 0 where it would push x further out.  A plain clamp has zero gradient outside,
    so a planner whose LR starts above the cap could never bring it down."""

    @staticmethod
    def forward(ctx, x, lo, hi):
        ctx.save_for_backward(x)
        ctx.lo, ctx.hi = lo, hi
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        inside = (x >= ctx.lo) & (x <= ctx.hi)
        inward = ((x > ctx.hi) & (g > 0)) | ((x < ctx.lo) & (g < 0))     # descent (−g) moves x toward [lo, hi]
        return torch.where(inside | inward, g, torch.zeros_like(g)), None, None


def soft_clamp(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """clamp(x, lo, hi) with the inward gradient of _InwardClamp."""
    return _InwardClamp.apply(x, lo, hi)


@dataclass
class TokenSample:
    """What an update step u keeps for the token-multiplier gradient at u+1: its first sequences and their token
    features, the features of the whole micro-batch they came from (the multipliers are normalised over it), and
    the answer tokens of the whole step (the loss's denominator)."""
    batch: MicroBatch                  # the sequences, on the device
    phi: torch.Tensor                  # (n_s, K) their token features
    phi_batch: torch.Tensor            # (n_mb, K) the whole micro-batch's features
    step_tokens: int = 1


@dataclass
class PendingUpdate:
    """What update step u leaves for the outer update at u+1."""
    h_bar: torch.Tensor                # h̄_u with its graph to the encoder
    eta: torch.Tensor                  # η_u with its graph (used by the greedy objective)
    readout: torch.Tensor              # r_u, detached (the token multipliers' input)
    tokens: TokenSample | None = None


class RegretMeter:
    """R_T = (L̄_T − L_best) / time_T, logged as planner/regret: L̄_T the running average loss, L_best the lowest
    step loss so far.  (The minimum of the running average itself would make R_T ≡ 0 while the loss falls.)"""

    def __init__(self):
        self.total, self.count, self.best = 0.0, 0, math.inf

    def add(self, loss: float) -> None:
        if math.isfinite(loss):
            self.total, self.count, self.best = self.total + loss, self.count + 1, min(self.best, loss)

    def value(self, elapsed: float) -> float:
        return (self.total / self.count - self.best) / max(elapsed, 1e-9) if self.count else 0.0


@register("graff")
class GRAFF(Planner):
    """GRAFF: a graph-recurrent, budget-aware, differentiable LR planner (docs/method.md).

    Every step: η_t = lr_init·exp(clamp(W_0·r_t)) from the latest state h̄ and the training budget left b_t (1 −
    progress: 0 where training ends, before the final evaluation's reserve), the state's part of W_0·r_t within
    ±`state_bound` of the budget's (log_lr_multiplier), clamped to the stability guard and the
    safety slab (with a linear warmup over the first `warmup_fraction` of the horizon, as every schedule here);
    token multipliers m_{t,i} from W_{1:K}·r_t and per-token features.
    Every `update_every` steps (an update step u, then u+1):
      u    the encoder runs (node features from the curvature, the probe entropy, the budget and the gradient
           norms) and updates h; the curvature pair (u, u+1) starts; the step's first sequences are kept.
           Steps u and u+1 are measurement steps: unweighted (m ≡ 1), so that the gradients the planner measures
           are those of the loss itself.
      u+1  the pair completes (λ̂, and the one-step hypergradient −⟨g_{u+1}, u_u⟩); the outer update: Adam
           (`outer_lr`) on W and the encoder against
             objective=terminal  the forecast loss at the end of the budget L̂_T: a model of the run's own loss
                                 trajectory, refitted to its history, rolled out with the planner's own η(b)
                                 and differentiated (the compute-normalised regret R_T = (L_T − L_best)/T has
                                 the same gradient up to 1/T, which Adam's normalisation removes); span=episode
                                 rolls out the whole episode from the fitted start, its past steps re-planned
                                 under W with the state each had (what trains η at the start of a budget),
                                 span=remaining only the budget left, from the run's current state
             objective=greedy    the next step's loss (∂L_{u+1}/∂η_u = −⟨g_{u+1}, u_u⟩ through η_u's graph): the
                                 one-step hypergradient, kept as the ablation `ablation-greedy`
           plus, for the token rows, −η_u⟨P g_{u+1}, ∇ℓ_{u,i}⟩ by central differences on the kept sequences (at
           every `token_every`-th update: between them W_{1:K} gets no gradient).
    h_t is a plain tensor carried across steps (never a parameter); its gradient is truncated at one update.
    With `freeze` W and the encoder never change (the guard still clamps η); with `token_multipliers: false`
    m ≡ 1 at every step and W_{1:K} is neither used nor trained (the ablation `ablation-uniform`)."""
    uses_probe = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        c = self.cfg
        self.learning_paths = ("curvature",) if c.freeze else \
            ("curvature", "outer") + (("token_gradient",) if c.token_multipliers else ()) + \
            (("forecast",) if c.objective == "terminal" else ())
        self.activity = {path: 0 for path in self.learning_paths}
        self.net = GraffNet(c.hidden_dim, c.gnn_rounds, c.use_edges)
        self.outer = torch.optim.Adam(self.net.parameters(), lr=c.outer_lr)
        owner, n = _owner_index(self.graph, self.params)
        self.curv = UpdateCurvature(self.params, owner, n, c.curvature_ema)
        self.edge = adam_edge(float(self.opt_cfg.betas[0]))
        self.regret = RegretMeter()
        self.start_episode()
        self.pretraining: dict = {}
        if c.warm_start_ckpt:
            self.load_planner(resolve_path(c.warm_start_ckpt, self.results_dir))

    def start_episode(self) -> None:
        """Forget the run being planned (state, measurements, forecast); keep W, the encoder and Adam's moments."""
        self.h = torch.zeros(self.graph.n_nodes, self.cfg.hidden_dim)     # h_t: state, not a parameter
        self.h_bar = torch.zeros(self.cfg.hidden_dim)                    # mean_i h_{t,i}, detached
        self.curv.reset_pair()
        self.curv.num_ema = self.curv.den_ema = 0.0
        self.forecast: TrajectoryForecast | None = None               # made at the first step (needs the horizon)
        self.past: list[torch.Tensor] = []     # per step of the episode: [r_t; warmup_t; lo_t; hi_t] (D + 6,)
        self.pending: PendingUpdate | None = None
        self.sample: TokenSample | None = None
        self.readout_now = readout(self.h_bar, 1.0, self.cfg.use_budget)
        self.entropy_sum, self.step_tokens = torch.zeros(()), 0
        self.m_last: torch.Tensor | None = None      # the last m_{t,i} applied (n,), detached: its std is logged
        self.last: dict[str, float] = {}

    # -- checkpoints of the planner alone (warm start and transfer) --------------------------------------------
    def planner_checkpoint(self) -> dict:
        return {"format": GRAFF_FORMAT, "hidden_dim": self.cfg.hidden_dim, "gnn_rounds": self.cfg.gnn_rounds,
                "net": self.net.state_dict(), "outer": self.outer.state_dict(), "n_nodes": self.graph.n_nodes,
                "pretraining": self.pretraining}

    def load_planner(self, path: Path) -> None:
        if not path.is_file():
            raise UserError(f"GRAFF warm-start checkpoint {path} does not exist: give an existing file, the file "
                            f"name a pretrain-… run saves (it is then produced), or null to start cold")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            raise UserError(f"GRAFF warm-start checkpoint {path} is unreadable (truncated or corrupted): delete it "
                            f"(a file name under the cache is then produced again) or give another") from None
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
        self.pretraining = dict(state.get("pretraining") or {})

    def finish(self, results_dir):
        if self.cfg.save_ckpt:
            path = resolve_path(self.cfg.save_ckpt, results_dir)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.planner_checkpoint(), path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)

    # -- which steps do what -----------------------------------------------------------------------------------
    def is_update_step(self, step: int) -> bool:
        """Update steps u = 1, 1 + k, 1 + 2k, ... (step 0 has no optimiser momentum to measure with)."""
        return step >= 1 and (step - 1) % self.cfg.update_every == 0

    def is_token_update(self, step: int) -> bool:
        """An update step whose kept sequences give the token products: every `token_every`-th update (u = 1, then
        1 + token_every·k, ...), and only where something learns from them."""
        return (self.is_update_step(step) and (step - 1) // self.cfg.update_every % self.cfg.token_every == 0
                and not self.cfg.freeze and self.cfg.token_sequences > 0)

    def is_measurement_step(self, step: int) -> bool:
        """u and u + 1: run with m ≡ 1, so the planner measures gradients of the loss itself."""
        return self.is_update_step(step) or self.is_update_step(step - 1)

    def needs_probe(self, step: int) -> bool:
        """The entropy is read at u (the encoder's mean entropy, the kept tokens' features) and on weighted steps
        (the features of m_{t,i}); at u + 1, and between updates when m ≡ 1, nothing reads it."""
        return self.is_update_step(step) or (self.cfg.token_multipliers and not self.is_measurement_step(step))

    # -- token multipliers (forward of step t) -------------------------------------------------------------------
    def token_features(self, tokens: TokenBatch) -> torch.Tensor:
        """φ (n, K): z-scored probe entropy and centred relative position (both dimensionless), on the device."""
        ent = tokens.entropy.float() if tokens.entropy is not None else torch.zeros_like(tokens.losses)
        z = (ent - ent.mean()) / ent.std().clamp(min=1e-6) if ent.numel() > 1 else torch.zeros_like(ent)
        return torch.stack([z, tokens.position.float() - 0.5], -1)

    def weigh_tokens(self, tokens):
        if tokens.entropy is not None:
            self.entropy_sum = self.entropy_sum.to(tokens.entropy.device) + tokens.entropy.float().sum()
        self.step_tokens += tokens.losses.numel()
        if not self.cfg.token_multipliers:                             # ablation (e): m ≡ 1 at every step
            return None
        if self.is_measurement_step(tokens.step):
            if tokens.index == 0 and self.is_token_update(tokens.step):
                phi = self.token_features(tokens)
                keep = min(self.cfg.token_sequences, tokens.batch.input_ids.shape[0])
                sub = tokens.batch.select(slice(0, keep))
                self.sample = TokenSample(sub, phi[:sub.n_answer_tokens].detach(), phi.detach())
            return None                                              # a measurement step: m ≡ 1
        coeffs = (self.net.W[1:].detach() @ self.readout_now).to(tokens.losses.device)
        m = token_multipliers(coeffs, self.token_features(tokens), self.cfg.token_bound)
        self.m_last = m.detach()                         # its spread is read at the next update step, not here
        return m

    # -- after the backward of step t (raw g_t in .grad) ------------------------------------------------------
    def plan(self, ctx):
        t, c = ctx.step, self.cfg
        self.regret.add(ctx.loss)
        b_t = 1.0 - ctx.progress      # the training budget left: 0 where training ends (the final evaluation follows)
        outer_norm = None
        if c.objective == "terminal" and self.forecast is None:
            beta1 = float(self.opt_cfg.betas[0])
            self.forecast = TrajectoryForecast(self.lr_init, max(int(t + ctx.steps_left), 16), tau_beta=beta1,
                                               momentum=beta1)
        if self.curv.pending and self.curv.observe():                # the pair (u, u+1): λ̂ and the hypergradient
            self.activity["curvature"] += 1
            if self.pending is not None and not c.freeze:
                outer_norm = self.outer_update(ctx, b_t)
        self.pending = None
        update = self.is_update_step(t)
        x_grads = None
        if update:                                                    # the encoder runs, h moves
            x_grads = flat_grads(self.params)                         # g_t (P,), raw: the node features and λ̂ read it
            x = self.node_features(ctx, b_t, x_grads)
            h = self.net.encode(self.h, x, self.graph.edges, self.edge_features(x))
            h_bar = h.mean(0)
            self.h, self.h_bar = h.detach(), h_bar.detach()
            self.last.update(entropy_mean=float(x[0, 1]), h_norm=float(self.h.norm()))
            if self.m_last is not None and self.m_last.numel() > 1:   # the spread of the last weighted m_{t,i}
                self.last["m_std"] = float(self.m_last.std())
        adam = adam_view(self.params, self.optimizer) if update else None     # AdamW's state before step t
        lo, hi = self.eta_bounds()
        warmup = max(min(1.0, ctx.progress / c.warmup_fraction) if c.warmup_fraction > 0 else 1.0, MIN_MULTIPLIER)
        # η_t = lr_init·warmup·exp(clamp(W_0·r_t)), r_t = [h̄_t; b_t; log(b_t + ε_b); 1], the state part of W_0·r_t
        # in its band.  At an update step with its graph to W and the encoder (the greedy objective differentiates
        # η_u); elsewhere nothing reads a graph, so in plain numbers (the same formula).
        row = self.h_bar.tolist() + budget_features(b_t, c.use_budget)                    # r_t (D+3)
        if update and not c.freeze and torch.is_grad_enabled():
            log_mult_t = log_lr_multiplier(readout(h_bar, b_t, c.use_budget), self.net.W[0], c.state_bound)
            eta = self.lr_init * warmup * torch.exp(soft_clamp(log_mult_t, lo, hi))
            log_mult, self.eta = float(log_mult_t.detach()), float(eta.detach())
        else:
            log_mult = log_lr_multiplier_value(row, self.net.W[0].detach().tolist(), c.state_bound)
            self.eta = self.lr_init * warmup * math.exp(min(max(log_mult, lo), hi))
            eta = torch.tensor(self.eta) if update else None          # (frozen: no graph to keep)
        self.readout_now = torch.tensor(row)                   # r_t: the token multipliers' input until the next plan
        if self.forecast is not None:                                 # the run's own history, every step
            temperature = noise_temperature(adam) if update else None
            self.forecast.observe(t, self.eta, ctx.loss, temperature=temperature)
            self.past.append(torch.tensor(row + [warmup, lo, hi], dtype=torch.float64))
        if update:
            self.pending = PendingUpdate(h_bar, eta, self.readout_now, self.sample)
            if self.sample is not None:
                self.sample.step_tokens = max(self.step_tokens, 1)
            self.curv.before_step(self.optimizer, adam, grads=x_grads)
        self.sample, self.entropy_sum, self.step_tokens = None, torch.zeros(()), 0
        lam = self.curv.lam_max
        self.last.update(eta=self.eta, lambda_max=lam, lambda_raw=self.curv.lam, budget_left=b_t,
                         eta_lambda_over_edge=self.eta * lam / self.edge, regret=self.regret.value(ctx.elapsed),
                         guard_binds=float(log_mult > hi))
        if update or outer_norm is not None or "w_norm" not in self.last:    # W or h̄ moved: the decoder's log
            W0 = self.net.W[0].detach()
            self.last.update(w_budget_rho=float(W0[-3]), w_budget_kappa=float(W0[-2]), w_bias=float(W0[-1]),
                             eta_state=float(self.readout_now[:-3] @ W0[:-3]), w_norm=float(self.net.W.detach().norm()))
        if outer_norm is not None:
            self.last["outer_grad_norm"] = outer_norm
        return self.eta

    def after_step(self, ctx):
        if self.is_update_step(ctx.step):
            self.curv.after_step(self.eta, ctx.grad_scale)

    def on_bad_step(self):
        self.curv.reset_pair()
        self.pending, self.sample = None, None
        self.entropy_sum, self.step_tokens = torch.zeros(()), 0

    def node_features(self, ctx: StepContext, b_t: float, g: torch.Tensor) -> torch.Tensor:
        """x_t (N, 5): per-block stability ratio η·λ̂_i/edge, mean probe entropy H̄_t, b_t and log(b_t + ε_b), and
        the per-block relative gradient norm (g = g_t flat, raw)."""
        n = self.graph.n_nodes
        stability = (self.curv.eta * self.curv.lam_blocks / self.edge).clamp(-5, 5)
        ent = float(self.entropy_sum) / max(self.step_tokens, 1)                  # H̄_t in [0, 1]
        with torch.no_grad():
            norms = self.curv.block_dots(g, g).sqrt()                                # ‖g_i‖ per block (N,)
        rel = torch.log(norms.clamp(min=1e-12) / norms.mean().clamp(min=1e-12)).clamp(-5, 5).cpu()
        budget = [b_t, math.log(b_t + BUDGET_EPS)] if self.cfg.use_budget else [0.0, 0.0]
        return torch.stack([stability.float(), torch.full((n,), ent), torch.full((n,), budget[0]),
                            torch.full((n,), budget[1]), rel.float()], -1)

    def edge_features(self, x: torch.Tensor) -> torch.Tensor:
        src, dst = self.graph.edges
        return torch.stack([x[src, 0] - x[dst, 0], x[src, 1]], -1)

    def eta_bounds(self) -> tuple[float, float]:
        """Bounds on log(η/lr_init) = W_0·r: the safety slab `lr_mult_range` and the guard η·λ̂ ≤ γ·edge/2.  They
        clamp η every step (soft_clamp); W itself is never moved by them (docs/method.md, "The guard")."""
        lo, hi = (math.log(v) for v in self.cfg.lr_mult_range)
        lam = self.curv.lam_max
        if lam > 0:
            hi = min(hi, math.log(self.cfg.stability_guard * self.edge / 2 / (lam * self.lr_init)) - 1e-4)
            lo = min(lo, hi)    # the guard wins over the safety floor
        return lo, hi

    # -- the outer update (at u+1) ----------------------------------------------------------------------------
    def outer_update(self, ctx: StepContext, b_now: float) -> float:
        """Adam step on W and the encoder from the objective's gradient (class docstring); returns its norm."""
        p, c = self.pending, self.cfg
        objective = torch.zeros((), dtype=torch.float64)
        future_b = None
        if c.objective == "terminal":
            if ctx.step >= MIN_STEPS and self.forecast.refit().get("ok") and self.forecast.ready:
                future_b = self.future_budget(ctx, b_now)
                future = self.future_etas(p.h_bar, future_b)
                if c.span == "episode" and self.past:      # the whole episode, re-planned under W
                    forecast = self.forecast.terminal_loss(torch.cat([self.past_etas(), future]), from_start=True)
                else:
                    forecast = self.forecast.terminal_loss(future)
                reducible = max(float(forecast.detach()) - float(self.forecast.theta[0]), 1e-300)
                objective = objective + forecast / reducible              # scale-free (Adam is too, nearly)
                self.activity["forecast"] += 1
                self.last.update(forecast_final_loss=float(forecast.detach()),
                                 forecast_irreducible=float(self.forecast.theta[0]))
        else:                                                          # greedy: ∂L_{u+1}/∂η_u = −⟨g_{u+1}, u_u⟩
            objective = objective + self.curv.hypergradient * p.eta
        if p.tokens is not None and p.tokens.phi.numel():
            coeffs = self.token_coefficients(p.tokens)                # ∂L_{u+1}/∂m_{u,i} (n_s,)
            m = token_multipliers(self.net.W[1:] @ p.readout, p.tokens.phi_batch.cpu(),
                                  c.token_bound)[: coeffs.numel()]
            scale = p.tokens.phi_batch.shape[0] / max(coeffs.numel(), 1)          # the sample stands for its batch
            objective = objective + scale * (coeffs * m).sum()
            self.activity["token_gradient"] += 1
        if not objective.requires_grad:
            return 0.0
        self.outer.zero_grad()
        objective.backward()
        norm = float(torch.sqrt(sum((q.grad ** 2).sum() for q in self.net.parameters() if q.grad is not None)))
        if math.isfinite(norm):
            w_old = self.net.W[0].detach().clone()
            self.outer.step()
            self.activity["outer"] += 1
            if future_b is not None:
                self.keep_in_trust_region(w_old, p.h_bar.detach(), future_b)
        return norm

    @torch.no_grad()
    def keep_in_trust_region(self, w_old: torch.Tensor, h_bar: torch.Tensor, future_b: torch.Tensor) -> None:
        """After a terminal update: scale W_0's change so that log η(b) moves by at most TRUST over the remaining
        budget (and, with span=episode, over the steps the episode has run), and keep κ and ρ in their ranges (the
        forecast is a model: follow it slowly)."""
        dw = self.net.W[0] - w_old
        change = float((readout(h_bar, future_b, self.cfg.use_budget) @ dw).abs().max())
        if self.cfg.span == "episode" and self.past:
            change = max(change, float((torch.stack(self.past)[:, :-3].float() @ dw).abs().max()))
        if change > TRUST:
            dw *= TRUST / change
        w_new = w_old + dw
        w_new[-3].clamp_(*RHO_RANGE)
        w_new[-2].clamp_(*KAPPA_RANGE)
        self.net.W[0].copy_(w_new)

    @staticmethod
    def future_budget(ctx: StepContext, b_now: float) -> torch.Tensor:
        """b at this and every remaining step of the training horizon: falling linearly from b_now to 0 (the
        horizon's end) over ctx.steps_left steps."""
        n = max(int(round(ctx.steps_left)), 1)
        return torch.linspace(b_now, 0.0, n, dtype=torch.float64)

    def past_etas(self) -> torch.Tensor:
        """η at every step of the episode so far, re-planned under the current W (differentiable in W_0), each
        with the state h̄, the budget, the warmup and the bounds that step had."""
        past = torch.stack(self.past)
        r, warmup, lo, hi = past[:, :-3], past[:, -3], past[:, -2], past[:, -1]
        log_mult = log_lr_multiplier(r, self.net.W[0].double(), self.cfg.state_bound)
        return self.lr_init * warmup * torch.exp(soft_clamp(log_mult, lo, hi))

    def future_etas(self, h_bar: torch.Tensor, future_b: torch.Tensor) -> torch.Tensor:
        """η at those budget values under the current W (differentiable in W and h̄), clamped to the slab and the
        guard as every step's η is (a clamp that lets a gradient back inside pass: soft_clamp)."""
        lo, hi = self.eta_bounds()
        log_mult = log_lr_multiplier(readout(h_bar.double(), future_b, self.cfg.use_budget), self.net.W[0].double(),
                                     self.cfg.state_bound)
        return self.lr_init * torch.exp(soft_clamp(log_mult, lo, hi))

    def token_coefficients(self, sample: TokenSample) -> torch.Tensor:
        """c_i = ∂L_{u+1}/∂m_{u,i} = −η_u·clip_u·⟨P g_{u+1}, ∇ℓ_{u,i}(θ_u)⟩ / n_u for the kept tokens: (n_s,), by
        central differences of the per-token losses at θ_u ± δ·P g_{u+1} (two no-grad forwards of the kept
        sequences; `per_token_jvp` is the exact product the tests compare with)."""
        direction = self.curv.preconditioned_next_gradient()      # P g_{u+1}, kept by the pair (u, u+1)
        d = finite_difference_jvp(self.token_loss, self.params, self.curv.theta_t, direction, sample.batch,
                                  FD_STEPS * self.curv.eta)
        return (-self.curv.eta * self.curv.grad_scale * d / sample.step_tokens).float().cpu()[: sample.phi.shape[0]]

    def log(self):
        return dict(self.last)

    def state_dict(self):
        return {"planner": self.planner_checkpoint(), "h": self.h, "h_bar": self.h_bar,
                "past": torch.stack(self.past) if self.past else None,
                "curv": self.curv.state_dict(), "regret": vars(self.regret).copy(),
                "forecast": self.forecast.state_dict() if self.forecast is not None else None}

    def load_state_dict(self, state):
        self.net.load_state_dict(state["planner"]["net"])
        self.outer.load_state_dict(state["planner"]["outer"])
        self.h, self.h_bar = state["h"], state["h_bar"]
        self.past = list(state["past"].unbind(0)) if state.get("past") is not None else []
        self.curv.load_state_dict(state["curv"])
        vars(self.regret).update(state["regret"])
        if state["forecast"] is not None:
            self.forecast = TrajectoryForecast.__new__(TrajectoryForecast)
            self.forecast.load_state_dict(state["forecast"])


@torch.no_grad()
def noise_temperature(adam: AdamView | bool | None) -> float | None:
    """T = Σ_i (v̂_i − m̂_i²)/(√v̂_i + ε) from AdamW's moments (`adam_view`): the gradient-noise temperature whose
    η·T/(4(1 − c)) is the equilibrium noise floor of the loss at LR η (docs/method.md).  None before AdamW's first
    step."""
    if not isinstance(adam, AdamView):
        return None
    m_hat, v_hat = adam.m / (1 - adam.beta1 ** adam.k), adam.v_hat
    return float(((v_hat - m_hat * m_hat).clamp_(min=0) / adam.preconditioner_inverse).sum())


@torch.no_grad()
def preconditioned_gradient(params: Sequence[nn.Parameter], optimizer) -> torch.Tensor:
    """P g, flat (P,): the gradient in .grad times AdamW's diagonal preconditioner 1/(√v̂ + ε) (the gradient itself
    without Adam state)."""
    adam = adam_view(params, optimizer)
    g = flat_grads(params)
    return g / adam.preconditioner_inverse if isinstance(adam, AdamView) else g


@torch.no_grad()
def finite_difference_jvp(token_loss: TokenLoss, params: Sequence[nn.Parameter],
                          theta: torch.Tensor | Sequence[torch.Tensor], direction: torch.Tensor | Sequence[torch.Tensor],
                          batch: MicroBatch, delta: float) -> torch.Tensor:
    """d_i ≈ ⟨direction, ∇ℓ_i(θ)⟩ for every answer token i of `batch`: (ℓ_i(θ + δ·dir) − ℓ_i(θ − δ·dir)) / 2δ,
    two no-grad forwards without dropout (`TokenLoss.deterministic`).  θ and the direction are flat (P,) or shaped
    like `params`.  The parameters are restored bit for bit afterwards."""
    theta = theta if isinstance(theta, torch.Tensor) else flat(theta)
    direction = direction if isinstance(direction, torch.Tensor) else flat(direction)
    saved = [p.detach().clone() for p in params]
    try:
        out = []
        with token_loss.deterministic(), token_loss.no_probe():
            for sign in (1.0, -1.0):
                for p, piece in zip(params, unflat(theta + (sign * delta) * direction, params)):
                    p.copy_(piece)
                with torch.inference_mode():       # no autograd bookkeeping at all (no_grad keeps some): 10% faster
                    out.append(token_loss(batch.input_ids, batch.attention_mask, batch.answer_mask,
                                          checkpoint_head=False).double())
        return ((out[0] - out[1]) / (2.0 * delta)).float()
    finally:
        for p, s in zip(params, saved):
            p.copy_(s)


def per_token_jvp(lm: TokenLoss, batch: MicroBatch, tangents: dict[str, torch.Tensor]) -> torch.Tensor:
    """d_i = ⟨v, ∇_θ ℓ_i⟩ for every answer token i of `batch` at once: one forward-mode JVP, (n,), detached.

    θ are the trainable parameters, v = `tangents` (by parameter name).  Attention runs on the math kernel (the
    fused ones have no forward-mode derivative), without dropout (`TokenLoss.deterministic`: the derivative of
    the deterministic loss) and without the entropy probe.  GRAFF's first version computed this every step; it is now the exact
    reference that tests/test_graff.py and bench/token_gradient_cost.py compare `finite_difference_jvp` with."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    primals = {name: q.detach() for name, q in lm.named_parameters() if q.requires_grad}
    probe, lm.probe_ids = lm.probe_ids, None
    try:
        with sdpa_kernel([SDPBackend.MATH]), lm.deterministic():
            def losses(params):
                return torch.func.functional_call(lm, params, (batch.input_ids, batch.attention_mask,
                                                               batch.answer_mask), {"checkpoint_head": False})
            _, d = torch.func.jvp(losses, (primals,), (tangents,))
    finally:
        lm.probe_ids = probe
    return d.detach()


def resolve_path(path: str, results_dir: Path | None) -> Path:
    """A relative planner checkpoint path lives under results_dir."""
    p = Path(path).expanduser()
    return p if p.is_absolute() or results_dir is None else Path(results_dir) / p


