"""The fast paths give what the plain ones give: the evaluation engines the same completions, a merged evaluation
the same weights afterwards, the gpu-fast preset's step layout the same losses, and a step one read from the
device (as far as the CPU shows it; bench/gpu_bench.py counts the synchronisations on a GPU)."""
import math
import os
import random
import sys

import pytest
import torch
from omegaconf import OmegaConf
from peft.tuners.tuners_utils import BaseTunerLayer

from src import train as tr
from src.main import ModelConfig, TrainingConfig
from src.model import StepContext, build_model, build_planner, compile_decoder_layers
from src.preprocess import STOP_STRINGS, Problem, PromptFormat, collate, generation_batches, gold_answer, \
    synthetic_problem
from src.train import EVAL_ENGINES, evaluation_mode, generate_and_score, optimiser_step
from tests.helpers import REPO, random_batch, training_cfg

CPU = torch.device("cpu")


def no_autocast():
    return torch.autocast(device_type="cpu", enabled=False)


def embedded(dtype="float32", checkpointing=False):
    """The embedded default's model (config/presets/tiny-synthetic.yaml's LoRA), with LoRA B drawn at random: as
    built, B = 0 and a merge would change nothing, so nothing about merging would be tested."""
    cfg = OmegaConf.structured(ModelConfig)
    cfg.name, cfg.parameter_count, cfg.dtype = "embedded", None, dtype
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 16, 32, 0.0
    cfg.lora.modules_to_save = ["embed_tokens", "lm_head"]
    torch.manual_seed(0)                                # LoRA A's initialisation
    loaded = build_model(cfg, checkpointing, CPU)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in loaded.peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return loaded


def problems(n=40):
    rng = random.Random(0)
    rows = [synthetic_problem(rng, 1 + i % 4) for i in range(n)]
    return [Problem(i, r["question"], r["answer"], gold_answer(r["answer"])) for i, r in enumerate(rows)]


def completions(loaded, probs, engine, max_new_tokens=24, batch_size=16):
    """The completion texts generate_and_score decoded, in the problems' order, and the generation settings used."""
    model, tokenizer = loaded.peft, loaded.tokenizer
    batches = generation_batches(PromptFormat(tokenizer), probs, batch_size, 256)
    texts, configs = [""] * len(probs), []
    decode, generate = tokenizer.batch_decode, model.generate

    def keep_texts(ids, **kw):
        out = decode(ids, **kw)
        keep_texts.batches.append(out)
        return out
    keep_texts.batches = []

    def keep_config(**kw):
        configs.append(kw["generation_config"])
        return generate(**kw)
    tokenizer.batch_decode, model.generate = keep_texts, keep_config
    try:
        model.eval()
        generate_and_score(model, tokenizer, batches, probs, max_new_tokens, no_autocast, engine)
    finally:
        model.train()
        del tokenizer.batch_decode, model.generate
    for (positions, _, _), out in zip(batches, keep_texts.batches):
        for pos, text in zip(positions, out):
            texts[pos] = text
    return texts, configs


# --- evaluation ---------------------------------------------------------------------------------------------------
def test_every_engine_gives_the_completions_of_generate_with_the_stop_strings():
    loaded, probs = embedded(), problems()
    reference, configs = completions(loaded, probs, "generate")
    assert configs and all(list(c.stop_strings) == list(STOP_STRINGS) for c in configs)
    assert len(set(reference)) > len(probs) // 2                  # varied texts, not one string repeated
    for engine in EVAL_ENGINES:
        texts, configs = completions(loaded, probs, engine)
        assert texts == reference, engine
        assert all(list(c.stop_strings) == list(STOP_STRINGS) for c in configs)
    assert configs[0].cache_implementation == "static"          # the last engine is the static one


def test_engines_agree_where_rows_stop_at_different_steps(monkeypatch):
    """Random weights rarely write GSM8K's stop strings; stop strings the model does write make its rows stop at
    different steps, which is where a batch's decoding could diverge (finished rows go on as padding)."""
    loaded, probs = embedded(), problems()
    monkeypatch.setattr(tr, "STOP_STRINGS", ("he", "ar", "ia"))
    reference, _ = completions(loaded, probs, "generate", max_new_tokens=32)
    lengths = [len(loaded.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in reference]
    assert sum(n < 32 for n in lengths) >= len(probs) // 3 and len(set(lengths)) >= 5     # stopped, at many steps
    for engine in ("merged", "static"):
        assert completions(loaded, probs, engine, max_new_tokens=32)[0] == reference, engine


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_merged_evaluation_leaves_every_weight_bit_identical(dtype):
    loaded = embedded(dtype)
    model = loaded.peft
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for engine in ("merged", "static"):
        completions(loaded, problems(8), engine, max_new_tokens=4)
        after = model.state_dict()
        assert before.keys() == after.keys()
        assert [k for k in before if not torch.equal(before[k], after[k])] == [], engine
        assert not any(m.merged for m in model.modules() if isinstance(m, BaseTunerLayer))
    if dtype == "bfloat16":   # why the copy is needed: peft's own unmerge does not give the same bits back
        model.merge_adapter()
        model.unmerge_adapter()
        assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_schedulefree_swaps_its_averaged_weights_in_around_a_merged_evaluation(make_planner):
    planner, optimizer, lm, params = make_planner("schedulefree")
    from tests.test_planners import run_steps
    run_steps(planner, optimizer, lm, params, 2)
    model = lm.core
    lora = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    class Tokenizer:
        eos_token_id = pad_token_id = 0

        def batch_decode(self, ids, skip_special_tokens=True):
            return ["#### 1"] * len(ids)

    def fake_generate(**kw):
        seen.append((optimizer.param_groups[0]["train_mode"], all(m.merged for m in lora)))
        return kw["input_ids"]

    model.generate = fake_generate
    batch = ([0], torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long))
    with evaluation_mode(model, planner):
        strict, _ = generate_and_score(model, Tokenizer(), [batch], [Problem(0, "q", "#### 1", "1")], 4, no_autocast,
                                       "merged")
    assert seen == [(False, True)]              # averaged weights in, merged, while generating
    assert optimizer.param_groups[0]["train_mode"] and not any(m.merged for m in lora)
    base = [k for k in weights if "lora_" not in k]         # the adapters are Schedule-Free's to swap back
    assert all(torch.equal(weights[k], model.state_dict()[k]) for k in base)
    assert strict == [True]


def test_an_unknown_engine_is_refused_in_one_line():
    from src.preprocess import UserError
    with pytest.raises(UserError, match="evaluation.engine=fastest"):
        generate_and_score(None, None, [], [], 4, no_autocast, "fastest")


# --- training -----------------------------------------------------------------------------------------------------
def preset(name):
    return OmegaConf.load(os.path.join(REPO, "config", "presets", f"{name}.yaml"))


def steps_of(training, sequences, compile_backend=None, n_steps=3):
    """Loss and gradient norm of each of `n_steps` steps of the constant planner on the same 64 sequences per step,
    cut into micro-batches as `training` says, on the embedded model built with its checkpointing."""
    loaded = embedded(checkpointing=training.gradient_checkpointing)
    if compile_backend:
        torch.compiler.reset()          # graphs of earlier tests do not count against torch's recompile limit
        compile_decoder_layers(loaded.peft, backend=compile_backend)
    cfg = training_cfg("constant", lr=3e-3)
    planner = build_planner(loaded.peft, cfg)
    micro = training.micro_batch_size
    out = []
    for step in range(n_steps):
        rows = sequences[step]
        batches = [collate(rows[i:i + micro], loaded.tokenizer.pad_token_id) for i in range(0, len(rows), micro)]
        ctx = StepContext(step=step, elapsed=0.0, budget_left=1.0, progress=0.0, steps_left=10.0)
        result = optimiser_step(planner, batches, CPU, no_autocast, training.clip_grad_norm, ctx)
        assert result.ok
        out += [result.loss, result.grad_norm]
    return out


def test_the_gpu_fast_presets_step_gives_the_default_steps_losses():
    """The default layout (8 micro-batches of 8, gradient checkpointing) against the gpu-fast preset's (one
    micro-batch of 64, no checkpointing) on the same sequences, through the same step function; its compiled decoder
    layers are the next test's.  The micro-batches pad differently and their losses sum in another order, so the
    values agree to float32 rounding, not bit for bit."""
    default = OmegaConf.structured(TrainingConfig)
    fast = OmegaConf.merge(default, preset("gpu-fast").training)
    assert fast.micro_batch_size * fast.gradient_accumulation_steps == default.global_batch_size == 64
    assert fast.compile_layers and not fast.gradient_checkpointing and default.gradient_checkpointing
    assert preset("gpu-fast").evaluation.engine in EVAL_ENGINES
    fmt = PromptFormat(embedded().tokenizer)
    examples = fmt.encode_examples(problems(64 * 3))
    random.Random(1).shuffle(examples)
    sequences = [examples[64 * s:64 * (s + 1)] for s in range(3)]
    assert steps_of(fast, sequences) == pytest.approx(steps_of(default, sequences), rel=2e-5)


def test_compiled_decoder_layers_give_the_same_losses_bit_for_bit():
    """training.compile_layers' code (compile_decoder_layers) with torch.compile's eager backend, which traces the
    layers as inductor does (graph breaks and guards included) but runs the traced graph without generating code,
    minutes faster on the CPU: the same losses and gradient norms, bit for bit, over sequences of three lengths."""
    sequences = [[(random_batch(n=1, length=14 - s % 3, vocab=400, seed=10 * s + i).input_ids[0].tolist(), 6)
                  for i in range(8)] for s in range(3)]
    training = OmegaConf.merge(OmegaConf.structured(TrainingConfig), {"micro_batch_size": 4,
                                                                      "gradient_accumulation_steps": 2})
    assert steps_of(training, sequences, compile_backend="eager") == steps_of(training, sequences)


def test_a_step_reads_from_the_device_once(make_planner, monkeypatch):
    """Every read of a tensor's value into Python (`.item()`, `.tolist()`, `float()`, `int()`, `bool()`) made by the
    project's code during a step of the constant planner: the one read of the loss and the gradient norm, and the
    token counts of the host batches; no clock synchronisation either."""
    planner, optimizer, lm, params = make_planner("constant")
    reads, syncs = [], []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        real = getattr(torch.Tensor, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            caller = sys._getframe(1).f_code
            if os.sep + "src" + os.sep in caller.co_filename:
                reads.append((os.path.basename(caller.co_filename), caller.co_name, _name))
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, spy)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(a))
    ctx = StepContext(step=0, elapsed=0.0, budget_left=1.0, progress=0.0, steps_left=10.0)
    result = optimiser_step(planner, [random_batch(seed=1), random_batch(seed=2)], CPU, no_autocast, 1.0, ctx)
    assert result.ok and math.isfinite(result.loss) and result.planner_s >= 0
    on_device = [r for r in reads if r[0] != "preprocess.py"]
    assert on_device == [("train.py", "optimiser_step", "tolist")]
    assert {r[1] for r in reads if r[0] == "preprocess.py"} <= {"n_answer_tokens", "n_tokens"}   # host batches
    assert syncs == []
