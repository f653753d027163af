"""Policy evaluation metrics on cases with a known answer."""

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

from pipeline.evaluate import (
    choice_logprobs, compare_policies, distinct_n, encode_prompts, evaluate_reward_model, few_shot_accuracy,
    perplexity, win_rate,
)
from pipeline.models import fit_to_tokenizer, train_tokenizer

PROMPTS = [[{"role": "user", "content": "Write a review of The Lost River."}],
           [{"role": "user", "content": "What did you think of The Iron Crown?"}]]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    tokenizer = train_tokenizer(["Write a review of The Lost River. It felt superb.",
                                 "What did you think of The Iron Crown? It felt dull."] * 40, vocab_size=300)
    tokenizer.padding_side = "left"
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2, n_positions=64,
                        pad_token_id=tokenizer.pad_token_id)
    policy = fit_to_tokenizer(GPT2LMHeadModel(config), tokenizer).eval()
    reward = fit_to_tokenizer(GPT2ForSequenceClassification(copy.deepcopy(config)), tokenizer).eval()
    reward.config.num_labels = 1
    reward.score = torch.nn.Linear(32, 1, bias=False)
    return tokenizer, policy, reward


def test_win_rate_counts_ties_half():
    assert win_rate([1, 2, 3], [0, 2, 4]) == pytest.approx(0.5)
    assert win_rate([1, 1], [0, 0]) == 1.0


def test_prompts_are_left_padded_and_end_with_the_generation_prompt(setup):
    tokenizer, _, _ = setup
    ids = encode_prompts(tokenizer, PROMPTS)
    assert ids.shape[0] == 2
    assert (ids[:, -1] == ids[0, -1]).all()  # both end with the same generation-prompt token
    assert tokenizer.decode(ids[0], skip_special_tokens=True).endswith("Assistant:")


def test_a_policy_against_itself(setup):
    tokenizer, policy, reward = setup
    results = compare_policies(policy, policy, reward, tokenizer, PROMPTS, max_new_tokens=8, temperature=1.0,
                               oracle=lambda prompt, response: len(response), samples_per_prompt=3)
    assert results["kl_to_sft"] == pytest.approx(0.0, abs=1e-6)
    assert results["gold_win_rate_vs_sft"] == 0.5  # same seed, same samples: every pair ties
    assert results["rm_score_ppo"] == pytest.approx(results["rm_score_sft"])
    assert results["eval_prompts"] == 6


def test_kl_to_a_different_policy_is_positive(setup):
    tokenizer, policy, reward = setup
    other = copy.deepcopy(policy)
    with torch.no_grad():
        other.lm_head.weight.mul_(3.0)  # sharper distribution
    results = compare_policies(other, policy, reward, tokenizer, PROMPTS, max_new_tokens=8, temperature=1.0,
                               samples_per_prompt=8)
    assert results["kl_to_sft"] > 0.1
    assert "gold_win_rate_vs_sft" not in results  # no oracle, no gold metrics


def test_distinct_n():
    assert distinct_n(["a b a b"], 1) == 0.5
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n([""], 2) == 0.0


class KeywordRewardModel(torch.nn.Module):
    """Scores +1 for a text containing `token_id`, -1 otherwise: a reward model with a known answer."""

    def __init__(self, token_id):
        super().__init__()
        self.token_id = token_id
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    @property
    def device(self):
        return self.anchor.device

    def forward(self, input_ids, attention_mask):
        hit = ((input_ids == self.token_id) & attention_mask.bool()).any(1).float()
        return SimpleNamespace(logits=(2 * hit - 1)[:, None])


def test_reward_model_that_prefers_every_chosen_has_accuracy_one(setup):
    tokenizer, _, _ = setup
    good = tokenizer("superb", add_special_tokens=False)["input_ids"][-1]
    model = KeywordRewardModel(good)
    pairs = [{"prompt": PROMPTS[0], "chosen": [{"role": "assistant", "content": "It felt superb."}],
              "rejected": [{"role": "assistant", "content": "It felt dull."}]}] * 5
    result = evaluate_reward_model(model, tokenizer, pairs)
    assert result["accuracy"] == 1.0 and result["mean_margin"] == pytest.approx(2.0) and result["pairs"] == 5
    flipped = [dict(p, chosen=p["rejected"], rejected=p["chosen"]) for p in pairs]
    assert evaluate_reward_model(model, tokenizer, flipped)["accuracy"] == 0.0
    # against an oracle, the labels do not matter: the oracle's ordering is the reference
    oracle = lambda prompt, answer: 1.0 if "superb" in answer else 0.0  # noqa: E731
    assert evaluate_reward_model(model, tokenizer, flipped, oracle=oracle)["accuracy"] == 1.0


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(setup):
    tokenizer, policy, _ = setup
    uniform = copy.deepcopy(policy)
    with torch.no_grad():
        uniform.lm_head.weight.zero_()  # tied to the input embeddings: all logits are 0
    assert perplexity(uniform, tokenizer, ["It felt superb.", "It felt dull. It felt dull."]) == pytest.approx(
        uniform.config.vocab_size, rel=1e-4)


def test_batched_choice_logprobs_match_a_direct_computation(setup):
    tokenizer, policy, _ = setup
    contexts = ["Write a review", "What did you think of The Iron Crown? It felt"]
    got = choice_logprobs(policy, tokenizer, contexts, " superb.")
    for context, value in zip(contexts, got):
        context_ids = tokenizer(context)["input_ids"]
        full = tokenizer(context + " superb.")["input_ids"]
        logprobs = torch.log_softmax(policy(input_ids=torch.tensor([full])).logits[0], -1)
        expected = sum(logprobs[i - 1, full[i]].item() for i in range(len(context_ids), len(full)))
        assert value.item() == pytest.approx(expected, abs=1e-4)


def test_few_shot_with_no_preference_picks_the_first_choice(setup):
    tokenizer, policy, _ = setup
    uniform = copy.deepcopy(policy)
    with torch.no_grad():
        uniform.lm_head.weight.zero_()
    examples = [{"input": "It felt superb.", "label": label} for label in (0, 0, 1, 0)]
    task = {"instruction": "", "template": "Review: {input}\nSentiment:", "choices": ["x", "y"],
            "demonstrations": examples, "examples": examples}
    assert few_shot_accuracy(uniform, tokenizer, task, [0, 2]) == {"0_shot": 0.75, "2_shot": 0.75, "chance": 0.5,
                                                                  "majority": 0.75, "examples": 4}
