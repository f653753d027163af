"""Policy evaluation metrics on cases with a known answer."""

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

from pipeline.evaluate import compare_policies, encode_prompts, win_rate
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
