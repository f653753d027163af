"""Evaluation: policies on held-out prompts (reward-model score, gold score when an oracle exists, KL to a
reference, win rates, EOS rate, length, distinct-n), reward models on preference pairs, perplexity, and
few-shot prompting.

Rollouts use the PPO trainer's own helpers (pipeline.rollout: generation, truncation at EOS, reward-model
scoring), so what is measured here is what PPO optimised.
"""

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from trl.trainer.utils import selective_log_softmax

from .rollout import attention_mask, ended, forward, generate, sampling_config, sequence_scores, truncate_after


@dataclass
class Rollouts:
    query_responses: torch.Tensor  # left-padded queries + responses truncated after their stop token, pad after
    attention_mask: torch.Tensor  # True on real tokens (rollout.attention_mask: from the layout, not the pad id)
    context_length: int
    responses: list[str]  # decoded responses, special tokens removed
    has_eos: torch.Tensor  # bool per row: the response ended at a stop token (turn end or EOS)


def encode_prompts(tokenizer, prompts: list) -> torch.Tensor:
    """Conversational (or plain) prompts -> left-padded input_ids ending with the generation prompt."""
    ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
           if isinstance(p, list) else tokenizer(p)["input_ids"] for p in prompts]
    return tokenizer.pad({"input_ids": ids}, padding_side="left", return_tensors="pt")["input_ids"]


@torch.no_grad()
def sample(model, tokenizer, queries: torch.Tensor, max_new_tokens: int, temperature: float,
           batch_size: int = 64) -> Rollouts:
    """Answers sampled at `temperature`, each ending at the first stop token (the end of an assistant turn as
    the chat template writes it, or EOS: models.stop_token_ids) or after `max_new_tokens`."""
    from .models import stop_token_ids

    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    pad = tokenizer.pad_token_id
    config = sampling_config(max_new_tokens, temperature, stops, pad)
    query_responses = generate(model, queries.to(model.device), pad, config, batch_size)
    context_length = queries.shape[1]
    responses = truncate_after(stops, pad, query_responses[:, context_length:])
    query_responses = torch.cat((query_responses[:, :context_length], responses), 1)
    return Rollouts(
        query_responses=query_responses,
        attention_mask=attention_mask(query_responses, context_length, pad, stops),
        context_length=context_length,
        responses=tokenizer.batch_decode(responses, skip_special_tokens=True),
        has_eos=ended(responses, stops).cpu(),
    )


@torch.no_grad()
def sequence_logprob(model, rollouts: Rollouts, temperature: float) -> torch.Tensor:
    """Sum over response tokens of log p(token), at the sampling temperature (as PPO computes it)."""
    query_responses = rollouts.query_responses.to(model.device)
    mask = rollouts.attention_mask.to(model.device)
    responses = query_responses[:, rollouts.context_length:]
    logits = forward(model, query_responses, mask).logits[:, rollouts.context_length - 1: -1]
    logprobs = selective_log_softmax(logits / (temperature + 1e-7), responses)
    return (logprobs * mask[:, rollouts.context_length:]).sum(1).cpu()


@torch.no_grad()
def reward_scores(reward_model, rollouts: Rollouts) -> torch.Tensor:
    device = next(reward_model.parameters()).device
    return sequence_scores(reward_model, rollouts.query_responses.to(device), rollouts.attention_mask.to(device),
                           rollouts.context_length).float().cpu()


def response_lengths(rollouts: Rollouts) -> torch.Tensor:
    return rollouts.attention_mask[:, rollouts.context_length:].sum(1).float().cpu()


def win_rate(scores_a, scores_b) -> float:
    """How often a beats b on the same prompt; ties count half."""
    a, b = torch.as_tensor(scores_a, dtype=torch.float), torch.as_tensor(scores_b, dtype=torch.float)
    return ((a > b).float() + 0.5 * (a == b).float()).mean().item()


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams of whitespace words, across the texts (diversity; 0 if none)."""
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def prompt_text(prompt) -> str:
    """The last user turn of a conversational prompt (what an oracle judges against), or the string itself."""
    return prompt[-1]["content"] if isinstance(prompt, list) else prompt


def _per_sample(rollouts: Rollouts, reward_model=None) -> dict:
    """Each answer's text, EOS, length and (with a reward model) score: lists that processes can gather."""
    rows = {"response": rollouts.responses, "has_eos": rollouts.has_eos.tolist(),
            "length": response_lengths(rollouts).tolist()}
    if reward_model is not None:
        rows["rm"] = reward_scores(reward_model, rollouts).tolist()
    return rows


def _summary(rows: dict, prompts: list, oracle=None) -> dict:
    """Means over the answers of `_per_sample`'s rows; with an oracle, each answer's gold score joins the rows."""
    total = len(rows["response"])
    metrics = {"eos_rate": sum(rows["has_eos"]) / total, "response_length": sum(rows["length"]) / total,
               "distinct_1": distinct_n(rows["response"], 1), "distinct_2": distinct_n(rows["response"], 2)}
    if "rm" in rows:
        metrics["rm_score"] = sum(rows["rm"]) / total
    if oracle is not None:
        rows["gold"] = [oracle(prompt_text(p), r) for p, r in zip(prompts, rows["response"])]
        metrics["gold_score"] = sum(rows["gold"]) / total
        if hasattr(oracle, "term_means"):  # the gold score in its parts (pipeline.embedded.ORACLE)
            metrics.update(oracle.term_means([prompt_text(p) for p in prompts], rows["response"]))
    return metrics


def evaluate_policy(policy, tokenizer, prompts: list, max_new_tokens: int, temperature: float, reward_model=None,
                    reference=None, oracle=None, samples_per_prompt: int = 1, seed: int = 0,
                    heldout_reward_models=()) -> dict:
    """One policy on held-out prompts: reward-model score, gold score, KL to `reference` (mean over the
    policy's own samples of the summed per-token log-ratio), length, EOS rate, distinct-n, samples;
    heldout_rm_score: the mean score of `heldout_reward_models` (reward models the policy was not trained against)."""
    prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    torch.manual_seed(seed)
    rollouts = sample(policy, tokenizer, encode_prompts(tokenizer, prompts), max_new_tokens, temperature)
    results = _summary(_per_sample(rollouts, reward_model), prompts, oracle)
    if heldout_reward_models:
        results["heldout_rm_score"] = sum(reward_scores(model, rollouts).mean().item()
                                          for model in heldout_reward_models) / len(heldout_reward_models)
    if reference is not None:
        results["kl_to_reference"] = (sequence_logprob(policy, rollouts, temperature)
                                      - sequence_logprob(reference, rollouts, temperature)).mean().item()
    results["eval_prompts"] = len(prompts)
    results["samples"] = [{"prompt": prompt_text(p), "response": r}
                          for p, r in list(zip(prompts, rollouts.responses))[::samples_per_prompt][:8]]
    return results


def _share(items: list, process_index: int, num_processes: int) -> list:
    """This process's slice of `items`, every slice the same length (the last item repeated to fill): each
    process then runs the same number of forward passes, which sharded (ZeRO-3) models need."""
    per = math.ceil(len(items) / num_processes)
    items = items + items[-1:] * (per * num_processes - len(items))
    return items[process_index * per:(process_index + 1) * per]


def _gather(values: list, num_processes: int, total: int) -> list:
    """Every process's values, in process order, without the fill of `_share`."""
    if num_processes > 1:
        from accelerate.utils import gather_object
        values = gather_object(values)
    return values[:total]


def compare_policies(policy, reference, reward_model, tokenizer, prompts: list, max_new_tokens: int,
                     temperature: float, oracle=None, samples_per_prompt: int = 1, seed: int = 0,
                     names: tuple[str, str] = ("ppo", "sft"), process_index: int = 0, num_processes: int = 1) -> dict:
    """Both policies answer the same prompts (same seed); metrics are keyed `<metric>_<name>`, plus the KL of
    the first to the second and the first's win rate against the second by the reward model and the oracle.
    With several processes, each answers its share of the prompts and every process returns the whole result.

    oracle: optional callable(prompt_text, response_text) -> float, the gold judge.
    """
    prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    total = len(prompts)
    mine = _share(prompts, process_index, num_processes)
    queries = encode_prompts(tokenizer, mine)
    per_sample, rollouts = {}, {}
    for name, model in zip(names, (policy, reference)):
        torch.manual_seed(seed + process_index)  # same randomness for both policies
        rollouts[name] = sample(model, tokenizer, queries, max_new_tokens, temperature)
        per_sample[name] = _per_sample(rollouts[name], reward_model)
    a, b = names
    per_sample[a]["kl"] = (sequence_logprob(policy, rollouts[a], temperature)
                           - sequence_logprob(reference, rollouts[a], temperature)).tolist()
    gathered = {name: {key: _gather(values, num_processes, total) for key, values in rows.items()}
                for name, rows in per_sample.items()}
    results = {}
    for name in names:
        results.update({f"{key}_{name}": value for key, value in _summary(gathered[name], prompts, oracle).items()})
    results[f"kl_to_{b}"] = sum(gathered[a]["kl"]) / total
    if reward_model is not None:
        results[f"rm_win_rate_vs_{b}"] = win_rate(gathered[a]["rm"], gathered[b]["rm"])
    if oracle is not None:
        results[f"gold_win_rate_vs_{b}"] = win_rate(gathered[a]["gold"], gathered[b]["gold"])
    results["eval_prompts"] = total
    results["samples"] = [
        {"prompt": prompt_text(p), a: ra, b: rb}
        for p, ra, rb in list(zip(prompts, gathered[a]["response"], gathered[b]["response"]))[::samples_per_prompt][:8]
    ]
    return results


@torch.no_grad()
def score_texts(reward_model, tokenizer, conversations: list, batch_size: int = 64) -> torch.Tensor:
    """Reward-model scores of full conversations (or strings), tokenized as the RewardTrainer tokenizes them: a
    conversation rendered to ids once by the chat template (a tokenizer that adds BOS itself gets one BOS, not
    a second one from tokenizing the rendered text again), a string with EOS appended and special tokens added."""
    ids = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=False) if isinstance(c, list)
           else tokenizer(c if c.endswith(tokenizer.eos_token) else c + tokenizer.eos_token)["input_ids"]
           for c in conversations]
    scores = []
    for i in range(0, len(ids), batch_size):
        batch = tokenizer.pad({"input_ids": ids[i:i + batch_size]}, padding_side="right", return_tensors="pt")
        scores.append(reward_model(**batch.to(reward_model.device)).logits[:, 0].float().cpu())
    return torch.cat(scores)


def _answer(value) -> str:
    return value[-1]["content"] if isinstance(value, list) else value


def _with_prompt(row: dict, side: str):
    return row[side] if row.get("prompt") is None else row["prompt"] + row[side]


def evaluate_reward_model(reward_model, tokenizer, pairs, oracle=None, batch_size: int = 64) -> dict:
    """Pairwise accuracy, mean margin and score distribution on preference pairs.

    With an oracle, the reference ordering is the oracle's (pairs it scores equal are skipped), so the
    accuracy is agreement with the gold preference; otherwise it is the dataset's chosen/rejected label.
    """
    rows = list(pairs)
    if oracle is not None:
        gaps = [oracle(prompt_text(r["prompt"]), _answer(r["chosen"])) - oracle(prompt_text(r["prompt"]),
                                                                                 _answer(r["rejected"]))
                for r in rows]
        rows = [dict(r, chosen=r["rejected"], rejected=r["chosen"]) if gap < 0 else r
                for r, gap in zip(rows, gaps) if gap != 0]
    chosen = score_texts(reward_model, tokenizer, [_with_prompt(r, "chosen") for r in rows], batch_size)
    rejected = score_texts(reward_model, tokenizer, [_with_prompt(r, "rejected") for r in rows], batch_size)
    margin = chosen - rejected
    scores = torch.cat([chosen, rejected])
    return {
        "accuracy": (margin > 0).float().mean().item(),
        "mean_margin": margin.mean().item(),
        "pairs": len(rows),
        "reference": "oracle" if oracle is not None else "labels",
        "score_mean": scores.mean().item(),
        "score_std": scores.std().item(),
        "score_quantiles": {str(q): scores.quantile(q).item() for q in (0.05, 0.25, 0.5, 0.75, 0.95)},
        "chosen_score_mean": chosen.mean().item(),
        "rejected_score_mean": rejected.mean().item(),
    }


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], max_length: int = 128, batch_size: int = 32) -> float:
    """exp(mean negative log-likelihood per predicted token) of `texts`, each followed by EOS."""
    total_nll, total_tokens = 0.0, 0
    for i in tqdm(range(0, len(texts), batch_size), desc="perplexity", unit="batch", leave=False):
        batch = tokenizer([t + tokenizer.eos_token for t in texts[i:i + batch_size]], padding=True,
                          truncation=True, max_length=max_length, return_tensors="pt", padding_side="right")
        batch = batch.to(model.device)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        logits = model(**batch).logits[:, :-1].float()
        targets = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                ignore_index=-100, reduction="sum")
        total_nll += nll.item()
        total_tokens += (targets != -100).sum().item()
    return math.exp(total_nll / max(1, total_tokens))


@torch.no_grad()
def choice_logprobs(model, tokenizer, contexts: list[str], choice: str, batch_size: int = 32) -> torch.Tensor:
    """log p(choice | context) for every context, summed over the choice's tokens. A context longer than
    the model's positions loses its oldest tokens."""
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    sequences, starts = [], []
    for context in contexts:
        context_ids = tokenizer(context)["input_ids"]
        choice_ids = tokenizer(context + choice)["input_ids"][len(context_ids):]
        if limit and len(context_ids) + len(choice_ids) > limit:
            context_ids = context_ids[len(context_ids) + len(choice_ids) - limit:]
        sequences.append(context_ids + choice_ids)
        starts.append(len(context_ids))
    totals = []
    for i in range(0, len(sequences), batch_size):
        batch = tokenizer.pad({"input_ids": sequences[i:i + batch_size]}, padding_side="right", return_tensors="pt")
        batch = batch.to(model.device)
        logprobs = torch.log_softmax(model(**batch).logits[:, :-1].float(), -1)
        token_logprobs = logprobs.gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        positions = torch.arange(token_logprobs.shape[1], device=model.device)[None]
        lengths = batch["attention_mask"].sum(1, keepdim=True)
        begin = torch.tensor(starts[i:i + batch_size], device=model.device)[:, None]
        mask = (positions >= begin - 1) & (positions < lengths - 1)  # predictions of the choice's tokens
        totals.append((token_logprobs * mask).sum(1).cpu())
    return torch.cat(totals)


def few_shot_accuracy(model, tokenizer, task: dict, shots: list[int]) -> dict:
    """GPT-2/GPT-3-style in-context evaluation, no gradient: for each k, every test example is preceded by k
    demonstrations, and the answer is the choice with the highest likelihood. Returns accuracy by k, beside
    `chance` (1 / number of choices) and `majority`, the accuracy of always giving the commonest label: the bar a
    model must clear to show it read the input at all.

    task: {"instruction": str, "template": "... {input} ...", "choices": [str], "demonstrations": [{"input",
    "label"}], "examples": [{"input", "label"}]} (labels are indices into choices).
    """
    results = {}
    labels = torch.tensor([example["label"] for example in task["examples"]])
    for k in tqdm(shots, desc="few-shot", unit="k", leave=False):
        contexts = []
        for i, example in enumerate(task["examples"]):
            demos = [task["demonstrations"][(i + j) % len(task["demonstrations"])] for j in range(k)]
            contexts.append(task["instruction"] + "".join(
                task["template"].format(input=d["input"]) + task["choices"][d["label"]] + "\n\n" for d in demos)
                + task["template"].format(input=example["input"]))
        scores = torch.stack([choice_logprobs(model, tokenizer, contexts, c) for c in task["choices"]], 1)
        results[f"{k}_shot"] = (scores.argmax(1) == labels).float().mean().item()
    results["chance"] = 1 / len(task["choices"])
    results["majority"] = labels.bincount().max().item() / len(labels)
    results["examples"] = len(labels)
    return results
