"""The arithmetic of PPO for language models (Ziegler et al. 2019; Stiennon et al. 2020; TRL 1.12's
PPOTrainer): per-token KL penalty, score at the last token, GAE, whitening, clipped policy and value losses.

Tensors are (rows, response tokens). `mask` is True on the tokens that count; functions take plain tensors
and return plain tensors, so each can be checked by hand (tests/test_ppo_math.py).
"""

import torch


def response_masks(response_mask: torch.Tensor) -> tuple:
    """For responses whose real tokens are `response_mask` (True up to and including the stop token, padding
    after): (index of each response's last token, `padding` True after it, `padding_p1` True from two tokens after
    it, the index the score goes to: one past the last token where there is room, else the last token). As TRL
    1.12: the value model is trained one token further than the policy, on the position that holds the score."""
    last = response_mask.sum(1) - 1
    positions = torch.arange(response_mask.shape[1], device=response_mask.device)
    padding = positions > last[:, None]
    padding_p1 = positions > (last + 1)[:, None]
    score_at = torch.where(last + 1 < response_mask.shape[1], last + 1, last)
    return last, padding, padding_p1, score_at


def apply_missing_eos_penalty(scores: torch.Tensor, ended: torch.Tensor, penalty: float | None) -> tuple:
    """Scores with `penalty` subtracted where a response did not end (`ended` False: no stop token; None:
    unchanged), and `ended`."""
    if penalty is None:
        return scores, ended
    return scores - penalty * (~ended).to(scores.dtype), ended


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(dim) / mask.sum(dim)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased (Bessel-corrected) variance over the masked entries."""
    count = mask.sum()
    if count < 2:
        raise ValueError("whitening needs at least 2 unmasked values: use a larger per-process mini-batch")
    centered = values - masked_mean(values, mask)
    return masked_mean(centered ** 2, mask) * count / (count - 1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / std over the masked entries; `shift_mean=False` keeps the mean (only rescales)."""
    mean = masked_mean(values, mask)
    whitened = (values - mean) * torch.rsqrt(masked_var(values, mask) + 1e-8)
    return whitened if shift_mean else whitened + mean


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Estimates of KL(policy || reference) at each sampled token (http://joschu.net/blog/kl-approx.html):
    k1 = log p - log q (unbiased, can be negative), k3 = (r - 1) - log r with r = q / p (unbiased, >= 0)."""
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return log_ratio.exp() - 1 - log_ratio
    raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {estimator!r}")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, last_index: torch.Tensor) -> tuple:
    """Per-token rewards: -kl_coef x KL everywhere, plus the sequence's score at its last token
    (`last_index`). Returns (rewards, the KL part alone)."""
    non_score = -kl_coef * kl
    rewards = non_score.clone()
    rewards[torch.arange(len(rewards), device=rewards.device), last_index] += scores
    return rewards, non_score


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> tuple:
    """Generalised advantage estimation (Schulman et al. 2016) over each row, the value after the last token 0:
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}. Returns (advantages, returns = A + V)."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages, advantages + values


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float) -> tuple:
    """PPO's clipped surrogate, as a loss: mean of max(-A r, -A clip(r, 1-eps, 1+eps)), r = exp(new - old).
    Returns (loss, fraction of tokens where the clip was active, ratio)."""
    ratio = (logprobs - old_logprobs).exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask), ratio


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple:
    """0.5 x mean of max((V - R)^2, (clip(V, V_old +- eps) - R)^2). Returns (loss, fraction clipped)."""
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask)
