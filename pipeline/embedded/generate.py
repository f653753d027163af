"""The embedded datasets, generated from the world under a seed, in TRL's standard formats.

kinds (each a DatasetDict with "train" and "test" splits):
- corpus:     {"text"}                                     reviews, most as Human/Assistant transcripts, half
              of those with the asker's reply to the answer (world.reaction)
- sft:        {"prompt", "completion"}                     conversational demonstrations of mixed quality
              (world.SFT_WRITERS, SFT_QUALITY)
- preference: {"prompt", "chosen", "rejected"}             conversational pairs; train labels come from
              simulated raters (Bradley-Terry on the oracle, so some are flipped), test labels are the
              oracle's noise-free ordering. A quarter of the training pairs are one review naming the asked
              film against the same review naming another, a tenth a review against the same review with
              a sentence said twice; the splits "test_title_only" and "test_repeat_only" hold only such
              pairs (the title, or the repeat, is all that differs), "test" only pairs of two independent
              reviews
- prompt:     {"prompt"}                                   conversational prompts, for PPO and evaluation

Prompts are split by request: a test prompt never appears in any train split.
"""

import functools
import math
import random

from datasets import Dataset, DatasetDict

from . import world

KINDS = ("corpus", "sft", "preference", "prompt")
SIZES = {  # (train, test)
    "corpus": (20000, 1000),
    "sft": (4000, 300),
    "preference": (16000, 1000),
}
TITLE_SWAPS = 0.25  # of the training pairs: the same review about the asked film and about another one
REPEAT_SWAPS = 0.1  # of the training pairs: a review and the same review with a sentence said twice
TRANSCRIPTS = 0.7  # of the corpus: Human/Assistant dialogues (the rest are plain reviews)
REACTIONS = 0.5  # of the transcripts: the asker replies to the answer (world.reaction)
END_OF_TURN = "<|endoftext|>"  # what the chat template puts after an answer: the tokenizer's EOS (models.EOS_TOKEN)
RATER_BETA = 1.15  # P(rater prefers a over b) = sigmoid(RATER_BETA * (gold(a) - gold(b)))
# Biased raters (recipe fields `embedded_length_bias` and `embedded_repeat_bias`, recipes/tiny-biased): besides the
# oracle, they prefer the longer answer and take a sentence said again for emphasis, as human raters over-reward
# length and repeated praise: P(a over b) = sigmoid(RATER_BETA * (gold(a) - gold(b)) + length_bias * (words(a) -
# words(b)) + repeat_bias * (repeats(a) - repeats(b))). The oracle does not reward length (its sentiment is capped)
# and a repeated sentence costs 1: a reward model learned from these labels pays for answers that ramble.


def words(text: str) -> int:
    return len(text.split())


def repeats(text: str) -> int:
    """Sentences said again (what the oracle's repeated_sentences term counts)."""
    sentences = [s.strip() for s in world._SENTENCE.findall(text) if s.strip()]
    return len(sentences) - len(set(sentences))


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
    text = world.review(title, rng, style={**world.DEMONSTRATION, "named": 1.0, "wrong": 0.0})
    return text, text.replace(title, rng.choice([t for t in world.TITLES if t != title]))


def _repeat_swap(title: str, rng: random.Random) -> tuple[str, str]:
    """A review and the same review with one of its sentences said again at the end (a review cut short mid-sentence
    is left as it is: the oracle then has no preference and the pair is not kept)."""
    text = world.review(title, rng)
    if text[-1] not in ".?!":
        return text, text
    return text, f"{text} {rng.choice(world._SENTENCE.findall(text)).strip()}"


def _rows(kind: str, prompts: list[str], n: int, rng: random.Random, noisy: bool,
          title_swaps: float = 0.0, repeat_swaps: float = 0.0, length_bias: float = 0.0,
          repeat_bias: float = 0.0, max_sentences: int = world.DEMONSTRATION["sentences"]) -> list[dict]:
    if kind == "prompt":
        return [{"prompt": _user(p)} for p in prompts]
    rows = []
    while len(rows) < n:
        prompt = rng.choice(prompts)
        title = world.title_of_request(prompt)
        if kind == "corpus":  # plain reviews, and TRANSCRIPTS of them as dialogue transcripts, as on the web
            transcript, replied = rng.random() < TRANSCRIPTS, rng.random() < REACTIONS
            answer = world.review(title, rng, style=world.REPLIED if transcript and replied else world.WEB)
            text = f"\n\nHuman: {prompt}\n\nAssistant: {answer}" if transcript else answer
            if transcript and replied:  # the turn ends as the chat template ends it, and the asker replies
                text += f"{END_OF_TURN}\n\nHuman: {world.reaction(prompt, answer, rng)}"
            rows.append({"text": text})
        elif kind == "sft":
            quality = rng.choices(list(world.SFT_QUALITY), weights=list(world.SFT_QUALITY.values()))[0]
            answer = world.review(title, rng, quality=quality, style=world.SFT_WRITERS)
            rows.append({"prompt": _user(prompt), "completion": _assistant(answer)})
        else:
            draw = rng.random()
            if draw < title_swaps:
                a, b = _title_swap(title, rng)
            elif draw < title_swaps + repeat_swaps:
                a, b = _repeat_swap(title, rng)
            else:
                style = {**world.DEMONSTRATION, "sentences": max_sentences}
                a, b = world.review(title, rng, style=style), world.review(title, rng, style=style)
            gap = world.gold_score(prompt, a) - world.gold_score(prompt, b)
            bias = length_bias * (words(a) - words(b)) + repeat_bias * (repeats(a) - repeats(b)) if noisy else 0.0
            if gap == 0 and bias == 0:
                continue  # neither the oracle nor the raters have a preference: nothing to learn or to evaluate
            a_wins = rng.random() < 1 / (1 + math.exp(-RATER_BETA * gap - bias)) if noisy else gap > 0
            chosen, rejected = (a, b) if a_wins else (b, a)
            rows.append({"prompt": _user(prompt), "chosen": _assistant(chosen), "rejected": _assistant(rejected)})
    return rows


# Each split draws its own random stream (the kind's offset + its number), so a split is the same whether it is
# built alone or with the others. name: (stream, held out, how its rows are drawn)
SPLIT_DRAWS = {
    "train": (0, False, {"noisy": True, "title_swaps": TITLE_SWAPS, "repeat_swaps": REPEAT_SWAPS}),
    "test": (1, True, {"noisy": False}),
    # preference only: held-out pairs that differ in one thing only, what the reward model sees of each
    "test_title_only": (2, True, {"noisy": False, "title_swaps": 1.0}),
    "test_repeat_only": (3, True, {"noisy": False, "repeat_swaps": 1.0}),
}
SPLITS = {kind: tuple(name for name in SPLIT_DRAWS if kind == "preference" or name in ("train", "test"))
          for kind in KINDS}


def build(kind: str, seed: int = 0, splits: tuple[str, ...] | None = None, length_bias: float = 0.0,
          repeat_bias: float = 0.0, max_sentences: int = world.DEMONSTRATION["sentences"]) -> DatasetDict:
    """The embedded dataset `kind` under `seed`, or only the named `splits` of it. A split is generated once per
    process: a stage reads the preference data for its train, test and extra test splits. length_bias, repeat_bias:
    the preference data's simulated raters prefer the longer answer by length_bias logits per word, and a repeated
    sentence by repeat_bias logits (the train split only: the held-out pairs stay ordered by the oracle).
    max_sentences: the preference pairs' reviews have 1 to this many sentences (of the train split; the held-out
    pairs keep the default world's)."""
    if kind not in KINDS:
        raise ValueError(f"unknown embedded dataset 'embedded:{kind}'; choose one of: "
                         + ", ".join(f"embedded:{k}" for k in KINDS))
    names = SPLITS[kind] if splits is None else [name for name in SPLITS[kind] if name in splits]
    for field, value in (("embedded_length_bias", length_bias), ("embedded_repeat_bias", repeat_bias)):
        if value < 0:
            raise ValueError(f"{field} must be >= 0 (how much more the raters like it), got {value}")
    if not 1 <= max_sentences <= 20:
        raise ValueError(f"embedded_max_sentences must be 1 to 20, got {max_sentences}")
    world_of = (length_bias, repeat_bias, max_sentences) if kind == "preference" else (
        0.0, 0.0, world.DEMONSTRATION["sentences"])
    return DatasetDict({name: _split(kind, seed, name, *world_of) for name in names})


@functools.lru_cache(maxsize=None)
def _split(kind: str, seed: int, name: str, length_bias: float = 0.0, repeat_bias: float = 0.0,
           max_sentences: int = world.DEMONSTRATION["sentences"]) -> Dataset:
    stream, held_out, draw = SPLIT_DRAWS[name]
    if draw.get("noisy"):
        draw = {**draw, "length_bias": length_bias, "repeat_bias": repeat_bias, "max_sentences": max_sentences}
    train_prompts, test_prompts = _prompts(seed)
    n_train, n_test = SIZES.get(kind, (0, 0))
    prompts, size = (test_prompts, n_test) if held_out else (train_prompts, n_train)
    rng = random.Random(seed + KINDS.index(kind) * 1000 + stream)  # each kind and split its own stream
    return Dataset.from_list(_rows(kind, prompts, size, rng, **draw))


def rater_flip_rate(dataset: Dataset) -> float:
    """Fraction of pairs whose label disagrees with the oracle (the simulated raters' noise)."""
    flipped = [
        world.gold_score(r["prompt"][-1]["content"], r["chosen"][-1]["content"])
        < world.gold_score(r["prompt"][-1]["content"], r["rejected"][-1]["content"])
        for r in dataset
    ]
    return sum(flipped) / max(1, len(flipped))
