"""PPO's arithmetic (pipeline/trainers/ppo_math.py, pipeline/rollout.py) on small cases computed by hand."""

import math

import pytest
import torch

from pipeline import rollout
from pipeline.trainers import ppo_math

T, F = True, False


def close(tensor: torch.Tensor, expected) -> None:
    torch.testing.assert_close(tensor, torch.tensor(expected, dtype=tensor.dtype), atol=1e-6, rtol=1e-6)


def test_first_true_index_and_truncation_after_the_stop_token():
    assert rollout.first_true_indices(torch.tensor([[F, T, T], [F, F, F], [T, F, F]])).tolist() == [1, 3, 0]
    responses = torch.tensor([[5, 2, 7, 8], [5, 6, 7, 8], [2, 9, 9, 9]])
    assert rollout.truncate_after(2, 0, responses).tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    # several stop tokens (a turn end and EOS): the first of either ends the response
    responses = torch.tensor([[5, 3, 2, 8], [5, 6, 2, 3], [5, 6, 7, 8]])
    assert rollout.truncate_after([3, 2], 0, responses).tolist() == [[5, 3, 0, 0], [5, 6, 2, 0], [5, 6, 7, 8]]
    assert rollout.ended(responses, [3, 2]).tolist() == [T, T, F]


def test_attention_mask_comes_from_the_layout_not_from_the_pad_id():
    """A response may hold the pad id as a real token (a tokenizer whose pad the model emits, Qwen's
    <|endoftext|>): it stays attended, and only what follows the stop token is padding. Queries are real from
    their first non-pad token."""
    pad, stop = 0, 2
    rows = torch.tensor([[0, 0, 7, 5, 0, 6, 2, 0],   # query [7], answer 5 <pad-id> 6 <stop>, then padding
                         [0, 8, 7, 0, 5, 5, 5, 5]])  # query [8, 7], answer <pad-id> 5 5 5 5 (no stop: all real)
    mask = rollout.attention_mask(rows, 3, pad, [stop])
    assert mask.tolist() == [[F, F, T, T, T, T, T, F], [F, T, T, T, T, T, T, T]]
    last, padding, _, _ = ppo_math.response_masks(mask[:, 3:])
    assert last.tolist() == [3, 4]
    assert padding.tolist() == [[F, F, F, F, T], [F, F, F, F, F]]


def test_response_masks_put_the_score_one_past_the_last_token_when_there_is_room():
    responses = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]])
    last, padding, padding_p1, score_at = ppo_math.response_masks(rollout.response_mask(responses, 2))
    assert last.tolist() == [1, 3, 0]
    assert padding.tolist() == [[F, F, T, T], [F, F, F, F], [F, T, T, T]]
    assert padding_p1.tolist() == [[F, F, F, T], [F, F, F, F], [F, F, T, T]]
    assert score_at.tolist() == [2, 3, 1]  # the full-length row keeps it on its last token


def test_missing_eos_penalty_only_hits_responses_without_a_stop_token():
    responses = torch.tensor([[5, 2, 0], [5, 6, 7], [2, 0, 0]])
    ended = rollout.ended(responses, [2])
    scores, has_eos = ppo_math.apply_missing_eos_penalty(torch.tensor([1.0, 1.0, -0.5]), ended, 1.5)
    assert scores.tolist() == [1.0, -0.5, -0.5] and has_eos.tolist() == [T, F, T]
    unchanged, _ = ppo_math.apply_missing_eos_penalty(torch.tensor([1.0, 1.0, -0.5]), ended, None)
    assert unchanged.tolist() == [1.0, 1.0, -0.5]


def test_kl_estimators():
    logp, logq = torch.log(torch.tensor([0.5, 0.25, 0.3])), torch.log(torch.tensor([0.25, 0.5, 0.3]))
    k1 = ppo_math.kl_per_token(logp, logq, "k1")
    k3 = ppo_math.kl_per_token(logp, logq, "k3")
    assert k1.tolist() == pytest.approx([math.log(2), -math.log(2), 0.0], abs=1e-6)  # log p - log q, may be < 0
    # (q/p - 1) - log(q/p): 0.5 - 1 + log 2 and 2 - 1 - log 2, never negative
    assert k3.tolist() == pytest.approx([math.log(2) - 0.5, 1 - math.log(2), 0.0], abs=1e-6)
    with pytest.raises(ValueError, match="'k1' or 'k3'"):
        ppo_math.kl_per_token(logp, logq, "k2")


def test_token_rewards_are_the_kl_penalty_plus_the_score_at_its_token():
    kl = torch.tensor([[0.1, 0.2, 0.0], [0.4, 0.0, 0.0]])
    rewards, non_score = ppo_math.token_rewards(torch.tensor([1.0, -2.0]), kl, 0.5, torch.tensor([1, 0]))
    close(non_score, [[-0.05, -0.1, 0.0], [-0.2, 0.0, 0.0]])
    close(rewards, [[-0.05, 0.9, 0.0], [-2.2, 0.0, 0.0]])


def test_gae_by_hand():
    rewards, values = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.5, 0.5]])
    # gamma 1, lam 0.5: deltas (0, 0, 0.5); A2 = 0.5, A1 = 0 + 0.5 * 0.5, A0 = 0 + 0.5 * 0.25
    advantages, returns = ppo_math.gae(rewards, values, gamma=1.0, lam=0.5)
    close(advantages, [[0.125, 0.25, 0.5]])
    close(returns, [[0.625, 0.75, 1.0]])
    # gamma 0.9, lam 1: deltas (-0.05, -0.05, 0.5); A1 = -0.05 + 0.9 * 0.5, A0 = -0.05 + 0.9 * 0.4
    advantages, _ = ppo_math.gae(rewards, values, gamma=0.9, lam=1.0)
    close(advantages, [[0.31, 0.4, 0.5]])
    # gamma = lam = 1 and no value: the reward to go
    advantages, _ = ppo_math.gae(torch.tensor([[1.0, 2.0, 3.0]]), torch.zeros(1, 3), gamma=1.0, lam=1.0)
    close(advantages, [[6.0, 5.0, 3.0]])


def test_whitening_over_the_masked_entries():
    values, mask = torch.tensor([2.0, 4.0, 6.0, 100.0]), torch.tensor([T, T, T, F])
    assert ppo_math.masked_mean(values, mask).item() == pytest.approx(4.0)
    assert ppo_math.masked_var(values, mask).item() == pytest.approx(4.0)  # (4 + 0 + 4) / (3 - 1)
    assert ppo_math.masked_whiten(values, mask)[:3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)
    # shift_mean=False (whiten_rewards): rescaled to unit variance, the mean kept
    assert ppo_math.masked_whiten(values, mask, shift_mean=False)[:3].tolist() == pytest.approx([3.0, 4.0, 5.0])
    with pytest.raises(ValueError, match="at least 2"):
        ppo_math.masked_var(values, torch.tensor([T, F, F, F]))


def test_clipped_policy_loss_by_hand():
    old = torch.log(torch.tensor([[0.2, 0.2]]))
    new = old + math.log(1.5)  # ratio 1.5 on both tokens, cliprange 0.2
    advantages = torch.tensor([[1.0, -1.0]])
    loss, clipfrac, ratio = ppo_math.policy_loss(new, old, advantages, torch.tensor([[T, T]]), cliprange=0.2)
    # token 1: max(-1.5, -1.2) = -1.2 (the clip holds the gain); token 2: max(1.5, 1.2) = 1.5 (no clip on a loss)
    assert loss.item() == pytest.approx((-1.2 + 1.5) / 2) and clipfrac.item() == pytest.approx(0.5)
    close(ratio, [[1.5, 1.5]])
    loss, _, _ = ppo_math.policy_loss(new, old, advantages, torch.tensor([[T, F]]), cliprange=0.2)
    assert loss.item() == pytest.approx(-1.2)  # the masked token does not count
    loss, clipfrac, _ = ppo_math.policy_loss(old, old, advantages, torch.tensor([[T, T]]), cliprange=0.2)
    assert loss.item() == pytest.approx(0.0) and clipfrac.item() == 0.0  # ratio 1: -mean(A)


def test_clipped_value_loss_by_hand():
    values, old, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.0]]), torch.tensor([[2.0, 1.0]])
    loss, clipfrac = ppo_math.value_loss(values, old, returns, torch.tensor([[T, T]]), cliprange_value=0.2)
    # token 1: V clipped to 0.7, max((1 - 2)^2, (0.7 - 2)^2) = 1.69; token 2: inside the range, (0 - 1)^2 = 1
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0) / 2) and clipfrac.item() == pytest.approx(0.5)
    loss, _ = ppo_math.value_loss(values, old, returns, torch.tensor([[F, T]]), cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.5)
