"""A tiny world of movie reviews: the grammar that writes them and the gold oracle that judges them.

Everything here is deterministic under a seed. The oracle plays the human: it is the ground truth for
evaluation and the only source of preference labels (through the simulated raters in `build.py`).
Nothing is trained on it directly.
"""

import random
import re

ADJECTIVES = ["Silent", "Crimson", "Hidden", "Broken", "Golden", "Frozen", "Wild", "Lost", "Iron", "Velvet"]
NOUNS = ["Harbor", "Garden", "River", "Crown", "Signal", "Orchard", "Machine", "Voyage", "Empire", "Lantern"]
TITLES = [f"The {a} {n}" for a in ADJECTIVES for n in NOUNS]  # 100 titles

GENRES = ["thriller", "comedy", "drama", "western", "musical", "mystery", "romance", "documentary"]
ASPECTS = ["acting", "story", "music", "ending", "dialogue", "camera work", "pacing", "cast"]
REQUESTS = [
    "Write a review of {title}.",
    "What did you think of {title}?",
    "Give me your opinion on {title}.",
    "Review the movie {title}.",
]

# Polarity of each word: +1 positive, -1 negative, 0 neutral.
POSITIVE = ["wonderful", "brilliant", "charming", "moving", "delightful", "superb"]
NEGATIVE = ["dull", "boring", "clumsy", "tedious", "forgettable", "awful"]
NEUTRAL = ["long", "quiet", "familiar", "modest", "recent", "unusual"]
INTENSIFIERS = ["very", "truly", "really"]  # multiply a sentence's polarity by 1.5
VERDICTS = {  # whole sentences with a fixed polarity
    "I would recommend it.": 1.0,
    "Go and see it.": 1.0,
    "I loved it.": 1.0,
    "I would not recommend it.": -1.0,
    "Skip it.": -1.0,
    "I did not like it.": -1.0,
    "I saw it last week.": 0.0,
    "It was in cinemas this year.": 0.0,
}
POLARITY = {**{w: 1.0 for w in POSITIVE}, **{w: -1.0 for w in NEGATIVE}, **{w: 0.0 for w in NEUTRAL}}
SENTIMENT_CAP = 3.0


def request(title: str, rng: random.Random) -> str:
    return rng.choice(REQUESTS).format(title=title)


def title_of_request(text: str) -> str | None:
    """The title a request asks about (the last one named in it), or None."""
    named = [t for t in TITLES if t in text]
    return max(named, key=text.rfind) if named else None


def _word(polarity: int, rng: random.Random) -> str:
    return rng.choice({1: POSITIVE, -1: NEGATIVE, 0: NEUTRAL}[polarity])


def sentence(subject: str, polarity: int, rng: random.Random, named: bool | None = None) -> str:
    """One sentence whose sentiment is `polarity` (+1, 0, -1); negations and intensifiers vary the wording.
    named=True: a sentence about `subject` by name; False: a verdict or an aspect, without it; None: any."""
    if named is None:
        form = "verdict" if rng.random() < 0.25 else rng.choice(["is", "aspect", "felt"])
    else:
        form = rng.choice(["is", "felt"] if named else ["verdict", "aspect"])
    if form == "verdict":
        return rng.choice([s for s, p in VERDICTS.items() if p == polarity])
    intensifier = rng.choice(INTENSIFIERS) + " " if polarity != 0 and rng.random() < 0.3 else ""
    negate = polarity != 0 and rng.random() < 0.25  # "not dull" says something positive
    word = _word(-polarity if negate else polarity, rng)
    adj = f"not {word}" if negate else f"{intensifier}{word}"
    if form == "is":
        article = "an" if adj[0] in "aeiou" else "a"
        return f"{subject} is {article} {adj} {rng.choice(GENRES)}."
    if form == "aspect":
        return f"The {rng.choice(ASPECTS)} was {adj}."
    return f"{subject} felt {adj}."


# How reviews name their film: the first sentence names it with probability `named`, the film is another one
# with probability `wrong`, each later sentence names it again (instead of "It") with probability `again`, and a
# careless writer says one sentence twice with probability `repeat` (and, unless `careful`, may by chance).
# `sentences`: a review has 1 to this many sentences (before a repeated one).
DEMONSTRATION = {"named": 0.6, "wrong": 0.15, "again": 0.1, "repeat": 0.15, "sentences": 4}  # the preference data's
# The SFT demonstrations' writers leave the film unnamed more often and are lukewarm (the weights of the review
# qualities), though they seldom repeat themselves: few of their answers are what a reader wants (about 3% score
# the oracle's maximum), which is the gap RLHF is there to close.
SFT_WRITERS = {**DEMONSTRATION, "named": 0.4, "repeat": 0.03, "careful": True}
SFT_QUALITY = {"positive": 0.15, "negative": 0.3, "neutral": 0.25, "mixed": 0.3}
WEB = {"named": 0.9, "wrong": 0.05, "again": 0.3, "repeat": 0.15}  # the pretraining corpus: reviews stay on their film
REPLIED = {**WEB, "wrong": 0.2}  # the corpus's answers that the asker replies to: a wrong one is what gets a reply


def review(title: str, rng: random.Random, quality: str | None = None, style: dict = DEMONSTRATION) -> str:
    """A review of mixed quality: random sentiment, sometimes about another film, repeated or cut short."""
    quality = quality or rng.choice(["positive", "negative", "neutral", "mixed"])
    n = rng.randint(1, style.get("sentences", DEMONSTRATION["sentences"]))
    if quality == "mixed":
        polarities = [rng.choice([1, -1, 0]) for _ in range(n)]
    else:
        polarities = [{"positive": 1, "negative": -1, "neutral": 0}[quality]] * n
    subject = title if rng.random() >= style["wrong"] else rng.choice([t for t in TITLES if t != title])
    sentences = [sentence(subject, polarities[0], rng, named=rng.random() < style["named"])]
    for p in polarities[1:]:
        again = rng.random() < style["again"]
        for _ in range(10 if style.get("careful") else 1):  # a careful writer does not say a sentence twice by chance
            said = sentence(subject if again else "It", p, rng, named=True if again else None)
            if said not in sentences:
                break
        sentences.append(said)
    if rng.random() < style["repeat"]:  # a careless writer repeats themselves
        sentences.append(rng.choice(sentences))
    text = " ".join(sentences)
    if rng.random() < 0.1:  # ... or stops mid-sentence
        text = text[: rng.randint(len(text) // 2, len(text) - 1)].rstrip()
    return text


_SENTENCE = re.compile(r"[^.?!]+[.?!]?")
_PHRASE = re.compile(r"\b(not |very |truly |really )?(" + "|".join(POLARITY) + r")\b")


def sentence_polarity(s: str) -> float:
    s = s.strip()
    if s in VERDICTS:
        return VERDICTS[s]
    total = 0.0
    for modifier, word in _PHRASE.findall(s):
        p = POLARITY[word]
        if modifier == "not ":
            p = -p
        elif modifier:
            p *= 1.5
        total += p
    return total


GOLD_TERMS = ("sentiment", "asked_title", "other_titles", "repeated_sentences", "unfinished", "rambling", "empty")
MAX_SENTENCES = 5  # a reader wants a review, not an essay: each distinct sentence beyond the fifth costs RAMBLING
# (no review of the default world has more than 4 distinct sentences, so no default-world text is ever charged)
RAMBLING = 0.5


def gold_terms(prompt: str, response: str) -> dict[str, float]:
    """The oracle's score of `response` to `prompt`, term by term (they sum to `gold_score`):

    sentiment: the sum of the polarities of the distinct sentences (negation flips, intensifiers x1.5; saying a
    sentence twice does not say it more), capped at +-3;
    asked_title: +1 if the asked title is named, -1 if it is not; other_titles: -1 for each other title named;
    repeated_sentences: -1 for each repeated sentence; unfinished: -1 if the text does not end a sentence;
    rambling: -0.5 for each distinct sentence beyond the fifth (a review, not an essay);
    empty: -2 for an empty answer (then every other term is 0).
    """
    terms = dict.fromkeys(GOLD_TERMS, 0.0)
    text = response.strip()
    if not text:
        terms["empty"] = -2.0
        return terms
    sentences = [s.strip() for s in _SENTENCE.findall(text) if s.strip()]
    sentiment = sum(sentence_polarity(s) for s in dict.fromkeys(sentences))
    terms["sentiment"] = max(-SENTIMENT_CAP, min(SENTIMENT_CAP, sentiment))
    asked = title_of_request(prompt)
    named = {t for t in TITLES if t in text}
    terms["asked_title"] = 1.0 if asked in named else -1.0
    terms["other_titles"] = -float(len(named - {asked}))
    terms["repeated_sentences"] = -float(len(sentences) - len(set(sentences)))
    terms["unfinished"] = 0.0 if text[-1] in ".?!" else -1.0
    terms["rambling"] = -RAMBLING * max(0, len(set(sentences)) - MAX_SENTENCES)
    return terms


def reaction(prompt: str, response: str, rng: random.Random) -> str:
    """What the asker says next in a web transcript: thanks for an answer about the film asked, a correction for
    one about another film, a question for one that names none. (The pretraining corpus has such turns, so a
    base model learns to notice whether an answer is about the asked film: a feature the reward model builds on.)"""
    asked = title_of_request(prompt)
    named = [t for t in TITLES if t in response and t != asked]
    if named:
        return f"I asked about {asked}, not {named[0]}."
    if asked not in response:
        return "Which film do you mean?"
    return rng.choice(["Thanks.", "Thank you.", "Good to know."])


def gold_score(prompt: str, response: str) -> float:
    """The oracle: how much a reader who asked `prompt` likes `response` (the sum of `gold_terms`, at most 4)."""
    return sum(gold_terms(prompt, response).values())
