"""Plain sampling for rollouts, with less work per token than transformers' `generate`.

PPO's rollouts (and the evaluation's answers) draw every token from softmax(logits / temperature), nothing else:
no top-k, top-p, penalties or beams. `generate` does that through its general machinery; at the shapes users
run four of its costs dominate generation on a CPU (bench/results/ppo.md, *long*; the shares below are from
informal side measurements at those shapes, not committed), and none is arithmetic the answer needs:

* **the key/value cache grows by concatenation**: `DynamicLayer.update` copies every layer's whole cache at every
  token (at 6 x 512 with 120-token prompts, a buffer written in place alone made `generate` a fifth faster).
  Here each full-attention layer writes into a buffer allocated once for the prompt and the longest answer
  (`GrowingLayer`); sliding-window layers keep transformers' own.
* **finished rows are computed to the end**: an answer that stopped at its 5th token still runs through the model
  for every later one (with hh-rlhf-like lengths, two thirds of the decoding rows). Here the batch drops them:
  when a quarter or more of the rows being decoded have stopped, the cache keeps only the others.
* **prompts are left-padded to the chunk's longest**: with hh-rlhf's long-tailed prompt lengths most of the
  prefill is padding. Here, when that is worth it, the prompts go through the model in groups of about one length
  (each cut to its own longest) and their keys and values are placed into the chunk's cache (full-attention
  models only; decoding then runs on the whole chunk, left-padded as before).
* **`torch.multinomial` draws one exponential variate per vocabulary entry** (a fifth of `generate`'s time at an
  8192-token vocabulary, by the profiler). Here a token is drawn by inverting the cumulative distribution with one
  uniform variate per row: the same distribution, another use of the random stream (so a seed gives other answers
  than `generate`).

The log-probability of each drawn token (under the temperature, what PPO's old log-probs are) comes back with it,
so the whole vocabulary's logits of every step are never kept. Models this cannot run (a cache that is not made
of full-attention and sliding-window layers, a forward without `cache` or `logits_to_keep`, or parameters
sharded by ZeRO-3 or FSDP over several processes, which must step through every pass together) go through
`generate`: `supported` says why.
"""

import inspect

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

COMPACT_AT = 0.25  # drop the finished rows once they are this share of the rows being decoded
# the prompts go through the model in groups of this many rows of about one length (each group cut to its own
# longest), when that computes at most PREFILL_WORTH of the tokens of the whole left-padded chunk
PREFILL_GROUP, PREFILL_WORTH = 8, 0.75


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer that writes new keys and values into a buffer allocated for `capacity` tokens
    (grown by doubling past it) instead of concatenating them: the layer's `keys`/`values` are views of it."""

    def __init__(self, capacity: int = 0):
        super().__init__()
        self.capacity = capacity
        self.buffers = None

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        if self.buffers is None or end > self.buffers[0].shape[-2]:
            size = max(end, self.capacity, 2 * (self.buffers[0].shape[-2] if self.buffers else 0))
            buffers = tuple(states.new_empty(*states.shape[:-2], size, states.shape[-1])
                            for states in (key_states, value_states))
            if length:
                buffers[0][..., :length, :], buffers[1][..., :length, :] = self.keys, self.values
            self.buffers = buffers
        self.buffers[0][..., length:end, :] = key_states
        self.buffers[1][..., length:end, :] = value_states
        self.keys, self.values = self.buffers[0][..., :end, :], self.buffers[1][..., :end, :]
        return self.keys, self.values

    def place(self, rows: torch.Tensor, width: int, keys: torch.Tensor, values: torch.Tensor, batch: int) -> None:
        """Write a group of `rows`' prompt keys and values (computed on their last columns alone) into the last
        columns of a `width`-token prompt cache of `batch` rows; the columns before them stay zero (padding,
        masked: zero, not uninitialised memory, which could hold NaN that a masked weight of 0 would not cancel)."""
        if self.buffers is None:
            self.lazy_initialization(keys, values)
            self.buffers = tuple(states.new_zeros(batch, *states.shape[1:-2], max(width, self.capacity),
                                                  states.shape[-1]) for states in (keys, values))
        self.buffers[0][rows, ..., width - keys.shape[-2]:width, :] = keys
        self.buffers[1][rows, ..., width - values.shape[-2]:width, :] = values
        self.keys, self.values = self.buffers[0][..., :width, :], self.buffers[1][..., :width, :]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.buffers is not None:
            self.buffers = tuple(buffer.index_select(0, indices) for buffer in self.buffers)
            length = self.get_seq_length()
            self.keys, self.values = self.buffers[0][..., :length, :], self.buffers[1][..., :length, :]


def _causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supported(model) -> str | None:
    """None when `sample` can run `model`, else why not (the reason `generate` is used instead)."""
    from transformers.distributed.fsdp import is_fsdp_managed_module
    from transformers.integrations import is_deepspeed_zero3_enabled

    inner = _causal_lm(model)
    # what makes transformers' generate step every process together (synced_gpus): each forward pass may gather
    # sharded weights, and this loop's passes differ from process to process (finished rows, prefill groups)
    processes = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if processes > 1 and (is_deepspeed_zero3_enabled() or is_fsdp_managed_module(inner)):
        return "the weights are sharded by ZeRO-3 or FSDP (every process must decode in step)"
    parameters = inspect.signature(inner.forward).parameters
    if "cache" not in parameters or "logits_to_keep" not in parameters:
        return f"{type(inner).__name__}.forward takes no `cache` or `logits_to_keep`"
    if getattr(inner.config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    layers = DynamicCache(config=inner.config).layers
    odd = {type(layer).__name__ for layer in layers} - {"DynamicLayer", "DynamicSlidingWindowLayer"}
    if odd:
        return f"its cache has {', '.join(sorted(odd))} layers"
    return None


def _cache(model, capacity: int) -> DynamicCache:
    cache = DynamicCache(config=_causal_lm(model).config)
    cache.layers = [GrowingLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    assert all(isinstance(layer, (GrowingLayer, DynamicSlidingWindowLayer)) for layer in cache.layers)
    return cache


def _prefill_groups(lengths: torch.Tensor, width: int) -> list[torch.Tensor] | None:
    """Rows sorted by prompt length in groups of PREFILL_GROUP, or None when one pass of the whole chunk computes
    little more."""
    groups = list(lengths.argsort().split(PREFILL_GROUP))
    computed = sum(len(group) * int(lengths[group].max()) for group in groups)
    return groups if len(groups) > 1 and computed <= PREFILL_WORTH * len(lengths) * width else None


def _prefill(model, ids, mask, positions, cache) -> torch.Tensor:
    """The prompts through the model into `cache`; the logits at each prompt's last token. Left padding that
    dominates the chunk (prompts of very different lengths) is cut: rows of about one length go through together
    and their keys and values are placed into the chunk's cache (full-attention layers only)."""
    width = ids.shape[1]
    lengths = mask.sum(1).clamp(min=1)
    groups = _prefill_groups(lengths, width) if all(isinstance(layer, GrowingLayer)
                                                    for layer in cache.layers) else None
    if groups is None:
        return model(input_ids=ids, attention_mask=mask.long(), position_ids=positions, cache=cache, use_cache=True,
                     logits_to_keep=1).logits[:, -1]
    logits = None
    for group in groups:
        start = width - int(lengths[group].max())
        part = _cache(model, width - start)
        last = model(input_ids=ids[group, start:], attention_mask=mask[group, start:].long(),
                     position_ids=positions[group, start:], cache=part, use_cache=True, logits_to_keep=1).logits[:, -1]
        if logits is None:
            logits = last.new_empty(len(ids), last.shape[-1])
        logits[group] = last
        for layer, piece in zip(cache.layers, part.layers):
            layer.place(group, width, piece.keys, piece.values, len(ids))
    return logits


def draw(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A token from softmax(logits / temperature) for each row, by the inverse of its cumulative distribution,
    and its log-probability."""
    logprobs = torch.log_softmax(logits.float() / temperature, -1)
    if not torch.isfinite(logprobs.max(-1).values).all():  # torch.multinomial refuses these too
        raise FloatingPointError("sampling: the policy's next-token logits hold NaN or inf (a diverged or broken "
                                 "model)")
    cumulative = logprobs.exp().cumsum(-1)
    threshold = torch.rand(len(logits), 1, device=logits.device) * cumulative[:, -1:]
    # the first token whose cumulative probability passes the threshold: never one of probability 0
    tokens = torch.searchsorted(cumulative, threshold, right=True).clamp_(max=logits.shape[-1] - 1)
    return tokens.squeeze(1), logprobs.gather(1, tokens).squeeze(1)


@torch.no_grad()
def _sample_chunk(model, queries, pad_token_id, response_length, temperature, stops):
    from .rollout import query_mask  # rollout imports this module

    rows, device = len(queries), queries.device
    mask = query_mask(queries, pad_token_id)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    cache = _cache(model, queries.shape[1] + response_length)
    full_mask = torch.cat((mask, torch.ones(rows, response_length, dtype=torch.bool, device=device)), 1).long()
    tokens = torch.full((rows, response_length), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(rows, response_length, device=device)
    live = torch.arange(rows, device=device)  # the original row of each row being decoded
    stopped = torch.zeros(rows, dtype=torch.bool, device=device)  # of the rows being decoded
    next_position = positions[:, -1] + 1
    logits = _prefill(model, queries.masked_fill(~mask, 0), mask, positions, cache)
    steps = 0
    for step in range(response_length):
        token, logprob = draw(logits, temperature)
        token = token.masked_fill(stopped, pad_token_id)
        tokens[live, step], logprobs[live, step] = token, logprob.masked_fill(stopped, 0.0)
        steps = step + 1
        if stops is not None:
            stopped = stopped | torch.isin(token, stops)
        done = int(stopped.sum())
        if done == len(live) or step + 1 == response_length:
            break
        if done and done >= COMPACT_AT * len(live):
            keep = (~stopped).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            live, token, next_position, stopped = live[keep], token[keep], next_position[keep], stopped[keep]
        # the cache holds the query and the answers' first step + 1 tokens once this one is in
        logits = model(input_ids=token[:, None], attention_mask=full_mask[live, : queries.shape[1] + step + 1],
                       position_ids=next_position[:, None], cache=cache, use_cache=True,
                       logits_to_keep=1).logits[:, -1]
        next_position = next_position + 1
    return torch.cat((queries, tokens[:, :steps]), 1), logprobs[:, :steps]


def sample(model, queries: torch.Tensor, pad_token_id: int, response_length: int, temperature: float,
           stop_token_ids: list[int], batch_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Answers to left-padded `queries`, `batch_size` at a time: per chunk the `query + response` rows (the
    responses right-padded with `pad_token_id` after the stop token that ended them, as long as the chunk's
    longest) and each response token's log-probability (0 on the padding)."""
    stops = torch.tensor(stop_token_ids, device=queries.device) if stop_token_ids else None
    rows, logprobs = [], []
    for start in range(0, len(queries), batch_size):
        chunk_rows, chunk_logprobs = _sample_chunk(model, queries[start:start + batch_size], pad_token_id,
                                                   response_length, temperature, stops)
        rows.append(chunk_rows)
        logprobs.append(chunk_logprobs)
    return rows, logprobs
