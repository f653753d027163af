"""A held-out task of the embedded world for in-context evaluation: is a review positive or negative?

No stage trains on it: the corpus never says "Sentiment:", so any skill comes from the demonstrations in
the prompt (GPT-2/GPT-3 style zero-, one- and few-shot prompting).
"""

import random

from . import world


def _sentiment(text: str) -> float:
    return sum(world.sentence_polarity(s) for s in world._SENTENCE.findall(text))


def sentiment_task(seed: int = 0, examples: int = 100, demonstrations: int = 16) -> dict:
    rng = random.Random(seed + 7919)
    rows = []
    while len(rows) < examples + demonstrations:
        text = world.review(rng.choice(world.TITLES), rng, quality=rng.choice(["positive", "negative"]))
        sentiment = _sentiment(text)
        if sentiment != 0:
            rows.append({"input": text, "label": 0 if sentiment > 0 else 1})
    return {
        "instruction": "",
        "template": "Review: {input}\nSentiment:",
        "choices": [" positive", " negative"],
        "demonstrations": rows[:demonstrations],
        "examples": rows[demonstrations:],
    }
