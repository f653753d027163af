"""Policy evaluation on held-out prompts: reward-model score, gold score (when an oracle exists), KL to a
reference policy, win rate of one policy against another, EOS rate and length.

Rollouts use TRL's own PPO helpers (generation, truncation at EOS, reward-model scoring), so what is
measured here is what PPO optimised.
"""

from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from trl.experimental.ppo.ppo_trainer import batch_generation, forward, truncate_response
from trl.experimental.utils import first_true_indices, get_reward
from trl.trainer.utils import selective_log_softmax


@dataclass
class Rollouts:
    query_responses: torch.Tensor  # left-padded queries + responses truncated after EOS, pad after
    context_length: int
    responses: list[str]  # decoded responses, special tokens removed
    has_eos: torch.Tensor  # bool per row


def encode_prompts(tokenizer, prompts: list) -> torch.Tensor:
    """Conversational (or plain) prompts -> left-padded input_ids ending with the generation prompt."""
    ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
           if isinstance(p, list) else tokenizer(p)["input_ids"] for p in prompts]
    return tokenizer.pad({"input_ids": ids}, padding_side="left", return_tensors="pt")["input_ids"]


@torch.no_grad()
def sample(model, tokenizer, queries: torch.Tensor, max_new_tokens: int, temperature: float,
           batch_size: int = 64) -> Rollouts:
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature + 1e-7, top_k=0, top_p=1.0,
                              do_sample=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    query_responses, _ = batch_generation(model, queries.to(model.device), batch_size, tokenizer.pad_token_id, config)
    context_length = queries.shape[1]
    responses = truncate_response(tokenizer.eos_token_id, tokenizer.pad_token_id, query_responses[:, context_length:])
    return Rollouts(
        query_responses=torch.cat((query_responses[:, :context_length], responses), 1),
        context_length=context_length,
        responses=tokenizer.batch_decode(responses, skip_special_tokens=True),
        has_eos=(responses == tokenizer.eos_token_id).any(1).cpu(),
    )


@torch.no_grad()
def sequence_logprob(model, rollouts: Rollouts, pad_token_id: int, temperature: float) -> torch.Tensor:
    """Sum over response tokens of log p(token), at the sampling temperature (as PPO computes it)."""
    responses = rollouts.query_responses[:, rollouts.context_length:]
    logits = forward(model, rollouts.query_responses, pad_token_id).logits[:, rollouts.context_length - 1: -1]
    logprobs = selective_log_softmax(logits / (temperature + 1e-7), responses)
    return (logprobs * (responses != pad_token_id)).sum(1).cpu()


@torch.no_grad()
def reward_scores(reward_model, rollouts: Rollouts, pad_token_id: int) -> torch.Tensor:
    return get_reward(reward_model, rollouts.query_responses, pad_token_id, rollouts.context_length)[1].squeeze(-1).cpu()


def response_lengths(rollouts: Rollouts, pad_token_id: int) -> torch.Tensor:
    responses = rollouts.query_responses[:, rollouts.context_length:]
    return (first_true_indices(responses == pad_token_id)).float().cpu()


def win_rate(scores_a, scores_b) -> float:
    """How often a beats b on the same prompt; ties count half."""
    a, b = torch.as_tensor(scores_a, dtype=torch.float), torch.as_tensor(scores_b, dtype=torch.float)
    return ((a > b).float() + 0.5 * (a == b).float()).mean().item()


def compare_policies(policy, reference, reward_model, tokenizer, prompts: list, max_new_tokens: int,
                     temperature: float, oracle=None, samples_per_prompt: int = 1, seed: int = 0,
                     names: tuple[str, str] = ("ppo", "sft")) -> dict:
    """Both policies answer the same prompts; returns metrics keyed `<metric>_<name>` plus the comparison.

    oracle: optional callable(prompt_text, response_text) -> float, the gold judge.
    """
    prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    queries = encode_prompts(tokenizer, prompts)
    pad = tokenizer.pad_token_id
    results, rollouts, gold = {}, {}, {}
    for name, model in zip(names, (policy, reference)):
        torch.manual_seed(seed)  # same randomness for both policies
        rollouts[name] = r = sample(model, tokenizer, queries, max_new_tokens, temperature)
        results[f"rm_score_{name}"] = reward_scores(reward_model, r, pad).mean().item()
        results[f"eos_rate_{name}"] = r.has_eos.float().mean().item()
        results[f"response_length_{name}"] = response_lengths(r, pad).mean().item()
        if oracle is not None:
            texts = [p[-1]["content"] if isinstance(p, list) else p for p in prompts]
            gold[name] = [oracle(t, resp) for t, resp in zip(texts, r.responses)]
            results[f"gold_score_{name}"] = sum(gold[name]) / len(gold[name])
    a, b = names
    own = rollouts[a]
    results[f"kl_to_{b}"] = (sequence_logprob(policy, own, pad, temperature)
                             - sequence_logprob(reference, own, pad, temperature)).mean().item()
    results[f"rm_win_rate_vs_{b}"] = win_rate(reward_scores(reward_model, own, pad),
                                              reward_scores(reward_model, rollouts[b], pad))
    if oracle is not None:
        results[f"gold_win_rate_vs_{b}"] = win_rate(gold[a], gold[b])
    results["eval_prompts"] = len(prompts)
    results["samples"] = [
        {"prompt": p[-1]["content"] if isinstance(p, list) else p, a: ra, b: rb}
        for p, ra, rb in list(zip(prompts, rollouts[a].responses, rollouts[b].responses))[::samples_per_prompt][:8]
    ]
    return results
