"""The embedded datasets, generated from the world under a seed, in TRL's standard formats.

kinds (each a DatasetDict with "train" and "test" splits):
- corpus:     {"text"}                                     reviews, half as Human/Assistant transcripts
- sft:        {"prompt", "completion"}                     conversational demonstrations of mixed quality
- preference: {"prompt", "chosen", "rejected"}             conversational pairs; train labels come from
              simulated raters (Bradley-Terry on the oracle, so some are flipped), test labels are the
              oracle's noise-free ordering. A quarter of the training pairs are one review naming the asked
              film against the same review naming another; the split "test_title_only" holds only such
              pairs (the title is all that differs), "test" only pairs of two independent reviews
- prompt:     {"prompt"}                                   conversational prompts, for PPO and evaluation

Prompts are split by request: a test prompt never appears in any train split.
"""

import math
import random

from datasets import Dataset, DatasetDict

from . import world

KINDS = ("corpus", "sft", "preference", "prompt")
SIZES = {  # (train, test)
    "corpus": (20000, 1000),
    "sft": (6000, 300),
    "preference": (8000, 500),
}
TITLE_SWAPS = 0.25  # of the training pairs: the same review about the asked film and about another one
TRANSCRIPTS = 0.7  # of the corpus: Human/Assistant dialogues (the rest are plain reviews)
RATER_BETA = 1.15  # P(rater prefers a over b) = sigmoid(RATER_BETA * (gold(a) - gold(b)))


def _prompts(seed: int) -> tuple[list[str], list[str]]:
    """All requests (title x phrasing), shuffled under the seed and split 80/20 into train and test."""
    requests = [r.format(title=t) for t in world.TITLES for r in world.REQUESTS]
    random.Random(seed).shuffle(requests)
    cut = int(0.8 * len(requests))
    return requests[:cut], requests[cut:]


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _title_swap(title: str, rng: random.Random) -> tuple[str, str]:
    """A review that names `title` and the same review about another film."""
    text = world.review(title, rng, style={"named": 1.0, "wrong": 0.0, "again": world.DEMONSTRATION["again"]})
    return text, text.replace(title, rng.choice([t for t in world.TITLES if t != title]))


def _rows(kind: str, prompts: list[str], n: int, rng: random.Random, noisy: bool,
          title_swaps: float = 0.0) -> list[dict]:
    if kind == "prompt":
        return [{"prompt": _user(p)} for p in prompts]
    rows = []
    while len(rows) < n:
        prompt = rng.choice(prompts)
        title = world.title_of_request(prompt)
        if kind == "corpus":  # plain reviews, and TRANSCRIPTS of them as dialogue transcripts, as on the web
            text = world.review(title, rng, style=world.WEB)
            rows.append({"text": f"\n\nHuman: {prompt}\n\nAssistant: {text}" if rng.random() < TRANSCRIPTS else text})
        elif kind == "sft":
            rows.append({"prompt": _user(prompt), "completion": _assistant(world.review(title, rng))})
        else:
            swap = rng.random() < title_swaps
            a, b = _title_swap(title, rng) if swap else (world.review(title, rng), world.review(title, rng))
            gap = world.gold_score(prompt, a) - world.gold_score(prompt, b)
            if gap == 0:
                continue  # the oracle has no preference: nothing to learn or to evaluate
            a_wins = rng.random() < 1 / (1 + math.exp(-RATER_BETA * gap)) if noisy else gap > 0
            chosen, rejected = (a, b) if a_wins else (b, a)
            rows.append({"prompt": _user(prompt), "chosen": _assistant(chosen), "rejected": _assistant(rejected)})
    return rows


def build(kind: str, seed: int = 0) -> DatasetDict:
    if kind not in KINDS:
        raise ValueError(f"unknown embedded dataset 'embedded:{kind}'; choose one of: "
                         + ", ".join(f"embedded:{k}" for k in KINDS))
    train_prompts, test_prompts = _prompts(seed)
    n_train, n_test = SIZES.get(kind, (0, 0))
    offset = KINDS.index(kind) * 1000  # each kind draws its own random stream
    splits = {
        "train": _rows(kind, train_prompts, n_train, random.Random(seed + offset), noisy=True,
                       title_swaps=TITLE_SWAPS if kind == "preference" else 0.0),
        "test": _rows(kind, test_prompts, n_test, random.Random(seed + offset + 1), noisy=False),
    }
    if kind == "preference":
        splits["test_title_only"] = _rows(kind, test_prompts, n_test, random.Random(seed + offset + 2),
                                          noisy=False, title_swaps=1.0)
    return DatasetDict({name: Dataset.from_list(rows) for name, rows in splits.items()})


def rater_flip_rate(dataset: Dataset) -> float:
    """Fraction of pairs whose label disagrees with the oracle (the simulated raters' noise)."""
    flipped = [
        world.gold_score(r["prompt"][-1]["content"], r["chosen"][-1]["content"])
        < world.gold_score(r["prompt"][-1]["content"], r["rejected"][-1]["content"])
        for r in dataset
    ]
    return sum(flipped) / max(1, len(flipped))
