"""Rollouts of a causal LM on left-padded prompts, shared by PPO training and the evaluation.

Rows are `query + response`: queries left-padded, responses right-padded with the pad token after the token
that ended them. Which tokens are real is decided by the layout, never by comparing ids with the pad id (a
tokenizer's pad may be a token the model emits, e.g. Qwen's `<|endoftext|>`): a query's real tokens run from
its first non-pad token to its end, a response's from its start up to and including its first stop token (all
of it where it has none). `attention_mask` builds that mask; `forward` counts positions from each row's first
real token, so a row means the same to the model whatever its padding.
"""

import copy

import torch
from transformers import GenerationConfig
from trl.trainer.utils import pad, selective_log_softmax

from . import sampler


def first_true_indices(bools: torch.Tensor) -> torch.Tensor:
    """Index of the first True in each row, or the row length if there is none."""
    length = bools.shape[-1]
    positions = torch.arange(length, device=bools.device)
    return torch.where(bools, positions, length).min(-1).values


def _ids(stop_token_ids) -> list[int]:
    return [] if stop_token_ids is None else [stop_token_ids] if isinstance(stop_token_ids, int) else list(stop_token_ids)


def response_mask(responses: torch.Tensor, stop_token_ids) -> torch.Tensor:
    """True on each response's real tokens: up to and including its first stop token (every token where it has
    none, or where `stop_token_ids` is empty)."""
    stops = _ids(stop_token_ids)
    positions = torch.arange(responses.shape[1], device=responses.device)
    if not stops:
        return torch.ones_like(responses, dtype=torch.bool)
    ended = torch.isin(responses, torch.tensor(stops, device=responses.device))
    return positions <= first_true_indices(ended).unsqueeze(-1)


def ended(responses: torch.Tensor, stop_token_ids) -> torch.Tensor:
    """Whether each response holds a stop token (it ended rather than ran out of tokens)."""
    stops = _ids(stop_token_ids)
    if not stops:
        return torch.zeros(len(responses), dtype=torch.bool, device=responses.device)
    return torch.isin(responses, torch.tensor(stops, device=responses.device)).any(1)


def truncate_after(stop_token_ids, pad_token_id: int, responses: torch.Tensor) -> torch.Tensor:
    """Everything after the first stop token of each response becomes padding (the stop token is kept)."""
    return responses.masked_fill(~response_mask(responses, stop_token_ids), pad_token_id)


def query_mask(queries: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """True on left-padded queries' real tokens: from each row's first non-pad token on."""
    return (queries != pad_token_id).cumsum(1) > 0


def attention_mask(query_responses: torch.Tensor, context_length: int, pad_token_id: int,
                   stop_token_ids) -> torch.Tensor:
    """The real tokens of `query + response` rows (see the module's docstring)."""
    return torch.cat((query_mask(query_responses[:, :context_length], pad_token_id),
                      response_mask(query_responses[:, context_length:], stop_token_ids)), 1)


def forward(model, query_responses: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
    """The model on padded rows, `attention_mask` False on padding, positions counted from each row's first
    real token."""
    position_ids = attention_mask.cumsum(1) - attention_mask.long()
    input_ids = query_responses.masked_fill(~attention_mask, 0)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, return_dict=True,
                 output_hidden_states=True, use_cache=False, **kwargs)


def sampling_config(response_length: int, temperature: float, stop_token_ids,
                    pad_token_id: int) -> GenerationConfig:
    """Plain sampling at `temperature` (no top-k/top-p), as PPO's log-probabilities assume, stopping at any of
    `stop_token_ids` (none: `response_length` tokens every time)."""
    stops = _ids(stop_token_ids)
    # every logits processor a model's own generation_config.json may switch on is set off here: `generate` fills
    # the fields left unset from it (a Hub model's repetition_penalty would otherwise change what is sampled)
    return GenerationConfig(max_new_tokens=response_length, min_new_tokens=0, min_length=0,
                            temperature=temperature + 1e-7, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0,
                            epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0,
                            encoder_repetition_penalty=1.0, no_repeat_ngram_size=0, do_sample=True,
                            eos_token_id=stops or None, pad_token_id=pad_token_id)


def plain_sampling(config: GenerationConfig) -> bool:
    """Whether `config` only samples at a temperature (transformers 5 leaves unset fields None)."""
    unset = ("bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "sequence_bias",
             "forced_bos_token_id", "forced_eos_token_id", "stop_strings", "guidance_scale", "watermarking_config")
    return bool(config.do_sample and config.temperature and config.max_new_tokens
                and (config.num_beams or 1) == 1 and (config.num_return_sequences or 1) == 1
                and not config.top_k and not config.min_p and config.top_p in (None, 1.0)
                and config.typical_p in (None, 1.0) and config.repetition_penalty in (None, 1.0)
                and not config.no_repeat_ngram_size and not config.min_new_tokens and not config.min_length
                and not config.epsilon_cutoff and not config.eta_cutoff
                and all(getattr(config, name, None) is None for name in unset))


@torch.no_grad()
def generate(model, queries: torch.Tensor, pad_token_id: int, config: GenerationConfig, batch_size: int,
             return_logprobs: bool = False):
    """Sample a response for every query, `batch_size` queries at a time. Returns the right-padded
    `query + response` rows and, with `return_logprobs`, each response token's log-probability under the
    temperature (what it was drawn from; any value on the padding after a stop token). Plain sampling runs
    through `pipeline.sampler` where the model allows it, else through transformers' `generate`."""
    if plain_sampling(config) and sampler.supported(model) is None:
        rows, logprobs = sampler.sample(model, queries, pad_token_id, config.max_new_tokens, config.temperature,
                                        _ids(config.eos_token_id), batch_size)
    else:
        rows, logprobs = _generate(model, queries, pad_token_id, config, batch_size, return_logprobs)
    # trl's `pad` stacks the chunks (chunks, rows, ...), padded to the longest: flattened back to rows
    query_responses = pad(rows, padding_value=pad_token_id, padding_side="right")
    query_responses = query_responses.view(-1, query_responses.shape[-1])[: len(queries)]
    if not return_logprobs:
        return query_responses
    logprobs = pad(logprobs, padding_value=0, padding_side="right")
    return query_responses, logprobs.view(-1, logprobs.shape[-1])[: len(queries)]


def _generate(model, queries, pad_token_id, config, batch_size, return_logprobs):
    rows, logprobs = [], []
    # in the config, not as generate() kwargs beside it (which transformers warns about)
    step_config = copy.deepcopy(config)
    step_config.return_dict_in_generate, step_config.output_scores = True, return_logprobs
    for start in range(0, len(queries), batch_size):
        query = queries[start:start + batch_size]
        mask = query_mask(query, pad_token_id)
        output = model.generate(input_ids=query.masked_fill(~mask, 0), attention_mask=mask,
                                generation_config=step_config)
        responses = output.sequences[:, query.shape[1]:]
        rows.append(torch.cat((query, responses), 1))
        if return_logprobs:  # the scores are the processed logits: the temperature applied
            logprobs.append(selective_log_softmax(torch.stack(output.scores, 1), responses))
    return rows, logprobs


def scalar_head(model, query_responses: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A sequence-classification model's 1-label head at every position: (rows, tokens)."""
    backbone = getattr(model, model.base_model_prefix)
    hidden = forward(backbone, query_responses, attention_mask).hidden_states[-1]
    return model.score(hidden).squeeze(-1)


def sequence_scores(model, query_responses: torch.Tensor, attention_mask: torch.Tensor,
                    context_length: int) -> torch.Tensor:
    """A reward model's score of each row, read at its last response token (the last real one)."""
    values = scalar_head(model, query_responses, attention_mask)
    last = attention_mask[:, context_length:].sum(1) - 1 + context_length
    return values[torch.arange(len(values), device=values.device), last.clamp(min=0)]
