"""Data, prompts, batching and exact match (lm-evaluation-harness rules), on hand-written inputs."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from src.preprocess import (INVALID, STOP_STRINGS, Problem, PromptFormat, TrainStream, UserError, collate,
                            cut_at_stop, exact_match, extract_flexible, extract_strict, generation_batches,
                            gold_answer, normalise_answer, read_jsonl_problems, score_completions, synthetic_dir,
                            synthetic_problem, validate_row)


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
def test_synthetic_problems_are_gsm8k_format_and_correct():
    import random
    rng = random.Random(0)
    for difficulty in (1, 2, 3):
        for _ in range(200):
            row = synthetic_problem(rng, difficulty)
            lines = row["answer"].splitlines()
            assert len(lines) == difficulty + 1 and lines[-1].startswith("#### ")
            value = int(lines[-1][5:])
            assert value >= 0
            for line in lines[:-1]:                  # every line of working is true arithmetic
                left, result = line.split(" = ")
                assert eval(left) == int(result)    # noqa: S307 (trusted, generated here)
            assert int(lines[-2].split(" = ")[1]) == value


def test_synthetic_dir_is_deterministic_and_test_questions_are_unseen(tmp_path, monkeypatch):
    import src.preprocess as pre
    monkeypatch.setattr(pre, "CACHE_DIR", tmp_path)
    a = synthetic_dir(300, 50, 2, seed=7)
    b_text = (a / "train.jsonl").read_text()
    (a / "train.jsonl").unlink()
    assert (synthetic_dir(300, 50, 2, seed=7) / "train.jsonl").read_text() == b_text
    train = {json.loads(line)["question"] for line in b_text.splitlines()}
    test = {json.loads(line)["question"] for line in (a / "test.jsonl").read_text().splitlines()}
    assert len(test) == 50 and not (train & test)


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
           "max_tokens": 2048, "streaming": False, "shuffle_buffer": 100,
           "synthetic": {"difficulty": 1, "train_size": 200, "test_size": 20, "seed": 0}}
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
