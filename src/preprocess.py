"""Data: GSM8K and the embedded synthetic task, prompts, batching, answer extraction and exact match.

Sections
  1. Errors the user can fix (``UserError``)
  2. Answer extraction and exact match (lm-evaluation-harness rules, stop strings included)
  3. The embedded synthetic GSM8K-format task (train, validation and test splits; 1 to 4 steps; two lengths)
  4. Loading rows: hub datasets, local JSONL folders, the synthetic task; the validation split
  5. Prompts and tokenisation (loss on answer tokens only)
  6. Training stream: shuffling, length bucketing, micro-batches, resumable position, validation held out
  7. Evaluation problems and generation batches

Every data set, hub or local, is read through Hugging Face ``datasets`` (map-style or streaming), so the
embedded default exercises the same path as GSM8K.  Rows are validated one by one: a bad training row is
skipped and counted (the count is logged), a bad evaluation row is refused with its file and line named.
Three splits are used: training, validation (what a hyperparameter search selects on; never trained on) and the
evaluation split (``dataset.eval_split``, where the reported metric is measured).
"""
from __future__ import annotations

import hashlib
import heapq
import json
import math
import os
import random
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

if TYPE_CHECKING:   # torch is imported where it is used, so that the entry point reports config errors fast
    import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / ".cache"          # every data set and model is cached here
SYNTHETIC = "synthetic"                   # dataset.name of the embedded generator


# ----------------------------------------------------------------------------------------------------
# 1. Errors the user can fix
# ----------------------------------------------------------------------------------------------------
class UserError(Exception):
    """A problem with the user's input (config, files, network).  The entry points print its message as one
    line on stderr and exit non-zero, with no traceback.  The message names the problem and the fix."""


def route_warnings_to_stdout() -> None:
    """Print any Python warning as one line on stdout: stderr is for errors only (the pipeline fails a run on
    error text there), and a researcher still sees the warning."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {category.__name__}: {message} ({Path(filename).name}:{lineno})", flush=True)

    warnings.showwarning = show


def hub_reachable(host: str = "huggingface.co", timeout_s: float = 3.0) -> bool:
    """One TCP connect, so that a missing network fails in seconds instead of a long retry loop."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "")
    if endpoint:
        host = re.sub(r"^https?://", "", endpoint).split("/")[0].split(":")[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------------
# 2. Answer extraction and exact match
# ----------------------------------------------------------------------------------------------------
# The rules of lm-evaluation-harness's gsm8k task: "strict-match" takes the first "#### N"; "flexible-extract"
# takes the last number anywhere.  Both sides are compared as strings after removing ",", "$", everything up to
# "#### " and one trailing ".", ignoring case.  As in the harness, "18.00" and "18" are different answers.
STRICT_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_IGNORE_RES = [re.compile(r","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$")]
INVALID = "[invalid]"


def extract_strict(completion: str) -> str:
    """The number after the first '#### ' in a completion, or '[invalid]'."""
    match = STRICT_RE.search(completion)
    return match.group(1).strip() if match else INVALID


def extract_flexible(completion: str) -> str:
    """The last number in a completion (either alternative of the harness's regex), or '[invalid]'."""
    matches = FLEXIBLE_RE.findall(completion)
    if not matches:
        return INVALID
    groups = [g for g in matches[-1] if g]
    return groups[0].strip() if groups else INVALID


def normalise_answer(text: str) -> str:
    for pattern in _IGNORE_RES:
        text = pattern.sub("", text)
    return text.strip().lower()


def gold_answer(solution: str) -> str | None:
    """The normalised final answer of a GSM8K-format solution ('... #### 1,234' -> '1234'), or None."""
    if extract_strict(solution) == INVALID:
        return None
    answer = normalise_answer(solution)
    return answer or None


def exact_match(completion: str, gold: str) -> tuple[bool, bool]:
    """(strict, flexible) correctness of one completion against a normalised gold answer."""
    strict = extract_strict(completion)
    flexible = extract_flexible(completion)
    return (strict != INVALID and normalise_answer(strict) == gold,
            flexible != INVALID and normalise_answer(flexible) == gold)


# Generation stops where lm-evaluation-harness's gsm8k task (v3.0) stops it: at end-of-sequence or at one of its
# `until` strings.  A model that has learned the "Question: ... Answer: ..." format often runs on into a new
# question after its answer; the harness cuts the text at the first stop string before extracting, so the number
# of an invented follow-up question is never scored.  Generation itself may stop at EOS only; cutting here gives
# the same score either way.
STOP_STRINGS = ("Question:", "</s>", "<|im_end|>")


def cut_at_stop(completion: str, stops: Sequence[str] = STOP_STRINGS) -> str:
    """The completion up to (not including) the first occurrence of any stop string."""
    end = len(completion)
    for stop in stops:
        found = completion.find(stop)
        if found != -1:
            end = min(end, found)
    return completion[:end]


# ----------------------------------------------------------------------------------------------------
# 3. The embedded synthetic task
# ----------------------------------------------------------------------------------------------------
# Word problems in GSM8K form: a question, one line of working per step, then "#### N".  `difficulty` is the
# number of arithmetic steps (add or take away); numbers never go negative.  A 1-step problem uses numbers up to
# 20, a longer one operands up to 50 (so a 4-step answer is at most 250): small enough for a ~1 M-parameter model,
# while each step more is harder (shared/embedded-default.md: 1 step saturates within minutes, 2 steps does not),
# so a mix of 1 to 4 steps grades exact match at a budget instead of making it all-or-nothing.
#
# Two length profiles of the same arithmetic.  "short" is the bare problem (about 20 words of question, one line
# of working per step), which the embedded model learns on a CPU in minutes.  "gsm8k" dresses it to GSM8K's
# lengths, for speed measurements that should see the sequence lengths a real run sees: neutral sentences that
# change no count are added to the question, and each line of working becomes a sentence with GSM8K's calculator
# annotation ("12+5=<<12+5=17>>17"); the answer stays correct and ends in "#### N".
SYNTHETIC_VERSION = 2   # bump when the generator changes, so cached files are rebuilt
LENGTH_PROFILES = ("short", "gsm8k")
SYNTHETIC_SPLITS = ("train", "validation", "test")   # generated in this order; a later split drops repeats

# Mean lengths of GSM8K's test split (1,319 problems), measured on openai/grade-school-math's
# grade_school_math/data/test.jsonl: question 46.3 words (whitespace-separated) and 240 characters; solution
# 52.8 words and 293 characters, calculator annotations included (3.7 lines of working).  Long tails: 90th
# percentiles 70 and 89 words, 99th 102 and 141.  In Qwen3's tokenizer that is 61 and 124 tokens on average.
# The train split (7,473 problems) is within 3% of each figure.  The "gsm8k" profile is tuned to these means.
GSM8K_MEAN_LENGTHS = {"question_words": 46.3, "question_chars": 240.0, "answer_words": 52.8, "answer_chars": 293.0}

_NAMES = [("Max", "he"), ("Lena", "she"), ("Omar", "he"), ("Sofia", "she"), ("Ravi", "he"), ("Mia", "she"),
          ("Tom", "he"), ("Aiko", "she"), ("Ben", "he"), ("Nora", "she"), ("Ivan", "he"), ("Zoe", "she")]
_POSSESSIVE = {"he": "his", "she": "her"}
_OBJECTS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cards", "shells", "stamps", "cookies"]
# (present tense for the question, past tense for the gsm8k profile's working)
_GAIN = [("finds {n} more", "found {n} more"), ("buys {n} more", "bought {n} more"),
         ("gets {n} more", "got {n} more"), ("is given {n} more", "was given {n} more")]
_LOSE = [("loses {n}", "lost {n}"), ("gives away {n}", "gave away {n}"), ("sells {n}", "sold {n}"),
         ("uses {n}", "used {n}")]
# gsm8k profile: sentences that change no count and hold no number, so the answer is the short problem's
_QUESTION_FILLERS = [
    "{Name} lives with {poss} family in a small town near the river.",
    "{Pronoun} keeps all of the {thing} in a blue box under {poss} bed.",
    "{Poss} best friend from school also likes to collect {thing}.",
    "It was a bright and sunny {day} morning when all of this happened.",
    "{Name} always counts the {thing} very carefully before going to sleep.",
    "The {thing} are all roughly the same size and shape as each other.",
    "{Poss} family is planning a long trip to the seaside next summer.",
    "{Pronoun} would like to show the whole collection to {poss} teacher one day.",
    "Everyone in {poss} class at school has heard about the {thing} by now.",
    "{Name} writes everything down in a little green notebook.",
    "The small shop on the corner of {poss} street opens early on weekdays.",
    "{Pronoun} does not like to trade {thing} with anyone else in the neighbourhood.",
    "{Poss} grandmother gave {obj} the idea of starting the collection.",
    "On {day} the weather turned cold and rainy in the afternoon.",
]
# how many filler sentences a question gets: mostly a few, with a tail (GSM8K's questions vary widely in length)
_FILLER_COUNTS, _FILLER_WEIGHTS = (0, 1, 2, 3, 4, 5, 6, 7), (15, 27, 26, 16, 8, 5, 2, 1)
_ANSWER_ASIDES = [
    "The other details in the question do not change how many {thing} {pronoun} has.",
    "Only the {thing} that {pronoun} gains or gives up change the count.",
    "We keep track of the total after each change in turn.",
]
_ASIDE_PROBABILITY = 0.55
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


@dataclass(frozen=True)
class _Story:
    """One drawn problem before it is put into words: who, what, the start and each step (gain?, n, verbs)."""
    name: str
    pronoun: str
    thing: str
    start: int
    steps: tuple[tuple[bool, int, tuple[str, str]], ...]

    def values(self) -> list[int]:
        """The running total: start, then after each step."""
        out = [self.start]
        for gain, n, _ in self.steps:
            out.append(out[-1] + n if gain else out[-1] - n)
        return out


def _draw_story(rng: random.Random, difficulty: int) -> _Story:
    name, pronoun = rng.choice(_NAMES)
    thing = rng.choice(_OBJECTS)
    top = 20 if difficulty <= 1 else 50
    start = value = rng.randint(0, top)
    steps = []
    for _ in range(difficulty):
        gain = value == 0 or rng.random() < 0.5
        n = rng.randint(1, top) if gain else rng.randint(0, value)
        steps.append((gain, n, rng.choice(_GAIN if gain else _LOSE)))
        value = value + n if gain else value - n
    return _Story(name, pronoun, thing, start, tuple(steps))


def _short_text(story: _Story) -> dict:
    values = story.values()
    sentences = [f"{story.name} has {story.start} {story.thing}."]
    lines = []
    for i, (gain, n, (present, _)) in enumerate(story.steps):
        lead = story.pronoun.capitalize() if i == 0 else f"Then {story.pronoun}"
        sentences.append(f"{lead} {present.format(n=n)}.")
        lines.append(f"{values[i]} {'+' if gain else '-'} {n} = {values[i + 1]}")
    question = " ".join(sentences) + f" How many {story.thing} does {story.pronoun} have now?"
    return {"question": question, "answer": "\n".join(lines) + f"\n#### {values[-1]}"}


def _gsm8k_text(story: _Story, rng: random.Random) -> dict:
    values = story.values()
    words = {"Name": story.name, "Pronoun": story.pronoun.capitalize(), "pronoun": story.pronoun,
             "poss": _POSSESSIVE[story.pronoun], "Poss": _POSSESSIVE[story.pronoun].capitalize(),
             "obj": "him" if story.pronoun == "he" else "her", "thing": story.thing, "day": rng.choice(_DAYS)}
    sentences = [f"{story.name} has {story.start} {story.thing}."]
    for i, (_, n, (present, _)) in enumerate(story.steps):
        lead = story.pronoun.capitalize() if i == 0 else f"Then {story.pronoun}"
        sentences.append(f"{lead} {present.format(n=n)}.")
    k = rng.choices(_FILLER_COUNTS, weights=_FILLER_WEIGHTS)[0]
    for filler in rng.sample(_QUESTION_FILLERS, k):          # anywhere after the opening sentence
        sentences.insert(rng.randint(1, len(sentences)), filler.format(**words))
    question = " ".join(sentences) + f" How many {story.thing} does {story.name} have at the end?"
    lines = [f"{story.name} starts with {story.start} {story.thing}."]
    for i, (gain, n, (_, past)) in enumerate(story.steps):
        before, after, op = values[i], values[i + 1], "+" if gain else "-"
        lines.append(f"After {story.pronoun} {past.format(n=n)}, {story.pronoun} has {before}{op}{n}="
                     f"<<{before}{op}{n}={after}>>{after} {story.thing}" + ("." if gain else " left."))
        if rng.random() < _ASIDE_PROBABILITY:
            lines.append(rng.choice(_ANSWER_ASIDES).format(**words))
    lines.append(f"So {story.name} has {values[-1]} {story.thing} at the end.")
    return {"question": question, "answer": "\n".join(lines) + f"\n#### {values[-1]}"}


def _synthetic_row(rng: random.Random, difficulty: int, length_profile: str) -> tuple[str, dict]:
    """(identity, row): the identity is the short question, the same in both profiles, so that the gsm8k
    profile cannot put a training problem into the test split under different filler."""
    story = _draw_story(rng, difficulty)
    short = _short_text(story)
    return short["question"], (short if length_profile == "short" else _gsm8k_text(story, rng))


def synthetic_problem(rng: random.Random, difficulty: int, length_profile: str = "short") -> dict:
    """One {"question", "answer"} row of `difficulty` arithmetic steps."""
    return _synthetic_row(rng, difficulty, length_profile)[1]


def _check_synthetic(sizes: dict[str, int], difficulties: Sequence[int], length_profile: str) -> None:
    if not difficulties or any(not isinstance(d, int) or d < 1 for d in difficulties):
        raise UserError(f"dataset.synthetic.difficulties={list(difficulties)}: give a non-empty list of step "
                        f"counts ≥ 1, e.g. [1, 2, 3, 4]")
    if length_profile not in LENGTH_PROFILES:
        raise UserError(f"dataset.synthetic.length_profile={length_profile}: use one of {', '.join(LENGTH_PROFILES)}")
    for split, size in sizes.items():
        if size < (0 if split == "validation" else 1):
            raise UserError(f"the synthetic {split} split's size is {size}: give dataset.synthetic.{split}_size ≥ 1 "
                            f"and dataset.validation_size ≥ 0")


def synthetic_splits(sizes: dict[str, int], difficulties: Sequence[int], seed: int,
                     length_profile: str = "short") -> dict[str, list[dict]]:
    """The train, validation and test rows of the synthetic task, {split: rows}.

    Each split has its own RNG stream derived from `seed` (Python seeds a Random from a string through SHA-512,
    so the streams are the same on every machine and disjoint in practice).  Difficulties are mixed evenly:
    each split cycles through `difficulties` and shuffles that plan.  Splits are drawn in the order train,
    validation, test, and a problem already drawn (by its question, in any split) is drawn again, so each split
    has exactly its size and validation and test are unseen by training and disjoint from each other."""
    _check_synthetic(sizes, difficulties, length_profile)
    taken: set[str] = set()
    splits = {}
    for split in SYNTHETIC_SPLITS:
        rng = random.Random(f"graff-synthetic-{seed}-{split}")
        plan = [difficulties[i % len(difficulties)] for i in range(sizes[split])]
        rng.shuffle(plan)
        rows = []
        for difficulty in plan:
            for _ in range(1000):
                identity, row = _synthetic_row(rng, difficulty, length_profile)
                if identity not in taken:
                    break
            else:   # the space of distinct problems of this difficulty is (nearly) used up
                raise UserError(f"the synthetic task has too few distinct {difficulty}-step problems for the "
                                f"sizes asked; lower dataset.synthetic.train_size or add larger difficulties")
            taken.add(identity)
            rows.append(row)
        splits[split] = rows
    return splits


def synthetic_dir(*, train_size: int, validation_size: int, test_size: int, difficulties: Sequence[int],
                  seed: int, length_profile: str = "short") -> Path:
    """Write (once) and return a folder holding train.jsonl, validation.jsonl and test.jsonl of the synthetic
    task (see `synthetic_splits`)."""
    difficulties = [int(d) for d in difficulties]
    sizes = {"train": train_size, "validation": validation_size, "test": test_size}
    key = (f"v{SYNTHETIC_VERSION}-{length_profile}-d{'.'.join(map(str, difficulties))}-n{train_size}"
           f"-v{validation_size}-t{test_size}-s{seed}")
    folder = CACHE_DIR / "synthetic" / key
    if all((folder / f"{split}.jsonl").is_file() for split in SYNTHETIC_SPLITS):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in synthetic_splits(sizes, difficulties, seed, length_profile).items():
        tmp = folder / f"{split}.jsonl.{os.getpid()}.tmp"   # per process: two runs may build the same folder
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(folder / f"{split}.jsonl")
    return folder


def synthetic_corpus(n: int = 4000, n_gsm8k: int = 500, difficulties: Sequence[int] = (1, 2, 3, 4),
                     seed: int = 12345) -> list[str]:
    """Text for training the embedded tokenizer: `n` short-profile problems of every difficulty in turn, then
    `n_gsm8k` in the gsm8k profile.  The few gsm8k-profile problems teach the BPE the filler words, so that the
    gsm8k profile costs about as many tokens per answer as GSM8K does in Qwen3's tokenizer (a GPU speed measurement
    with the embedded tokenizer then sees realistic lengths), while a short problem gains only ~3% tokens."""
    rng = random.Random(seed)
    rows = [synthetic_problem(rng, difficulties[i % len(difficulties)]) for i in range(n)]
    rows += [synthetic_problem(rng, difficulties[i % len(difficulties)], "gsm8k") for i in range(n_gsm8k)]
    return [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows]


# ----------------------------------------------------------------------------------------------------
# 4. Loading rows
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    """One validated row.  `index` is its position in the split (stable order: paired tests rely on it)."""
    index: int
    question: str
    solution: str
    gold: str


def validate_row(row: dict) -> Problem | str:
    """A Problem, or the reason the row is unusable."""
    question, solution = row.get("question"), row.get("answer")
    if not isinstance(question, str) or not question.strip():
        return "missing or empty 'question'"
    if not isinstance(solution, str) or not solution.strip():
        return "missing or empty 'answer'"
    gold = gold_answer(solution)
    if gold is None:
        return "'answer' has no '#### N' final answer"
    return Problem(-1, question.strip(), solution.strip(), gold)


def read_jsonl_problems(path: Path, what: str) -> list[Problem]:
    """Read and validate a GSM8K-format JSONL file, refusing the first bad row by file and line."""
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist: give the path of a GSM8K-format JSONL file "
                        f"(one {{\"question\", \"answer\"}} object per line)")
    problems = []
    with path.open() as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{line_no}: not valid JSON ({err.msg}); fix or remove the line") from None
            checked = validate_row(row if isinstance(row, dict) else {})
            if isinstance(checked, str):
                raise UserError(f"{path}:{line_no}: {checked}; every row needs a 'question' and an 'answer' "
                                f"ending in '#### N'")
            problems.append(Problem(len(problems), checked.question, checked.solution, checked.gold))
    if not problems:
        raise UserError(f"{what} file {path} holds no rows; give a GSM8K-format JSONL file")
    return problems


def local_split_file(name: str, split: str) -> Path | None:
    """`dataset.name` may be a local folder holding `<split>.jsonl` files (GSM8K format)."""
    folder = Path(name).expanduser()
    if not folder.is_absolute():
        folder = (REPO_ROOT / folder) if (REPO_ROOT / folder).exists() else folder.resolve()
    if folder.is_dir():
        path = folder / f"{split}.jsonl"
        if not path.is_file():
            raise UserError(f"dataset folder {folder} has no {split}.jsonl; add it or change dataset.*_split")
        return path
    if folder.suffix == ".jsonl" or folder.exists():
        raise UserError(f"dataset.name={name} must be a hub name, '{SYNTHETIC}', or a folder holding "
                        f"<split>.jsonl files")
    return None


def dataset_source(ds_cfg) -> tuple[str, dict]:
    """Resolve dataset.name to arguments of datasets.load_dataset: ('json', {data_files}) or (hub name, {}).

    A local folder's validation.jsonl, where there is one, is listed as the split "validation"."""
    if ds_cfg.name == SYNTHETIC:
        syn = ds_cfg.synthetic
        folder = synthetic_dir(train_size=syn.train_size, validation_size=ds_cfg.validation_size,
                               test_size=syn.test_size, difficulties=syn.difficulties, seed=syn.seed,
                               length_profile=syn.length_profile)
        # an empty validation file (validation_size 0) is left out: the JSON builder cannot type an empty split
        splits = SYNTHETIC_SPLITS if ds_cfg.validation_size > 0 else ("train", "test")
        return "json", {"data_files": {s: str(folder / f"{s}.jsonl") for s in splits}}
    files = {}
    # Train split first, in a fixed order (a set would make the error message depend on hash seeding).
    for split in dict.fromkeys((ds_cfg.train_split, ds_cfg.eval_split)):
        path = local_split_file(ds_cfg.name, split)
        if path is not None:
            files[split] = str(path)
    if files:
        validation = Path(files[ds_cfg.train_split]).with_name(f"{VALIDATION}.jsonl")
        if validation.is_file():
            files.setdefault(VALIDATION, str(validation))
        return "json", {"data_files": files}
    return ds_cfg.name, {"name": ds_cfg.config_name}


def is_hub_name(name: str) -> bool:
    """True when a model or data set name can only come from the hub (not embedded, not a local path)."""
    return name not in (SYNTHETIC, "embedded") and not Path(name).expanduser().exists() \
        and not (REPO_ROOT / name).exists()


def prepare_hub_access(names: Sequence[str]) -> bool:
    """Probe the hub once, before transformers/datasets are imported, when any name needs it.

    Unreachable -> HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1, so cached hub files still load and anything
    else fails at once (no long retry loop).  Returns whether the hub is usable."""
    if not any(is_hub_name(n) for n in names):
        return False
    if hub_reachable():
        return True
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    return False


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1"


def load_rows(ds_cfg, split: str, streaming: bool):
    """A `datasets` Dataset (map-style) or IterableDataset (streaming) of raw rows, cached in .cache/."""
    import datasets
    datasets.disable_progress_bars()
    # CRITICAL, not ERROR: a file datasets cannot parse becomes our own one-line error below; datasets' logged copy
    # of it would be a second, multi-line message on stderr (its handler may even hold a stream closed since)
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    path, kwargs = dataset_source(ds_cfg)
    cache = str(CACHE_DIR / "datasets")
    if path != "json" and streaming and hub_offline():
        raise UserError(f"dataset.streaming=true reads '{path}' from the Hugging Face hub, which is unreachable: "
                        f"set dataset.streaming=false to use a cached copy, or run with network access")
    try:
        return datasets.load_dataset(path, split=split, streaming=streaming, cache_dir=cache, **kwargs)
    except Exception as err:
        if path == "json":
            if Path(kwargs["data_files"][split]).stat().st_size == 0:
                raise UserError(f"{kwargs['data_files'][split]} is empty: give a GSM8K-format JSONL file (one "
                                f"{{\"question\", \"answer\"}} object per line)") from None
            first = (str(err).splitlines() or [type(err).__name__])[0][:200]
            raise UserError(f"{kwargs['data_files'][split]}: not a readable GSM8K-format JSONL file ({first}); fix or "
                            f"replace it (one {{\"question\", \"answer\"}} object per line)") from None
        if path != "json" and hub_offline():
            raise UserError(f"data set '{path}' is not cached in {cache} and the Hugging Face hub is unreachable: "
                            f"run once with network access, or set dataset.name to a local folder of "
                            f"<split>.jsonl files") from None
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise UserError(f"could not load data set '{path}' split '{split}': {first}; check dataset.name, "
                        f"dataset.config_name and the split names") from None


def load_problems(ds_cfg, split: str, limit: int | None = None) -> list[Problem]:
    """All (or the first `limit`) problems of an evaluation split, in dataset order; a bad row is refused.

    The split "validation" is the project's validation split (see `validation_problems`), whatever the data set
    calls its splits."""
    if split == VALIDATION:
        problems = validation_problems(ds_cfg)
        return problems[:limit] if limit else problems
    path, kwargs = dataset_source(ds_cfg)
    if path == "json":   # local file: validate with file and line named
        problems = read_jsonl_problems(Path(kwargs["data_files"][split]), f"{split} split")
        return problems[:limit] if limit else problems
    rows = load_rows(ds_cfg, split, streaming=False)
    problems = []
    for index, row in enumerate(rows):
        checked = validate_row(row)
        if isinstance(checked, str):
            raise UserError(f"{ds_cfg.name} split '{split}' row {index}: {checked}")
        problems.append(Problem(index, checked.question, checked.solution, checked.gold))
        if limit and len(problems) >= limit:
            break
    return problems


# The validation split: what a hyperparameter search selects on, never trained on, while the reported metric
# stays on the evaluation split.  The synthetic task generates one; a local folder may hold validation.jsonl.
# Otherwise (GSM8K has only train and test) it is held out of the training split: the `validation_size` distinct
# questions with the smallest SHA-256 of (a fixed salt, the question).  That choice depends on neither the run's
# seed nor the order of the rows (map-style, shuffled or streamed alike), so every run and every trial of a
# search holds out the same problems, and TrainStream skips exactly them.
VALIDATION = "validation"
HOLDOUT_SALT = "graff-validation-v1"
_HELD_OUT: dict[str, list[Problem]] = {}   # per data source, train split and size: one pass over the rows


def validation_file(ds_cfg) -> Path | None:
    """The data set's own validation file (synthetic task, local folder with validation.jsonl), else None."""
    path, kwargs = dataset_source(ds_cfg)
    if path == "json" and VALIDATION in kwargs["data_files"]:
        return Path(kwargs["data_files"][VALIDATION])
    return None


def holdout_key(question: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{HOLDOUT_SALT}\x00{question}".encode()).digest(), "big")


def held_out_problems(ds_cfg) -> list[Problem]:
    """The `dataset.validation_size` training questions with the smallest holdout keys, smallest key first.

    One pass over the training split (streamed where dataset.streaming is set) keeps the smallest keys in a
    bounded heap.  A question repeated in the training split is held out once, and TrainStream skips every copy."""
    size = ds_cfg.validation_size
    path, kwargs = dataset_source(ds_cfg)
    memo = json.dumps([path, kwargs, ds_cfg.train_split, size], sort_keys=True)
    if memo in _HELD_OUT:
        return _HELD_OUT[memo]
    heap: list[tuple[int, Problem]] = []   # (-key, problem): a max-heap of the smallest keys seen so far
    members: set[int] = set()
    usable = 0
    for row in load_rows(ds_cfg, ds_cfg.train_split, streaming=ds_cfg.streaming):
        checked = validate_row(row)
        if isinstance(checked, str):
            continue                       # TrainStream skips it too
        usable += 1
        key = holdout_key(checked.question)
        if key in members:
            continue
        if len(heap) < size:
            heapq.heappush(heap, (-key, checked))
            members.add(key)
        elif key < -heap[0][0]:
            evicted, _ = heapq.heapreplace(heap, (-key, checked))
            members.discard(-evicted)
            members.add(key)
    if usable <= size:
        raise UserError(f"dataset.validation_size={size} would hold out all {usable} usable rows of the training "
                        f"split '{ds_cfg.train_split}'; lower dataset.validation_size")
    chosen = [problem for _, problem in sorted(heap, key=lambda item: -item[0])]
    _HELD_OUT[memo] = [Problem(i, p.question, p.solution, p.gold) for i, p in enumerate(chosen)]
    return _HELD_OUT[memo]


def validation_problems(ds_cfg) -> list[Problem]:
    """The validation split: the data set's own file (its first `dataset.validation_size` rows), or the problems
    held out of the training split."""
    size = ds_cfg.validation_size
    if size < 1:
        raise UserError(f"dataset.validation_size={size}: there is no validation split; set it to the number of "
                        f"problems to hold out (e.g. 500)")
    path = validation_file(ds_cfg)
    if path is not None:
        return read_jsonl_problems(path, "validation split")[:size]
    return held_out_problems(ds_cfg)


def holdout_questions(ds_cfg) -> frozenset[str]:
    """The training questions TrainStream must skip: the held-out validation questions, or none where the data
    set has its own validation file (or validation_size is 0)."""
    if ds_cfg.validation_size < 1 or validation_file(ds_cfg) is not None:
        return frozenset()
    return frozenset(p.question for p in held_out_problems(ds_cfg))


def problem_set_digest(problems: Sequence[Problem]) -> str:
    """A short fingerprint of an evaluation set and its order: paired tests compare runs only when it matches."""
    h = hashlib.sha256()
    for p in problems:
        h.update(p.question.encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# 5. Prompts and tokenisation
# ----------------------------------------------------------------------------------------------------
class PromptFormat:
    """Turns a question into prompt token ids and a solution into target ids.

    With a chat template (Qwen3, Mistral-Instruct) the question is the user turn and the target is the assistant
    turn (Qwen3's thinking block disabled); without one (the embedded tokenizer) it is "Question: ...\\nAnswer:"
    as in lm-evaluation-harness.  Prompt and target are tokenised separately and concatenated, so the boundary
    between ignored and trained tokens is exact and the evaluation prompt is the training prompt."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.eos = tokenizer.eos_token or ""

    def prompt_text(self, question: str) -> str:
        if self.chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                      add_generation_prompt=True, enable_thinking=False)
        return f"Question: {question}\nAnswer:"

    def target_text(self, solution: str) -> str:
        return (solution if self.chat else " " + solution) + self.eos

    def encode_prompts(self, questions: Sequence[str]) -> list[list[int]]:
        texts = [self.prompt_text(q) for q in questions]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def encode_examples(self, rows: Sequence[Problem]) -> list[tuple[list[int], int]]:
        """(prompt + target ids, number of prompt tokens) per row."""
        prompts = self.encode_prompts([r.question for r in rows])
        targets = self.tokenizer([self.target_text(r.solution) for r in rows], add_special_tokens=False)["input_ids"]
        return [(p + t, len(p)) for p, t in zip(prompts, targets)]


@dataclass
class MicroBatch:
    """A padded micro-batch.  Shapes: input_ids, attention_mask, answer_mask (B, S).

    answer_mask[b, s] is True where token s is a target token (part of the solution), so the loss at position
    s-1 predicting it counts; prompt and padding tokens carry no loss."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    answer_mask: torch.Tensor

    @property
    def n_answer_tokens(self) -> int:
        return int(self.answer_mask[:, 1:].sum())

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device) -> "MicroBatch":
        return MicroBatch(*(t.to(device, non_blocking=True) for t in
                            (self.input_ids, self.attention_mask, self.answer_mask)))

    def select(self, rows: slice) -> "MicroBatch":
        return MicroBatch(self.input_ids[rows], self.attention_mask[rows], self.answer_mask[rows])


def collate(examples: Sequence[tuple[list[int], int]], pad_id: int) -> MicroBatch:
    """Right-pad (prompt + target) sequences into one MicroBatch."""
    import torch
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    answer = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, (seq, n_prompt) in enumerate(examples):
        ids[row, :len(seq)] = torch.tensor(seq)
        attn[row, :len(seq)] = 1
        answer[row, n_prompt:len(seq)] = True
    return MicroBatch(ids, attn, answer)


# ----------------------------------------------------------------------------------------------------
# 6. Training stream
# ----------------------------------------------------------------------------------------------------
class TrainStream:
    """Endless, deterministic micro-batches over epochs of the training split.

    Each epoch reads the split through `datasets` (shuffled map-style, or streamed through a shuffle buffer),
    validates and tokenises rows in pools of `pool` examples, sorts each pool by length and cuts it into
    micro-batches (length bucketing: little padding), then shuffles the micro-batches of the pool.  Rows longer
    than `max_tokens` are skipped and counted, as are bad rows and rows whose question is in the validation split
    (`holdout`; by default `holdout_questions(ds_cfg)`, so that no caller can train on it by forgetting it).  The position (epoch, micro-batches served in the
    epoch) is all a checkpoint needs: `skip_to` replays an epoch's order without running the model."""

    def __init__(self, ds_cfg, fmt: PromptFormat, micro_batch: int, max_tokens: int, seed: int,
                 max_epochs: int, pool_batches: int = 64, holdout: frozenset[str] | None = None):
        self.ds_cfg, self.fmt, self.micro_batch = ds_cfg, fmt, micro_batch
        self.max_tokens, self.seed, self.max_epochs = max_tokens, seed, max_epochs
        self.pool = micro_batch * pool_batches
        self.pad_id = fmt.tokenizer.pad_token_id
        self.epoch, self.served = 0, 0            # position: epoch, micro-batches served in this epoch
        self.skipped_bad = self.skipped_long = 0  # counted and logged (never silently dropped)
        self.holdout = holdout_questions(ds_cfg) if holdout is None else holdout
        self.skipped_validation = 0               # training rows held out as the validation split
        self._iter: Iterator[MicroBatch] | None = None
        self._primed: MicroBatch | None = None
        self.empty = False

    def state(self) -> dict:
        return {"epoch": self.epoch, "served": self.served}

    def skip_to(self, state: dict) -> None:
        self.epoch, target = state["epoch"], state["served"]
        self._iter = self._epoch_batches(self.epoch)
        for _ in range(target):
            next(self._iter)
        self.served = target

    def prime(self) -> None:
        """Open the current epoch and prepare its first micro-batches now (data loading is start-up, not budget)."""
        batch = self.next()
        if batch is not None:
            self._primed = batch
            self.served -= 1

    def next(self) -> MicroBatch | None:
        """The next micro-batch, or None after `max_epochs` epochs."""
        if self._primed is not None:
            batch, self._primed = self._primed, None
            self.served += 1
            return batch
        while True:
            if self._iter is None:
                if self.epoch >= self.max_epochs:
                    return None
                self._iter = self._epoch_batches(self.epoch)
            batch = next(self._iter, None)
            if batch is not None:
                self.served += 1
                return batch
            if self.served == 0:               # a whole epoch without a usable row: so is every other one
                return None
            self._iter, self.epoch, self.served = None, self.epoch + 1, 0

    def _read(self, epoch: int) -> Iterator[dict]:
        """The epoch's rows; a file that breaks mid-way (streaming reads lazily) is one clear error, not a traceback."""
        try:
            yield from self._rows(epoch)
        except UserError:
            raise
        except Exception as err:
            first = (str(err).splitlines() or [type(err).__name__])[0][:200]
            raise UserError(f"dataset {self.ds_cfg.name} split '{self.ds_cfg.train_split}': a training row cannot be "
                            f"read ({first}); fix or replace the data") from None

    def _rows(self, epoch: int) -> Iterable[dict]:
        rows = load_rows(self.ds_cfg, self.ds_cfg.train_split, streaming=self.ds_cfg.streaming)
        if self.ds_cfg.streaming:
            rows = rows.shuffle(seed=self.seed, buffer_size=self.ds_cfg.shuffle_buffer)
            rows.set_epoch(epoch)
            return rows
        return rows.shuffle(seed=self.seed + epoch)

    def _epoch_batches(self, epoch: int) -> Iterator[MicroBatch]:
        rng = random.Random(f"{self.seed}-{epoch}")
        pool: list[Problem] = []
        for row in self._read(epoch):
            checked = validate_row(row)
            if isinstance(checked, str):
                self.skipped_bad += 1
                continue
            if checked.question in self.holdout:
                self.skipped_validation += 1
                continue
            pool.append(checked)
            if len(pool) >= self.pool:
                yield from self._bucket(pool, rng)
                pool = []
        if pool:
            yield from self._bucket(pool, rng)

    def _bucket(self, pool: list[Problem], rng: random.Random) -> Iterator[MicroBatch]:
        encoded = []
        for seq, n_prompt in self.fmt.encode_examples(pool):
            if len(seq) > self.max_tokens:
                self.skipped_long += 1
            else:
                encoded.append((seq, n_prompt))
        encoded.sort(key=lambda e: len(e[0]))
        chunks = [encoded[i:i + self.micro_batch] for i in range(0, len(encoded), self.micro_batch)]
        # a short last chunk of the epoch is kept: dropping it would bias the data toward long examples
        rng.shuffle(chunks)
        for chunk in chunks:
            yield collate(chunk, self.pad_id)


# ----------------------------------------------------------------------------------------------------
# 7. Evaluation problems and generation batches
# ----------------------------------------------------------------------------------------------------
def generation_batches(fmt: PromptFormat, problems: Sequence[Problem], batch_size: int,
                       max_tokens: int) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Left-padded prompt batches sorted by length (least padding), with the problems' positions.

    Returns [(positions, input_ids (B, S), attention_mask (B, S))].  Prompts are truncated from the left to
    `max_tokens` so that no problem is silently dropped."""
    import torch
    prompts = fmt.encode_prompts([p.question for p in problems])
    order = sorted(range(len(problems)), key=lambda i: len(prompts[i]))
    pad_id = fmt.tokenizer.pad_token_id
    batches = []
    for start in range(0, len(order), batch_size):
        positions = order[start:start + batch_size]
        seqs = [prompts[i][-max_tokens:] for i in positions]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, width - len(seq):] = torch.tensor(seq)
            attn[row, width - len(seq):] = 1
        batches.append((positions, ids, attn))
    return batches


def score_completions(completions: Sequence[str], problems: Sequence[Problem]) -> tuple[list[bool], list[bool]]:
    """Per-problem (strict, flexible) correctness, in the problems' order, each completion cut at the first stop
    string as the harness does."""
    pairs = [exact_match(cut_at_stop(c), p.gold) for c, p in zip(completions, problems)]
    return [s for s, _ in pairs], [f for _, f in pairs]


def percent(flags: Sequence[bool]) -> float:
    return 100.0 * sum(flags) / len(flags) if flags else math.nan
