#!/usr/bin/env bash
# What only a GPU can show, on the Qwen3-0.6B architecture, in one script (one call of a lent GPU machine).
#
#     bash bench/gpu_checks.sh            # from the repository root, on a machine with a CUDA GPU
#
# Runs with the python3 it finds (torch, transformers, peft); packages that python lacks can come as wheels in
# .whl/ (bench/README.md lists them), installed into /tmp/site first.  Writes into $OUT (default /tmp/gpu-checks):
# checks.log (everything printed), planner_overhead.gpu.json, token_gradient_cost.gpu.json, determinism.gpu.json,
# run_metrics.json (what src.evaluate wrote for the run) and run_record.tgz (the run's W&B offline record and
# src.evaluate's output).
#
#  1. bench/qwen3_shape.py: a local model folder with the Qwen3-0.6B architecture (random weights, the full
#     151,936-word vocabulary, tied embeddings).
#  2. bench/planner_overhead.py on it with the seed's training settings (proposed-iter1-Qwen3-0.6B-gsm8k:
#     micro-batch 8 x 8 accumulation = 64 sequences per optimiser step, bf16 autocast, gradient checkpointing)
#     on the synthetic GSM8K-format data: time per optimiser step and the share inside the planner.
#  3. The real CLI: a full run of proposed-iter1-Qwen3-0.6B-gsm8k on that model with a BUDGET_MIN-minute budget
#     (no search first: optuna.n_trials=0), W&B offline, then src.evaluate on it (tokens/s, peak memory, NVML
#     energy, evaluation time, as the pipeline reads them).
#  4. bench/token_gradient_cost.py: GRAFF's token-multiplier products (finite differences) against the exact JVP
#     and a no-grad forward, same model and data.
#  5. bench/determinism.py: the same steps twice (fixed LR and GRAFF), compared bit for bit.
# Each part has its own time limit, and one that fails does not stop the next.  Knobs (environment): OUT, PY,
# LAYERS (28), BUDGET_MIN (2), STEPS (4), WARMUP (2), PLANNERS, VARIANTS (0: GRAFF as configured only;
# 1: also with the greedy objective and one token sequence), PARTS (which of 2-5 to run, default "2 3 4 5"), EXTRA (more overrides for parts 2-5).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-checks}
PY=${PY:-python3}
LAYERS=${LAYERS:-28}
BUDGET_MIN=${BUDGET_MIN:-2}
STEPS=${STEPS:-4}
WARMUP=${WARMUP:-2}
PLANNERS=${PLANNERS:-constant,schedulefree,salelr,bats,reactor,graff}
EXTRA=${EXTRA:-}
VARIANTS=${VARIANTS:-0}
PARTS=${PARTS:-2 3 4 5}
RUN=proposed-iter1-Qwen3-0.6B-gsm8k
MODEL=.cache/qwen3-0.6b-shape
RESULTS=/tmp/gpu-checks-results
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
unset WANDB_API_KEY
mkdir -p "$OUT"

part() { echo; echo "=== $(date -u +%H:%M:%S) $*"; }

checks() {
part "0. environment"
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: none"
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed"; return 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# datasets >= 5 is built against pyarrow >= 24: where the JSON loader fails on the pyarrow found here, use the
# carried datasets 4.0 set (.whl/fallback) instead.
datasets_ok() {
    $PY - <<'EOF'
import json, os, tempfile
import datasets
d = tempfile.mkdtemp()
path = os.path.join(d, "t.jsonl")
open(path, "w").write(json.dumps({"question": "q", "answer": "a #### 1"}) + "\n")
assert datasets.load_dataset("json", data_files=path, split="train", cache_dir=d)[0]["question"] == "q"
assert next(iter(datasets.load_dataset("json", data_files=path, split="train", streaming=True)))["answer"]
print("datasets", datasets.__version__, "reads JSONL (map-style and streaming)")
EOF
}
if ! datasets_ok && compgen -G ".whl/fallback/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/fallback/*.whl && datasets_ok || echo "datasets cannot read JSONL here: parts 2-5 will fail"
fi
$PY - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "| cuda", torch.version.cuda, "|",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
for name in ["transformers", "peft", "datasets", "pyarrow", "wandb", "hydra", "omegaconf", "schedulefree", "pynvml"]:
    try:
        print(f"  {name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception as err:
        print(f"  {name}: {type(err).__name__}: {err}")
EOF

part "1. Qwen3-0.6B-shaped model folder ($LAYERS layers)"
timeout 300 $PY bench/qwen3_shape.py --out $MODEL --layers "$LAYERS"
Q="model.name=$MODEL dataset.name=synthetic $EXTRA"

want() { [[ " $PARTS " == *" $1 "* ]]; }

if want 2; then
part "2. planner overhead: $PLANNERS ($WARMUP warm-up + $STEPS timed steps each)"
# shellcheck disable=SC2086
timeout 240 $PY bench/planner_overhead.py --run $RUN --steps "$STEPS" --warmup "$WARMUP" --planners "$PLANNERS" \
    $([ "$VARIANTS" = 1 ] || echo --no-variants) --out "$OUT/planner_overhead.gpu.json" $Q
fi

if want 3; then
part "3. full run through the CLI, budget $BUDGET_MIN min, then src.evaluate"
rm -rf $RESULTS
# shellcheck disable=SC2086
timeout $((BUDGET_MIN * 60 + 150)) $PY -u -m src.main run=$RUN results_dir=$RESULTS mode=full $Q \
    training.budget_minutes="$BUDGET_MIN" training.scheduler.warm_start_ckpt=null optuna.n_trials=0
echo "exit $?"
timeout 120 $PY -m src.evaluate results_dir=$RESULTS "run_ids=[\"$RUN\"]"
echo "exit $?"
cp "$RESULTS/$RUN/metrics.json" "$OUT/run_metrics.json" 2>/dev/null
# the record without the checkpoint (adapters and optimiser state: hundreds of MB)
tar -czf "$OUT/run_record.tgz" -C $RESULTS --exclude='*.pt' --exclude='checkpoint*' . 2>/dev/null
fi

if want 4; then
part "4. GRAFF's token-multiplier products"
# shellcheck disable=SC2086
timeout 120 $PY bench/token_gradient_cost.py --run $RUN --repeats 10 --out "$OUT/token_gradient_cost.gpu.json" $Q
fi

if want 5; then
part "5. determinism: the same $STEPS steps twice"
# shellcheck disable=SC2086
timeout 120 $PY bench/determinism.py --run $RUN --steps "$STEPS" --out "$OUT/determinism.gpu.json" $Q
fi

part "done"
}

checks 2>&1 | tee "$OUT/checks.log"
ls -la "$OUT"
