"""Forward passes over rollout rows that compute only real tokens (PPO's epochs and its scoring passes; GRPO's and
RLOO's log-probability passes, `fused_log_probs`).

A rollout row is `query + response`: the query left-padded to the batch's longest prompt, the response
right-padded after its stop token (pipeline.rollout). Run as it is, every pass computes those pads: 23% of TRL
1.12's tokens in the tiny demo, 56% at hh-rlhf-like lengths (bench/results/ppo.md). A `Layout` lays the same rows
out again before the model sees them, in one of four ways (`PPOConfig.padding_free`):

- `padded`: the rows as they are, with their attention mask (TRL 1.12's computation; kept as the reference);
- `rows`: each row's real tokens moved to the start of a row of its own, the rows cut to the longest; the pads
  left at the ends are never attended to by a real token (attention is causal), so no mask is needed and any
  causal LM computes exactly what it computes padded;
- `flat`: every row's real tokens in one row (the scoring passes: rows of a token budget), kept apart as
  `packed` keeps them: no padding at all, for flash attention's variable-length kernels, which compute no
  attention across the rows (on the CPU the block-diagonal mask of one long row costs more than `packed`);
- `packed`: several rows' real tokens in one row (first-fit decreasing, each row of the layout as wide as the
  longest rollout row), kept apart by restarting position ids: given position ids and no attention mask,
  transformers builds a block-diagonal causal mask from them. Only for architectures that keep packed examples
  apart (`keeps_packed_examples_apart`); the others get `rows`.

`packed` and `rows` order their layout rows fullest first and cut the least filled into a second block, as wide
as the fullest of them, where that computes fewer tokens; each block is one pass of the model's body.

`index[b, t]` is where the real token at column `t` of rollout row `b` sits in the layout's blocks, flattened and
concatenated; the model's outputs are read back through it (`Layout.read`), so losses, advantages and gradients
are the padded computation's, to float rounding (tests/test_padding_free.py). Logits are computed only where they are read:
`logits_at` runs the model's body on the layout and its LM head on the chosen positions alone (a prompt of 384
tokens and an answer of 128 need 128 rows of logits, not 512), except for models that scale or cap their logits
after the head, and models inside an engine's wrapper, which run whole.
"""

from contextlib import nullcontext
from dataclasses import dataclass

import torch

LAYOUTS = ("flat", "packed", "rows", "padded")


@dataclass
class Layout:
    """Token ids and position ids of every layout row, flattened and concatenated over `shapes` (each a block of
    (layout rows, width): packed layouts cut their least filled rows narrower), the attention mask (`padded`
    only) and, for each rollout row and column, where its real token sits in that flat order (-1: padding)."""

    input_ids: torch.Tensor  # (computed tokens,)
    position_ids: torch.Tensor  # (computed tokens,)
    attention_mask: torch.Tensor | None  # (rollout rows, columns): only for `padded`
    index: torch.Tensor  # (rollout rows, columns)
    shapes: list  # [(layout rows, width)] of each block, in order

    @property
    def computed_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def real_tokens(self) -> int:
        return int((self.index >= 0).sum())

    def blocks(self):
        """Keyword arguments of the model for each block of layout rows."""
        start = 0
        for rows, width in self.shapes:
            end = start + rows * width
            yield {"input_ids": self.input_ids[start:end].view(rows, width),
                   "position_ids": self.position_ids[start:end].view(rows, width),
                   "attention_mask": self.attention_mask, "use_cache": False}
            start = end

    def read(self, outputs: list, where: torch.Tensor) -> torch.Tensor:
        """Per-token `outputs` of each block ((layout rows, width, ...) each) at the rollout columns `where` marks
        (a bool (rollout rows, columns) tensor, True on real tokens only): (marked tokens, ...), row-major."""
        flat = outputs[0].flatten(0, 1) if len(outputs) == 1 else torch.cat([o.flatten(0, 1) for o in outputs])
        return flat[self.index[where]]

    def parts(self, size: int):
        """The layout cut into parts of at most `size` layout rows of one block each: (the rollout rows in each
        part, in order, and the part as a Layout of its own). A rollout row lies in one layout row."""
        if len(self.shapes) == 1 and self.shapes[0][0] <= size:
            yield torch.arange(len(self.index), device=self.index.device), self
            return
        home = self.index.max(1).values  # a real token of each rollout row (every row has one)
        start = 0
        for rows, width in self.shapes:
            for first in range(0, rows, size):
                count = min(size, rows - first)
                low, high = start + first * width, start + (first + count) * width
                members = ((home >= low) & (home < high)).nonzero().squeeze(1)
                index = self.index[members]
                mask = None if self.attention_mask is None else self.attention_mask[members]
                yield members, Layout(self.input_ids[low:high], self.position_ids[low:high], mask,
                                      torch.where(index >= 0, index - low, -1), [(count, width)])
            start += rows * width


def _first_fit_decreasing(lengths: list[int], capacity: int) -> tuple[list[int], list[int]]:
    """Bin and offset of each length, bins of `capacity`, longest first into the first bin with room."""
    bins, offsets, room = [0] * len(lengths), [0] * len(lengths), []
    for row in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if free >= lengths[row]:
                break
        else:
            b = len(room)
            room.append(capacity)
        bins[row], offsets[row] = b, capacity - room[b]
        room[b] -= lengths[row]
    return bins, offsets


def _two_widths(fills: list[int], width: int) -> int:
    """How many of the bins (ordered fullest first) keep the full width, the rest cut to the fullest of them:
    the split that computes the fewest tokens (all bins, when no cut saves any)."""
    cost = [keep * width + (len(fills) - keep) * (fills[keep] if keep < len(fills) else 0)
            for keep in range(len(fills) + 1)]
    return min(range(len(fills) + 1), key=lambda keep: (cost[keep], -keep))


def layout(rows: torch.Tensor, mask: torch.Tensor, how: str, capacity: int | None = None,
           one_block: bool = False) -> Layout:
    """`rows` (rollout rows, columns) whose real tokens are `mask`, laid out `how` (one of LAYOUTS). A row's real
    tokens are contiguous (left-padded query, right-padded response). `flat` puts them all in one layout row, or,
    with `capacity`, in rows of at most that many tokens (the longest rollout row's, at least). `packed` and `rows`
    cut their least filled rows to a narrower block where that computes fewer tokens, unless `one_block`."""
    if how not in LAYOUTS:
        raise ValueError(f"padding_free must be one of {', '.join(LAYOUTS)}, got {how!r}")
    device = rows.device
    if how == "padded":
        index = torch.arange(rows.numel(), device=device).view(rows.shape)
        return Layout(rows.masked_fill(~mask, 0).flatten(), (mask.cumsum(1) - mask.long()).flatten(), mask,
                      index.masked_fill(~mask, -1), [tuple(rows.shape)])
    lengths = mask.sum(1)
    width = int(lengths.max())
    if how == "flat":  # every row in one, or in as few of `capacity` as first-fit decreasing finds
        width = int(lengths.sum()) if capacity is None else max(width, min(capacity, int(lengths.sum())))
    if how in ("packed", "flat"):
        bins, offsets = _first_fit_decreasing(lengths.tolist(), width)
    else:
        bins, offsets = list(range(len(rows))), [0] * len(rows)
    count = max(bins) + 1
    fills = [0] * count
    for b, length in zip(bins, lengths.tolist()):
        fills[b] += length
    order = sorted(range(count), key=lambda b: -fills[b])  # fullest first
    rank = {b: r for r, b in enumerate(order)}
    fills = [fills[b] for b in order]
    keep = _two_widths(fills, width) if how in ("packed", "rows") and not one_block else count
    shapes = [(keep, width)] + ([(count - keep, fills[keep])] if keep < count else [])
    # each bin's first flat position, and its width
    bin_start = [r * width if r < keep else keep * width + (r - keep) * fills[keep] for r in range(count)]
    bin_width = [width if r < keep else fills[keep] for r in range(count)]
    ranks = [rank[b] for b in bins]
    start = torch.tensor([bin_start[r] + o for r, o in zip(ranks, offsets)], device=device)
    index = torch.where(mask, start[:, None] + mask.cumsum(1) - 1, -1)
    total = sum(r * w for r, w in shapes)
    input_ids = torch.zeros(total, dtype=rows.dtype, device=device)
    input_ids[index[mask]] = rows[mask]
    # positions count from the start of the sequence a slot belongs to (pads at a row's end: the last sequence's;
    # flat's, below: 0)
    row_start = torch.tensor([bin_start[r] for r in range(count) for _ in range(bin_width[r])], device=device)
    flat = torch.arange(total, device=device)
    sequence_start = torch.full((total,), -1, dtype=torch.long, device=device)
    sequence_start[start] = start
    sequence_start = torch.maximum(sequence_start.cummax(0).values, row_start)
    position_ids = flat - sequence_start
    if how == "flat":  # a token budget's row may end in many unused slots: their count could run past a model's
        filled = torch.zeros(total, dtype=torch.bool, device=device)  # learned positions (GPT-2's table), so 0
        filled[index[mask]] = True
        position_ids = position_ids.masked_fill(~filled, 0)
    return Layout(input_ids, position_ids, None, index, shapes)


def lockstep(trainer) -> bool:
    """Whether every process must run the same forward passes: the weights are sharded over several processes
    (DeepSpeed ZeRO-3, FSDP), and each pass of a sharded layer gathers its weights from all of them. A layout's
    blocks and parts then must not depend on the rows' lengths, which differ from process to process: `groups`
    and `one_block` keep their count to what the batch sizes give."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return trainer.accelerator.num_processes > 1 and (
        trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled and is_deepspeed_zero3_enabled())


def groups(rows: torch.Tensor, mask: torch.Tensor, how: str, size: int):
    """`rows` in groups of `size` rollout rows in order, each laid out alone in one block (see `lockstep`): (the
    rollout rows of the group, its Layout), as `Layout.parts` gives them."""
    for start in range(0, len(rows), size):
        members = torch.arange(start, min(start + size, len(rows)), device=rows.device)
        yield members, layout(rows[members], mask[members], how, one_block=True)


def body(model):
    """The model without its head (GPT-2's `transformer`, Llama's `model`); through a peft wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix)


def _scales_logits(model) -> bool:
    from .lm_head import _logit_transforms
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _logit_transforms(base.config)


def _whole(model) -> bool:
    """Whether to run the model whole rather than its body and then its head: a model that scales or caps its
    logits after the head, or one inside an engine's wrapper (a DeepSpeed engine, FSDP's), whose own forward
    gathers the weights."""
    from transformers import PreTrainedModel

    plain = isinstance(model, PreTrainedModel) or hasattr(model, "get_base_model") and isinstance(
        model.get_base_model(), PreTrainedModel) and hasattr(model, "peft_config")
    return not plain or _scales_logits(model)


def logits_at(model, rows: Layout, where: torch.Tensor) -> torch.Tensor:
    """A causal LM's logits at the rollout positions `where` marks: (marked tokens, vocabulary)."""
    if _whole(model):
        return rows.read([model(**block, return_dict=True).logits for block in rows.blocks()], where)
    run = body(model)
    hidden = [run(**block, return_dict=True).last_hidden_state for block in rows.blocks()]
    return model.get_output_embeddings()(rows.read(hidden, where))


def scalar_at(model, rows: Layout, where: torch.Tensor) -> torch.Tensor:
    """A sequence-classification model's 1-label head (`score`) at the rollout positions `where` marks."""
    run = body(model)
    hidden = [run(**block, return_dict=True).last_hidden_state for block in rows.blocks()]
    return model.score(rows.read(hidden, where)).squeeze(-1)


def keeps_packed_examples_apart(model) -> bool:
    """Whether the model keeps examples packed in one row apart given only their position_ids, as packed layouts
    pass them (no attention mask): the last hidden states of the second of two packed examples equal its hidden
    states alone. Most architectures do (transformers builds a block-diagonal mask from the restarting
    positions); some do not (OPT's learned positions, hybrid linear-attention models such as Qwen3.5), and packing
    would then let every example see the ones before it in its row. One forward pass of 9 tokens, through the
    model's body (a causal LM and a sequence classifier alike)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    vocabulary = model.get_input_embeddings().weight.shape[0] or model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, vocabulary, (1, n), generator=generator) for n in (5, 4))
    positions = torch.cat([torch.arange(5), torch.arange(4)])[None]
    gathered = nullcontext()
    if is_deepspeed_zero3_enabled():  # every process runs this: the sharded weights are gathered for it
        import deepspeed
        gathered = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), gathered:
            device = next(model.parameters()).device
            run = body(model)
            packed = run(input_ids=torch.cat([first, second], 1).to(device), position_ids=positions.to(device),
                         use_cache=False).last_hidden_state[0, 5:].float()
            alone = run(input_ids=second.to(device), use_cache=False).last_hidden_state[0].float()
    finally:
        model.train(training)
    tolerance = 1e-4 if next(model.parameters()).dtype == torch.float32 else 2e-2
    return torch.allclose(packed, alone, atol=tolerance * max(1.0, alone.abs().max().item()), rtol=0)


def choose_layout(setting: str, models) -> str:
    """The layout `padding_free` asks for ('auto', 'flat', 'packed', 'rows' or 'off'; None models are skipped):
    'auto' packs where every model keeps packed rows apart (one probe per architecture and attention), flat with
    flash attention, else lays each row out alone."""
    if setting not in ("auto", "flat", "packed", "rows", "off"):
        raise ValueError(f"padding_free must be auto, flat, packed, rows or off, got {setting!r}")
    if setting in ("rows", "off"):
        return {"rows": "rows", "off": "padded"}[setting]
    probed = {}
    for model in models:
        if model is None:
            continue
        key = (type(model).__name__, getattr(model.config, "_attn_implementation", None))
        if key not in probed:
            probed[key] = keeps_packed_examples_apart(model)
    leaking = sorted(name for (name, _), apart in probed.items() if not apart)
    if leaking and setting in ("packed", "flat"):
        raise ValueError(f"padding_free: {setting} needs models that keep rows packed together apart by their "
                         f"position ids; {', '.join(leaking)} does not: set padding_free to auto (or off)")
    if leaking:
        return "rows"
    flash = all("flash" in str(attention) for _, attention in probed)
    return "flat" if setting == "flat" or flash else "packed"


def fused_log_probs(model, rows: torch.Tensor, mask: torch.Tensor, logits_to_keep: int, how: str,
                    entropy: bool = False, one_block: bool = False) -> tuple:
    """TRL's GRPO/RLOO per-token log-probabilities (and entropies) of the last `logits_to_keep` columns of `rows`
    (prompt left-padded, completion right-padded; real tokens `mask`), through the model's fused LM head
    (`trl.trainer.utils.add_fused_lm_head`: `model(..., labels=..., fused_lm_head=True)`, temperature included),
    on the layout `how`. Every layout, `padded` too, gives each real token its position in its own sequence, as
    generation did. Returns ((rows, logits_to_keep) log-probs, entropies or None), 0 where no real token is."""
    mask = mask.bool()
    laid = layout(rows, mask, how, one_block=one_block)
    scored = mask.clone()
    scored[:, :-logits_to_keep] = False
    labels = torch.full_like(laid.input_ids, -100)
    labels[laid.index[scored]] = rows[scored]
    labels[laid.position_ids == 0] = -100  # a sequence's first token has nothing of its own before it
    outputs, start = [], 0
    for block, (count, width) in zip(laid.blocks(), laid.shapes):
        end = start + count * width
        out = model(**block, labels=labels[start:end].view(count, width), fused_lm_head=True)
        fields = [out.log_probs] + ([out.entropy] if entropy else [])
        # the head scores position t + 1 from position t: shifted so that column t holds the token at t
        outputs.append(torch.nn.functional.pad(torch.stack(fields, -1), (0, 0, 1, 0)))
        start = end
    values = laid.read(outputs, scored)  # (scored tokens, fields)
    kept = scored[:, -logits_to_keep:]
    result = values.new_zeros(*kept.shape, values.shape[-1])
    result[kept] = values
    return result[..., 0], result[..., 1] if entropy else None


def packed_classifier(model, how: str) -> None:
    """Make `model`, a sequence classifier with a 1-label `score` head as TRL's RewardTrainer trains it, run the
    right-padded rows its preference collator makes (chosen rows, then rejected, padded to the batch's longest)
    laid out `how` ('packed' or 'flat': only real tokens computed), its score read where transformers' own
    sequence classifiers read it: each row's last token that is not the pad token. The logits, TRL's loss and its
    gradients are then the padded forward's, to float rounding (tests/test_padding_free.py). A call it cannot lay
    out that way (no attention mask, left padding or holes in the mask, inputs_embeds, outputs asked for beyond the
    logits, a score not read at a real token) goes to the model's own forward."""
    import functools

    from transformers.modeling_outputs import SequenceClassifierOutputWithPast

    original = model.forward
    ignored = ("use_cache", "return_dict", "margin")  # TRL passes its margins with the inputs; the model ignores them

    @functools.wraps(original)
    def forward(input_ids=None, attention_mask=None, **kwargs):
        pad = model.config.pad_token_id
        asked = [name for name, value in kwargs.items() if value is not None and name not in ignored]
        if asked or pad is None or input_ids is None or attention_mask is None or input_ids.dim() != 2:
            return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        mask = attention_mask.bool()
        columns = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (columns * (input_ids != pad)).argmax(-1)  # transformers' choice of the scored token
        if not mask[:, 0].all() or (mask[:, 1:] & ~mask[:, :-1]).any() or not mask.gather(1, last[:, None]).all():
            return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        where = torch.zeros_like(mask).scatter_(1, last[:, None], True)
        scores = scalar_at(model, layout(input_ids, mask, how), where)
        return SequenceClassifierOutputWithPast(logits=scores[:, None])

    model.forward = forward
