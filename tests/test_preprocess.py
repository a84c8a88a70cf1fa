"""Data, prompts, batching and exact match (lm-evaluation-harness rules), on hand-written inputs."""
import json
import random
import re

import pytest
import torch
from omegaconf import OmegaConf

from src.preprocess import (GSM8K_MEAN_LENGTHS, INVALID, STOP_STRINGS, Problem, PromptFormat, TrainStream,
                            UserError, collate, cut_at_stop, exact_match, extract_flexible, extract_strict,
                            generation_batches, gold_answer, load_problems, normalise_answer, read_jsonl_problems,
                            score_completions, synthetic_corpus, synthetic_dir, synthetic_problem, synthetic_splits,
                            validate_row)


# --- exact match --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("completion, gold, strict, flexible", [
    ("She has 5 + 7 = 12 apples.\n#### 12", "12", True, True),
    ("Total is 1,234 dollars\n#### 1,234", "1234", True, True),          # commas ignored
    ("#### $18", "18", False, True),                                      # strict regex has no "$"; flexible ignores it
    ("The total is $18.", "18", False, True),                             # "$" and trailing "." ignored
    ("#### 18.", "18", True, True),                                       # trailing period ignored
    ("The temperature fell to -5 degrees.\n#### -5", "-5", True, True),   # negative
    ("#### 3.5", "3.5", True, True),                                      # decimal
    ("#### 3.50", "3.5", False, False),                                   # as in the harness: string comparison
    ("So the answer is 42.", "42", False, True),                          # no "####": strict fails, flexible finds
    ("I think 7, no wait, 9", "9", False, True),                          # flexible takes the last number
    ("#### 12\nThen 13 more", "12", True, False),                         # strict takes the first ####
    ("no numbers at all", "3", False, False),
    ("#### 1,000,000", "1000000", True, True),
    ("The answer is $2,500.00", "2500.00", False, True),
])
def test_exact_match_follows_the_harness(completion, gold, strict, flexible):
    assert exact_match(completion, normalise_answer(gold)) == (strict, flexible)


def test_extractors_on_edge_cases():
    assert extract_strict("no marker 12") == INVALID
    assert extract_flexible("nothing here") == INVALID
    assert extract_strict("#### -1,200.5") == "-1,200.5"
    assert extract_flexible("costs $1,200 in total") == "$1,200"



# A completion that runs on into a new question is cut at the harness's stop strings before either extraction.
RUN_ON = "2 + 3 = 5\n#### 5\n\nQuestion: Tom has 7 cards. How many?\nAnswer: 7 - 0 = 7\n#### 7"


@pytest.mark.parametrize("completion, gold, strict, flexible", [
    (RUN_ON, "5", True, True),                        # uncut, flexible would take the invented answer 7
    (RUN_ON, "7", False, False),                      # uncut, flexible would score the invented answer
    ("The answer is 5.\nQuestion: and 9?", "5", False, True),         # uncut flexible: 9
    ("#### 4<|im_end|>\n#### 9", "4", True, True),                   # uncut flexible: 9
    ("so 6 + 2 = 8</s>Question: 3 + 3 = 6", "8", False, True),        # uncut flexible: 6
    ("Question: 3 + 4 = 7\n#### 7", "7", False, False),              # nothing before the stop string
    ("#### 12\nThen 13 more", "12", True, False),                    # no stop string: unchanged
])
def test_scoring_cuts_at_the_harness_stop_strings(completion, gold, strict, flexible):
    problem = Problem(0, "q", f"#### {gold}", normalise_answer(gold))
    assert score_completions([completion], [problem]) == ([strict], [flexible])


def test_cut_at_stop_takes_the_first_stop_string():
    assert STOP_STRINGS == ("Question:", "</s>", "<|im_end|>")   # lm-evaluation-harness gsm8k v3.0 `until`
    assert cut_at_stop("a</s>b Question: c<|im_end|>") == "a"
    assert cut_at_stop("a<|im_end|>b</s>") == "a"
    assert cut_at_stop("no stop here") == "no stop here"
    assert cut_at_stop("Question: x") == ""


def test_gold_answer_of_gsm8k_solutions():
    assert gold_answer("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72") == "72"
    assert gold_answer("... #### 1,080") == "1080"
    assert gold_answer("no final answer") is None


def test_validate_row_names_the_problem():
    assert validate_row({"answer": "#### 1"}) == "missing or empty 'question'"
    assert validate_row({"question": "q"}) == "missing or empty 'answer'"
    assert "####" in validate_row({"question": "q", "answer": "just text"})
    assert isinstance(validate_row({"question": "q", "answer": "1 + 1 = 2\n#### 2"}), Problem)


def test_read_jsonl_refuses_a_bad_row_with_its_line(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n" + json.dumps({"question": "q2"}) + "\n")
    with pytest.raises(UserError, match=r"g.jsonl:2: missing or empty 'answer'"):
        read_jsonl_problems(path, "test")
    path.write_text("{not json\n")
    with pytest.raises(UserError, match=r"g.jsonl:1: not valid JSON"):
        read_jsonl_problems(path, "test")
    with pytest.raises(UserError, match="does not exist"):
        read_jsonl_problems(tmp_path / "missing.jsonl", "test")


# --- the synthetic task -------------------------------------------------------------------------------------------
ANNOTATED = re.compile(r"(\d+)([+-])(\d+)=<<(\d+)([+-])(\d+)=(\d+)>>(\d+)")


def _short_working(answer):
    """The running totals of a short-profile answer, checking each line's arithmetic."""
    lines = answer.splitlines()
    values = []
    for line in lines[:-1]:
        left, result = line.split(" = ")
        assert eval(left) == int(result)             # noqa: S307 (trusted, generated here)
        values.append(int(result))
    return lines, values


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4])
def test_synthetic_problems_are_gsm8k_format_and_correct(difficulty):
    rng = random.Random(difficulty)
    for _ in range(200):
        row = synthetic_problem(rng, difficulty)
        lines, values = _short_working(row["answer"])
        assert len(lines) == difficulty + 1 and lines[-1].startswith("#### ")
        assert int(lines[-1][5:]) == values[-1] >= 0
        top = 20 if difficulty == 1 else 50                # the largest operand
        assert all(v >= 0 for v in values) and max(values) <= top * (difficulty + 1)


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4])
def test_gsm8k_profile_has_the_same_arithmetic_in_gsm8k_form(difficulty):
    for seed in range(100):
        short = synthetic_problem(random.Random(seed), difficulty)
        long = synthetic_problem(random.Random(seed), difficulty, length_profile="gsm8k")
        assert gold_answer(long["answer"]) == gold_answer(short["answer"])     # the same problem, dressed
        steps = ANNOTATED.findall(long["answer"])
        assert len(steps) == difficulty
        for a, op, b, a2, op2, b2, c, c2 in steps:                             # calculator annotations are true
            assert (a, op, b, c) == (a2, op2, b2, c2) and eval(f"{a}{op}{b}") == int(c)   # noqa: S307
        assert int(steps[-1][-1]) == int(gold_answer(long["answer"]))
        assert long["answer"].splitlines()[-1].startswith("#### ")
        assert exact_match(long["answer"], gold_answer(short["answer"])) == (True, True)


def _difficulty(row):
    return len(row["answer"].splitlines()) - 1


def test_synthetic_splits_are_disjoint_sized_mixed_and_seeded():
    sizes = {"train": 2000, "validation": 200, "test": 400}
    splits = synthetic_splits(sizes, [1, 2, 3, 4], seed=5)
    assert {s: len(rows) for s, rows in splits.items()} == sizes
    questions = {s: [r["question"] for r in rows] for s, rows in splits.items()}
    for split, qs in questions.items():
        assert len(set(qs)) == len(qs), f"{split} repeats a question"
    train, val, test = (set(questions[s]) for s in ("train", "validation", "test"))
    assert not (train & val) and not (train & test) and not (val & test)
    for split, rows in splits.items():        # an even mix of 1 to 4 steps, in shuffled order
        counts = {d: sum(_difficulty(r) == d for r in rows) for d in (1, 2, 3, 4)}
        assert set(counts.values()) == {sizes[split] // 4}, (split, counts)
        assert [_difficulty(r) for r in rows[:8]] != [1, 2, 3, 4, 1, 2, 3, 4]
    assert synthetic_splits(sizes, [1, 2, 3, 4], seed=5) == splits
    other = synthetic_splits(sizes, [1, 2, 3, 4], seed=6)
    assert len(set(q["question"] for q in other["test"]) & test) < 20     # another seed: another test set
    # each split has its own stream: the training split does not depend on the sizes of the others
    smaller = synthetic_splits({"train": 2000, "validation": 10, "test": 10}, [1, 2, 3, 4], seed=5)
    assert smaller["train"] == splits["train"]


def test_synthetic_dir_writes_three_splits_once(tmp_path, monkeypatch):
    import src.preprocess as pre
    monkeypatch.setattr(pre, "CACHE_DIR", tmp_path)
    args = dict(train_size=300, validation_size=40, test_size=60, difficulties=[2, 3], seed=7)
    folder = synthetic_dir(**args)
    text = {s: (folder / f"{s}.jsonl").read_text() for s in ("train", "validation", "test")}
    assert [len(v.splitlines()) for v in text.values()] == [300, 40, 60]
    (folder / "train.jsonl").unlink()
    assert (synthetic_dir(**args) / "train.jsonl").read_text() == text["train"]
    assert synthetic_dir(**{**args, "length_profile": "gsm8k"}) != folder


@pytest.mark.parametrize("bad, message", [
    (dict(difficulties=[]), "difficulties"),
    (dict(difficulties=[0, 2]), "difficulties"),
    (dict(length_profile="long"), "length_profile"),
    (dict(test_size=0), "test split"),
])
def test_synthetic_settings_are_refused_with_the_key_named(tmp_path, monkeypatch, bad, message):
    import src.preprocess as pre
    monkeypatch.setattr(pre, "CACHE_DIR", tmp_path)
    args = {**dict(train_size=10, validation_size=2, test_size=2, difficulties=[1], seed=0), **bad}
    with pytest.raises(UserError, match=message):
        synthetic_dir(**args)


def test_gsm8k_length_profile_matches_gsm8k_mean_lengths():
    rows = synthetic_splits({"train": 1, "validation": 0, "test": 1000}, [1, 2, 3, 4], seed=0, length_profile="gsm8k")
    rows = rows["test"]
    measured = {"question_words": sum(len(r["question"].split()) for r in rows) / len(rows),
                "question_chars": sum(len(r["question"]) for r in rows) / len(rows),
                "answer_words": sum(len(r["answer"].split()) for r in rows) / len(rows),
                "answer_chars": sum(len(r["answer"]) for r in rows) / len(rows)}
    for key, target in GSM8K_MEAN_LENGTHS.items():
        assert abs(measured[key] / target - 1) <= 0.15, (key, measured[key], target)
    short = synthetic_splits({"train": 1, "validation": 0, "test": 1000}, [1, 2, 3, 4], seed=0)["test"]
    assert sum(len(r["question"].split()) for r in short) / 1000 < 0.6 * GSM8K_MEAN_LENGTHS["question_words"]


def test_tokenizer_corpus_covers_every_difficulty():
    corpus = synthetic_corpus(n=40, n_gsm8k=8)
    assert {text.count(" = ") for text in corpus[:40]} == {1, 2, 3, 4}
    assert {text.count("=<<") for text in corpus[40:]} == {1, 2, 3, 4}


# --- prompts and batches ------------------------------------------------------------------------------------------
class CharTokenizer:
    """A minimal tokenizer: one id per character (enough to check masks and padding)."""
    eos_token, pad_token_id, eos_token_id, chat_template = "$", 0, 1, None

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[2 + ord(c) % 200 for c in t.replace("$", "")] + [1] * t.count("$") for t in texts]}


def test_loss_mask_covers_exactly_the_answer_tokens():
    fmt = PromptFormat(CharTokenizer())
    rows = [Problem(0, "ab", "12\n#### 3", "3"), Problem(1, "abcdef", "1", "1")]
    encoded = fmt.encode_examples(rows)
    batch = collate(encoded, pad_id=0)
    for row, (seq, n_prompt) in enumerate(encoded):
        assert batch.answer_mask[row].sum() == len(seq) - n_prompt            # target tokens, eos included
        assert not batch.answer_mask[row, :n_prompt].any()                     # no loss on the prompt
        assert batch.attention_mask[row].sum() == len(seq)                     # padding is masked
        assert fmt.prompt_text(rows[row].question).startswith("Question: ")
    assert batch.n_answer_tokens == sum(len(s) - p for s, p in encoded)


def test_generation_batches_left_pad_and_keep_every_problem():
    fmt = PromptFormat(CharTokenizer())
    problems = [Problem(i, "q" * (i + 1), "#### 1", "1") for i in range(5)]
    batches = generation_batches(fmt, problems, batch_size=2, max_tokens=512)
    seen = sorted(p for positions, _, _ in batches for p in positions)
    assert seen == list(range(5))
    for _, ids, attn in batches:
        assert torch.all(attn[:, -1] == 1)                                     # left padding: last column is real
        assert torch.all(ids[attn == 0] == 0)


def _synthetic_cfg(**kw):
    cfg = {"name": "synthetic", "config_name": None, "train_split": "train", "eval_split": "test",
           "max_tokens": 2048, "streaming": False, "shuffle_buffer": 100, "validation_size": 20,
           "synthetic": {"difficulties": [1, 2], "train_size": 200, "test_size": 20, "seed": 0,
                         "length_profile": "short"}}
    cfg.update(kw)
    return OmegaConf.create(cfg)


@pytest.mark.parametrize("streaming", [False, True])
def test_train_stream_is_deterministic_and_resumable(streaming):
    fmt = PromptFormat(CharTokenizer())
    cfg = _synthetic_cfg(streaming=streaming)
    a = TrainStream(cfg, fmt, micro_batch=16, max_tokens=2048, seed=3, max_epochs=2, pool_batches=4)
    first = [a.next() for _ in range(20)]            # crosses into the second epoch (13 batches per epoch)
    assert a.epoch == 1
    b = TrainStream(cfg, fmt, micro_batch=16, max_tokens=2048, seed=3, max_epochs=2, pool_batches=4)
    b.skip_to({"epoch": 1, "served": 20 - 13})
    assert torch.equal(b.next().input_ids, a.next().input_ids)
    assert all(x is not None for x in first)


def test_train_stream_skips_and_counts_long_rows():
    fmt = PromptFormat(CharTokenizer())
    stream = TrainStream(_synthetic_cfg(), fmt, micro_batch=16, max_tokens=60, seed=0, max_epochs=1)
    n = 0
    while stream.next() is not None:
        n += 1
    assert stream.skipped_long > 0 and stream.skipped_bad == 0


# --- the validation split -----------------------------------------------------------------------------------------
class RecordingFormat(PromptFormat):
    """Records the question of every row TrainStream tokenises (every row it serves)."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.questions = []

    def encode_examples(self, rows):
        self.questions.extend(r.question for r in rows)
        return super().encode_examples(rows)


def _served(cfg, seed=0):
    fmt = RecordingFormat(CharTokenizer())
    stream = TrainStream(cfg, fmt, micro_batch=16, max_tokens=4096, seed=seed, max_epochs=1, pool_batches=4)
    while stream.next() is not None:
        pass
    return fmt.questions, stream


def _local_folder(folder, rows, validation=None):
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "test.jsonl").write_text(json.dumps(synthetic_problem(random.Random(99), 4)) + "\n")
    if validation is not None:
        (folder / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in validation))
    return folder


def test_synthetic_validation_split_is_generated_and_never_served():
    cfg = _synthetic_cfg()
    validation = load_problems(cfg, "validation")
    assert len(validation) == 20 and [p.index for p in validation] == list(range(20))
    served, stream = _served(cfg)
    test = {p.question for p in load_problems(cfg, "test")}
    val = {p.question for p in validation}
    assert len(served) == 200 and stream.skipped_validation == 0    # disjoint by construction: nothing skipped
    assert not (val & set(served)) and not (val & test)
    assert load_problems(cfg, "validation") == validation


@pytest.mark.parametrize("streaming", [False, True])
def test_validation_is_held_out_of_a_local_training_split(tmp_path, monkeypatch, streaming):
    import src.preprocess as pre
    monkeypatch.setattr(pre, "CACHE_DIR", tmp_path / "cache")
    rng = random.Random(3)
    rows = [synthetic_problem(rng, 1 + i % 4) for i in range(300)]
    rows.append(dict(rows[10]))                      # a repeated question: held out with every copy
    rows.append({"question": "bad row"})             # a bad row is never chosen
    cfg = _synthetic_cfg(name=str(_local_folder(tmp_path / "a", rows)), streaming=streaming, validation_size=30)
    validation = load_problems(cfg, "validation")
    assert len(validation) == 30 and len({p.question for p in validation}) == 30
    served, stream = _served(cfg)
    held = {p.question for p in validation}
    assert not (held & set(served))
    distinct = {r["question"] for r in rows if "answer" in r}
    assert set(served) | held == distinct            # everything else is served
    assert stream.skipped_validation == sum(r["question"] in held for r in rows if "answer" in r)
    assert stream.skipped_bad == 1
    # the same rows in another order (another folder) hold out the same problems, in the same order
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    other = _synthetic_cfg(name=str(_local_folder(tmp_path / "b", shuffled)), streaming=not streaming,
                           validation_size=30)
    assert load_problems(other, "validation") == validation
    # another run seed changes the training order, not the validation split
    assert set(_served(cfg, seed=1)[0]) == set(served)


def test_a_local_validation_file_is_used_and_nothing_is_held_out(tmp_path, monkeypatch):
    import src.preprocess as pre
    monkeypatch.setattr(pre, "CACHE_DIR", tmp_path / "cache")
    rng = random.Random(4)
    rows = [synthetic_problem(rng, 2) for _ in range(100)]
    own = [synthetic_problem(rng, 3) for _ in range(12)]
    cfg = _synthetic_cfg(name=str(_local_folder(tmp_path / "a", rows, validation=own)), validation_size=10)
    assert [p.question for p in load_problems(cfg, "validation")] == [r["question"] for r in own[:10]]
    served, stream = _served(cfg)
    assert len(served) == 100 and stream.skipped_validation == 0


def test_validation_sizes_that_cannot_work_are_refused(tmp_path, monkeypatch):
    import src.preprocess as pre
    monkeypatch.setattr(pre, "CACHE_DIR", tmp_path / "cache")
    rows = [synthetic_problem(random.Random(i), 1) for i in range(20)]
    folder = str(_local_folder(tmp_path / "a", rows))
    with pytest.raises(UserError, match="would hold out all"):
        load_problems(_synthetic_cfg(name=folder, validation_size=20), "validation")
    with pytest.raises(UserError, match="no validation split"):
        load_problems(_synthetic_cfg(name=folder, validation_size=0), "validation")
    served, stream = _served(_synthetic_cfg(name=folder, validation_size=0))
    assert len(served) == len({r["question"] for r in rows}) and stream.skipped_validation == 0
