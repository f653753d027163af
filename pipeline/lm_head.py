"""Whole logits for TRL's fused LM head where they are small.

TRL's SFTTrainer patches the model with `trl.trainer.utils.add_fused_lm_head`: the loss and its metrics come from
log-probabilities computed in tiles, and the backward recomputes the logits, so that a large vocabulary never has
its whole `(batch, seq_len, vocab)` logits in memory. On a GPU that is a Triton kernel. On the CPU it is a loop of
torch ops, and for a small vocabulary the recomputation is pure cost: the tiny demo's pretraining step (a
1024-token vocabulary, 4 rows of 128) is measured side by side in bench/results/lm_head.md (`bench/lm_head.py`).

`materialise_small_logits` wraps the patched forward: a `fused_lm_head=True` call on the CPU whose logits take at
most `max_logits_bytes` (in float32; the log-softmax, its gradient and the entropy's temporaries come to a few
times that at peak) builds them whole (the model's own LM head, then one log-softmax) and returns the fields
TRL's SFTTrainer reads: the log-probabilities (with their gradient), the entropy and the top-1 hits (without:
the trainer only logs them), and the label mask. Any other call goes to TRL's forward unchanged: on a GPU, with
an LM head that is not a plain `nn.Linear` (a LoRA or `modules_to_save` wrapper: TRL's tiles read the bare
weight, so the two would train different things), with DeepSpeed-partitioned weights, sharded FSDP2 weights,
pre-shifted labels (sequence parallelism) or MoE router logits. The loss is the same number either way, to
float rounding, so TRL's `compute_loss`, its loss types and its metrics are untouched.
"""

import functools

import torch

_MiB = 2 ** 20
DEFAULT_MAX_LOGITS_BYTES = 64 * _MiB


def _logit_transforms(config) -> bool:
    """Whether the model scales or caps its logits (TRL's tiled head applies those; this module does not)."""
    text = config.get_text_config()
    return any(getattr(text, name, None) is not None for name in (
        "final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"))


def materialise_small_logits(model, max_logits_bytes: int = DEFAULT_MAX_LOGITS_BYTES, temperature: float = 1.0,
                             labelled_only: bool = False) -> bool:
    """Wrap `model`'s TRL fused forward (see the module's docstring); `temperature` is the one TRL's head divides the
    logits by (GRPO's and RLOO's sampling temperature; 1 for SFT). `labelled_only` (GRPO, RLOO): the logits only at
    the positions that have a label (the answers, not their prompts), and the entropy with its gradient (GRPO's
    entropy bonus); else at every position, as SFT has always had them (the same numbers either way but for float
    rounding, which SFT's long training carries into another model: the demo's chain is sensitive to it,
    docs/stages.md). Returns whether it was wrapped: not when TRL did not patch the model (a newer TRL may not), nor
    for a model whose logits are scaled or capped, or that returns MoE router logits."""
    from trl.trainer.utils import FusedCausalLMOutput

    tiled = model.__dict__.get("forward")  # add_fused_lm_head sets a bound method on the instance
    text = model.config.get_text_config()
    if tiled is None or _logit_transforms(model.config) or getattr(text, "output_router_logits", False):
        return False

    @functools.wraps(type(model).forward)  # generate() checks its kwargs against this signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        head = self.get_output_embeddings()
        small = (fused_lm_head and labels is not None and shift_labels is None
                 and not kwargs.get("output_router_logits") and type(head) is torch.nn.Linear
                 and head.weight.device.type == "cpu" and labels.device.type == "cpu"
                 and type(head.weight.data) is torch.Tensor  # not a sharded DTensor (FSDP2)
                 and not hasattr(head.weight, "ds_id")  # not partitioned by DeepSpeed ZeRO-3
                 and (int((labels[:, 1:] != -100).sum()) if labelled_only else labels[:, 1:].numel())
                 * head.out_features * 4 <= max_logits_bytes)
        if not small:
            return tiled(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                         num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = labels[:, 1:]
        mask = labels != -100
        if labelled_only:  # a prompt's positions are never scored
            hidden, targets = hidden[mask], labels[mask]
        else:
            targets = labels.clamp(min=0)
        logits = head(hidden).float()
        if temperature != 1.0:
            logits = logits / temperature
        log_softmax = logits.log_softmax(-1)
        picked = log_softmax.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        with torch.set_grad_enabled(torch.is_grad_enabled() and labelled_only):  # GRPO's entropy bonus: a gradient
            entropy = -(log_softmax.exp() * log_softmax).sum(-1)
        with torch.no_grad():
            top1 = logits.argmax(-1) == targets
        if labelled_only:  # `masked_scatter` keeps an all-masked batch connected to the model, as TRL's head does
            log_probs = picked.new_zeros(mask.shape).masked_scatter(mask, picked)
            entropy = entropy.new_zeros(mask.shape).masked_scatter(mask, entropy)
            is_top1 = torch.zeros_like(mask).masked_scatter(mask, top1)
        else:
            log_probs, entropy, is_top1 = picked.masked_fill(~mask, 0), entropy.masked_fill(~mask, 0), top1 & mask
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, is_top1=is_top1,
                                   label_mask=mask)

    forward.whole_logits = True  # read by is_materialised
    model.forward = forward.__get__(model)
    return True


def is_materialised(model) -> bool:
    """Whether `materialise_small_logits` wrapped this model's forward (a PEFT model's: its base model's)."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(model.forward, "whole_logits", False)


def materialise_models(models, temperature: float = 1.0, labelled_only: bool = False) -> bool:
    """`materialise_small_logits` on each model a trainer patched with TRL's fused head (a PEFT model: its base
    model, which TRL patched). None, and a model inside an engine's wrapper (a DeepSpeed-prepared reference), are
    skipped. Returns whether any was wrapped."""
    from transformers import PreTrainedModel

    wrapped = False
    for model in models:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if isinstance(base, PreTrainedModel):
            wrapped = materialise_small_logits(base, temperature=temperature, labelled_only=labelled_only) or wrapped
    return wrapped


def describe(wrapped: bool) -> str:
    """What `lm_head: auto` does, for the log."""
    limit = DEFAULT_MAX_LOGITS_BYTES // _MiB
    return (f"whole logits on the CPU where a micro-batch's take at most {limit} MiB, else TRL's tiled LM head"
            if wrapped else "TRL's tiled LM head (this model or TRL version has no fused head the pipeline can "
            "stand in for)")
