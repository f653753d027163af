"""The embedded world: deterministic under a seed, held-out prompts, an oracle that means what it says,
and simulated raters whose labels are noisy (about 10% flipped) while the test labels are not."""

import pytest

from pipeline.embedded import build, gold_score, rater_flip_rate
from pipeline.embedded import world
from pipeline.embedded.generate import END_OF_TURN
from pipeline.models import EOS_TOKEN

ASK = "Write a review of The Lost River."


def test_same_seed_same_data_other_seed_other_data():
    assert build("sft", seed=3)["train"][:50] == build("sft", seed=3)["train"][:50]
    assert build("sft", seed=3)["train"][:50] != build("sft", seed=4)["train"][:50]


def test_a_split_built_alone_is_the_split_built_with_the_others():
    # the evaluation after the stages builds only the test splits; they must be the ones the stages held out
    from pipeline.embedded import generate

    generate._split.cache_clear()
    alone = build("preference", seed=5, splits=("test_title_only",))
    assert list(alone) == ["test_title_only"]
    generate._split.cache_clear()
    whole = build("preference", seed=5)
    assert list(whole) == ["train", "test", "test_title_only", "test_repeat_only"]
    assert alone["test_title_only"][:] == whole["test_title_only"][:]
    assert whole["test"][:50] != whole["test_title_only"][:50]


def test_test_prompts_are_held_out_of_every_train_split():
    test_prompts = {r["prompt"][0]["content"] for r in build("prompt")["test"]}
    assert test_prompts
    for kind in ("sft", "preference", "prompt"):
        train_prompts = {r["prompt"][0]["content"] for r in build(kind)["train"]}
        assert not train_prompts & test_prompts, kind


@pytest.mark.parametrize("better, worse", [
    ("The Lost River is a superb drama.", "The Lost River is a dull drama."),          # sentiment
    ("The Lost River is a superb drama.", "The Iron Crown is a superb drama."),        # on topic
    ("The Lost River is not dull.", "The Lost River is not superb."),                  # negation flips
    ("The Lost River is a truly superb drama.", "The Lost River is a superb drama."),  # intensifier
    ("The Lost River felt moving. I loved it.", "The Lost River felt moving. The Lost River felt moving."),
    ("The Lost River is a superb drama.", "The Lost River is a superb dra"),           # ends properly
    ("The Lost River is a long drama.", ""),                                           # says something
])
def test_oracle_orders_responses(better, worse):
    assert gold_score(ASK, better) > gold_score(ASK, worse)


def test_a_repeated_sentence_adds_no_sentiment_and_costs_a_point():
    once = "The Lost River felt moving. I loved it."
    assert gold_score(ASK, once + " I loved it.") == gold_score(ASK, once) - 1
    terms = world.gold_terms(ASK, once + " I loved it.")
    assert terms["sentiment"] == 2 and terms["repeated_sentences"] == -1


def test_oracle_caps_sentiment_so_praise_cannot_grow_without_bound():
    many = " ".join(f"It felt {w}." for w in world.POSITIVE)  # 7 distinct sentences of praise in all
    terms = world.gold_terms(ASK, "The Lost River felt superb. " + many)
    assert terms["sentiment"] == world.SENTIMENT_CAP
    # and the two sentences beyond the fifth cost what rambling costs: more praise only lowers the score
    assert terms["rambling"] == -2 * world.RAMBLING
    assert gold_score(ASK, "The Lost River felt superb. " + many) == world.SENTIMENT_CAP + 1 - 2 * world.RAMBLING


def test_raters_flip_about_ten_percent_and_test_labels_follow_the_oracle():
    pairs = build("preference")
    assert 0.07 < rater_flip_rate(pairs["train"]) < 0.13
    assert rater_flip_rate(pairs["test"]) == 0.0
    for row in pairs["test"].select(range(50)):
        prompt = row["prompt"][0]["content"]
        assert gold_score(prompt, row["chosen"][0]["content"]) > gold_score(prompt, row["rejected"][0]["content"])


def test_sft_demonstrations_have_mixed_quality_and_few_are_what_a_reader_wants():
    rows = build("sft")["train"].select(range(2000))
    scores = [gold_score(r["prompt"][0]["content"], r["completion"][0]["content"]) for r in rows]
    assert min(scores) < -1 and max(scores) == world.SENTIMENT_CAP + 1
    assert sum(s > 0 for s in scores) / len(scores) < 0.5
    # a policy that always gave the best answer would win about 98% of its comparisons with these answers
    assert sum(s == world.SENTIMENT_CAP + 1 for s in scores) / len(scores) < 0.05


def test_sft_writers_seldom_repeat_themselves_and_the_preference_reviewers_often_do():
    def repeat_rate(rows, answer):
        return sum(world.gold_terms(r["prompt"][0]["content"], r[answer][0]["content"])["repeated_sentences"] < 0
                   for r in rows) / len(rows)

    assert repeat_rate(build("sft")["train"].select(range(2000)), "completion") < 0.05
    pairs = build("preference")["test"]
    assert repeat_rate(pairs, "chosen") + repeat_rate(pairs, "rejected") > 0.2


def test_pretraining_reviews_stay_on_their_film_more_than_the_demonstrations():
    """The corpus (world.WEB) names the asked film in most answers, so a base model can learn to copy it from the
    request; the answers the asker replies to (world.REPLIED) stray more, and the SFT demonstrations
    (world.SFT_WRITERS) leave naming it to alignment. An answer is what comes before the asker's reply."""
    transcripts = [t.split("\n\nAssistant:") for t in build("corpus")["train"]["text"][:2000]
                   if t.startswith("\n\nHuman:")]

    def named(replied: bool) -> float:
        answers = [(asked, answer.split(END_OF_TURN)[0]) for asked, answer in transcripts
                   if (END_OF_TURN in answer) == replied]
        return sum(world.title_of_request(asked) in answer for asked, answer in answers) / len(answers)

    sft = build("sft")["train"].select(range(2000))
    demos = sum(world.title_of_request(r["prompt"][0]["content"]) in r["completion"][0]["content"]
                for r in sft) / len(sft)
    assert named(replied=False) > 0.8
    assert 0.65 < named(replied=True) < named(replied=False)
    assert 0.3 < demos < 0.6


def test_title_only_pairs_differ_in_the_title_alone_and_the_oracle_prefers_the_asked_one():
    pairs = build("preference")
    title_only = pairs["test_title_only"]
    assert len(title_only) == len(pairs["test"])
    for row in title_only:
        prompt, chosen = row["prompt"][0]["content"], row["chosen"][0]["content"]
        rejected = row["rejected"][0]["content"]
        asked = world.title_of_request(prompt)
        other = next(t for t in world.TITLES if t in rejected)
        assert asked in chosen and other != asked and chosen.replace(asked, other) == rejected
        assert gold_score(prompt, chosen) > gold_score(prompt, rejected)
    # a quarter of the training pairs are such swaps (labelled by the noisy raters); "test" holds none
    def swapped(row):
        asked = world.title_of_request(row["prompt"][0]["content"])
        a, b = row["chosen"][0]["content"], row["rejected"][0]["content"]
        return any(a.replace(asked, t) == b or b.replace(asked, t) == a for t in world.TITLES if t != asked)

    train = pairs["train"].select(range(1000))
    assert 0.2 < sum(map(swapped, train)) / len(train) < 0.3
    assert not any(map(swapped, pairs["test"]))


def test_the_corpus_has_the_askers_replies_which_notice_an_answer_about_another_film():
    texts = build("corpus")["train"]["text"]
    replied = [t for t in texts if f"{END_OF_TURN}\n\nHuman: " in t]
    assert 0.25 < len(replied) / len(texts) < 0.45
    for text in replied[:300]:
        first, answer_and_reply = text.split("\n\nAssistant: ")
        answer, reply = answer_and_reply.split(f"{END_OF_TURN}\n\nHuman: ")
        asked = world.title_of_request(first)
        others = [t for t in world.TITLES if t in answer and t != asked]
        if others:
            assert reply == f"I asked about {asked}, not {others[0]}."
        elif asked not in answer:
            assert reply == "Which film do you mean?"
        else:
            assert reply in ("Thanks.", "Thank you.", "Good to know.")
    assert END_OF_TURN == EOS_TOKEN  # what the chat template writes after an answer


def test_repeat_only_pairs_differ_by_one_sentence_said_again():
    pairs = build("preference")["test_repeat_only"]
    assert len(pairs) == 1000
    for row in pairs:
        prompt, chosen = row["prompt"][0]["content"], row["chosen"][0]["content"]
        rejected = row["rejected"][0]["content"]
        assert rejected.startswith(chosen + " ") and rejected[len(chosen) + 1:] in chosen
        assert gold_score(prompt, chosen) == gold_score(prompt, rejected) + 1
