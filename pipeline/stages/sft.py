"""Stage 1, SFT: TRL's SFTTrainer on prompt/completion or conversational demonstrations."""

import hashlib
import logging
import math

import numpy as np
import pyarrow.compute as pc
from accelerate import PartialState
from datasets import Dataset
from jinja2 import TemplateError
from trl import SFTTrainer, get_peft_config
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from .. import data, hub
from .. import lm_head as lm_head_module
from ..models import CAUSAL_LM, check_before_loading, check_model_kind, load_causal_lm, load_tokenizer
from ..padding_free import keeps_packed_examples_apart
from .common import check_template_roles, finish, last_checkpoint, load_data, logger, setup, train


def _row_lengths_and_targets(dataset: Dataset, max_length: int, truncation_mode: str, rows_per_part: int = 50_000):
    """(token count of each row, whether each row keeps a completion token within max_length once truncated as
    `truncation_mode` says), computed on the Arrow columns, part by part: no row is turned into Python lists."""
    tokens = dataset.select_columns(["input_ids", "labels"]).with_format("arrow")  # follows select/shuffle
    lengths, has_target = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=bool)]
    for start in range(0, len(tokens), rows_per_part):
        for batch in tokens[start:start + rows_per_part].to_batches():
            labels = batch.column("labels")
            length = pc.list_value_length(batch.column("input_ids")).to_numpy(zero_copy_only=False)
            flat = pc.list_flatten(labels).to_numpy(zero_copy_only=False)
            parents = pc.list_parent_indices(labels).to_numpy(zero_copy_only=False)
            offsets = labels.offsets.to_numpy()
            position = np.arange(len(flat)) + offsets[0] - offsets[parents]  # of each label within its row
            kept = (position < max_length if truncation_mode == "keep_start"
                    else position >= length[parents] - max_length)
            target = np.zeros(len(length), dtype=bool)
            target[parents[(flat != -100) & kept]] = True
            lengths.append(length)
            has_target.append(target)
    return np.concatenate(lengths), np.concatenate(has_target)


def fit_to_max_length(dataset: Dataset, max_length: int, overlong_rows: str, source: str,
                      truncation_mode: str = "keep_start") -> Dataset:
    """Tokenized rows ({"input_ids", "labels"}) -> rows of at most `max_length` tokens. Rows longer than that
    are truncated (overlong_rows="truncate", TRL's behaviour) or dropped ("drop"); either way they are counted
    and reported. As in TRL, a row left with no token to learn (every label -100: a prompt that fills
    max_length) is dropped, and counted too. Raises DataError if no row is left."""
    lengths, has_target = _row_lengths_and_targets(dataset, max_length, truncation_mode)
    overlong_mask = lengths > max_length
    overlong = int(overlong_mask.sum())
    keep = has_target & ~overlong_mask if overlong_rows == "drop" else has_target
    no_target = int((~keep).sum()) - (overlong if overlong_rows == "drop" else 0)  # the rest dropped for no target
    fitted = dataset
    if overlong and overlong_rows == "truncate":
        cut = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
        fitted = fitted.map(lambda row: {"input_ids": row["input_ids"][cut], "labels": row["labels"][cut]})
    if not keep.all():
        fitted = fitted.select(np.flatnonzero(keep))
    if overlong or no_target:
        what = "dropped" if overlong_rows == "drop" else "truncated"
        message = (f"{source}: {overlong} of {len(dataset)} rows are longer than max_length={max_length} tokens: "
                   f"{what} (overlong_rows: {overlong_rows})")
        if no_target:
            message += f"; {no_target} rows have no completion token within max_length: dropped"
        logger.warning(f"{message}; {len(fitted)} rows left")
    if len(fitted) == 0:
        raise data.DataError(f"{source}: no row fits in max_length={max_length} tokens ({overlong} of {len(dataset)} "
                             "are longer); raise max_length" + (" or set overlong_rows: truncate"
                                                               if overlong_rows == "drop" else ""))
    return fitted


with open(__file__, "rb") as _source:  # keys the cached map of assistant_only_labels to this file's code
    _CODE_VERSION = hashlib.sha256(_source.read()).hexdigest()[:16]


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    if not messages and not generation_prompt:
        return []
    try:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            add_generation_prompt=generation_prompt)["input_ids"]
    except Exception:  # a template that cannot render an empty conversation or a lone generation prompt
        if messages:
            raise
        return []
    return list(ids)


def assistant_labels(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]] | tuple[None, str]:
    """(input_ids, labels) of a conversation rendered by the tokenizer's chat template, with the labels of every
    token outside the assistant turns set to -100. An assistant turn's tokens are those that rendering the
    conversation up to and including it adds to the rendering up to it (with the generation prompt, when that is
    a prefix: the turn's header is then not learned); the turn's end token (EOS, <|im_end|>, ...) is learned with
    it. This holds for any template whose rendering of the first turns is a prefix of the rendering of more
    turns, but for what it writes at the conversation's end only (Phi-3's EOS: learned with the last turn); where
    it is not (a template that renders earlier turns differently once later ones follow), returns (None, why)."""
    ids = _render(tokenizer, messages)
    labels = [-100] * len(ids)
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        through = _render(tokenizer, messages[:i + 1])
        end = next((n for n, (a, b) in enumerate(zip(through, ids)) if a != b), min(len(through), len(ids)))
        ending = through[end:]  # what the template adds only at the conversation's end (Phi-3's EOS): none else
        starts = [_render(tokenizer, messages[:i], generation_prompt=True), _render(tokenizer, messages[:i])]
        start = next((len(before) for before in starts if ids[:len(before)] == before and len(before) < end), None)
        if start is None or ending and ids[len(ids) - len(ending):] != ending:
            return None, (f"the chat template renders the turns up to assistant turn {i} differently once more "
                          "turns follow")
        labels[start:end] = ids[start:end]
    return ids, labels


def _assistant_labels_batch(batch: dict, indices: list[int], tokenizer, source: str, code: str) -> dict:
    """assistant_only_labels' map. (`code` only keys the cache: _CODE_VERSION.)"""
    out = {"input_ids": [], "labels": []}
    for index, messages in zip(indices, batch["messages"]):
        ids, labels = assistant_labels(tokenizer, messages)
        if ids is None:
            raise data.DataError(
                f"{source}: row {index}: {labels}, so the assistant tokens of 'messages' cannot be found by rendering "
                "the conversation turn by turn; set completion_only_loss: false (the loss on every token), or give "
                "the rows as prompt/completion (the loss on the completion)")
        out["input_ids"].append(ids)
        out["labels"].append(labels)
    return out


def assistant_only_labels(dataset: Dataset, tokenizer, source: str, num_proc: int | None = None) -> Dataset:
    """`messages` rows -> {"input_ids", "labels"} with the loss on the assistant turns only (see assistant_labels):
    what `completion_only_loss: true` means for conversations, which TRL trains on every token otherwise."""
    return dataset.map(_assistant_labels_batch, batched=True, with_indices=True, remove_columns=dataset.column_names,
                       fn_kwargs={"tokenizer": tokenizer, "source": source, "code": _CODE_VERSION}, num_proc=num_proc,
                       desc=f"Tokenizing {source} (loss on the assistant turns)")


REAL_TOKENS = "pipeline_real_tokens"  # batch key: non-pad tokens of each packed row (popped before the model)


class PackedRowsCollator(DataCollatorForLanguageModeling):
    """Packed (bfd) rows -> a batch of rows, each padded to the batch's longest row, with the position_ids of
    the examples packed in it and no attention mask. Given position_ids and no mask, transformers' mask
    builder (`find_packed_sequence_indices`) detects where each example starts (position 0) and gives every
    row a block-diagonal causal mask, so the examples in a row do not see each other: the same loss as
    unpacked batches, at the cost of rows x max_length^2 attention instead of the square of the whole batch's
    tokens that TRL's flattened padding-free batch costs without a varlen kernel. Pads get position 0 (each is
    its own one-token sequence) and label -100; so does every example's first token, as in TRL's padding-free
    collator (it would otherwise be predicted from the previous example). The count of non-pad tokens travels
    under REAL_TOKENS for the trainer's `num_tokens` metric. Unpacked rows (an unpacked eval set) come out as
    plain padded rows: one example each, pads in sequences of their own."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        super().__init__(pad_token_id=pad_token_id, padding_free=False, return_position_ids=True,
                         pad_to_multiple_of=pad_to_multiple_of)

    def torch_call(self, examples):
        batch = super().torch_call(examples)
        batch[REAL_TOKENS] = batch.pop("attention_mask").sum(dim=1)  # per row: splits along the batch like the rest
        batch["labels"][batch["position_ids"] == 0] = -100
        return batch


def unpack_if_leaking(model, training_args) -> None:
    """Packing only where the architecture keeps packed examples apart: otherwise padded rows (packing off), said
    once. Flash attention's packed layout keeps them apart in its kernels and is not checked here."""
    packs = training_args.packing or training_args.eval_packing
    flash = "flash" in str(getattr(model.config, "_attn_implementation", None) or "")
    if not packs or flash or keeps_packed_examples_apart(model):
        return
    logger.warning("sft: %s does not keep examples packed in one row apart (it ignores the position_ids packing "
                   "relies on): training on padded rows instead, packing off", type(model).__name__)
    training_args.packing = training_args.eval_packing = False


class _DropWarning(logging.Filter):
    """Hides the warnings that do not apply to the rows layout: TRL's that packing/padding-free needs flash
    attention, and transformers' that input_ids with pads want an attention mask (position_ids stand for it)."""

    def filter(self, record):
        message = record.getMessage()
        return not ("Flash Attention" in message and ("packing" in message or "Padding-free" in message)
                    or "recommend passing in an `attention_mask`" in message)


_ROWS_WARNINGS = _DropWarning()


class SFTStageTrainer(SFTTrainer):
    """TRL's SFTTrainer, with rows longer than max_length counted, reported and truncated or dropped as the
    recipe's `overlong_rows` says (TRL truncates them silently, and silently drops the rows left with no
    completion token). Tokenization is TRL's own: only its truncation step is replaced. With bfd packing the
    fitted rows are then packed by TRL; bfd_split and wrapped packing are left to TRL (they split or cut rows).
    With bfd packing, batches are laid out as `packed_batch_layout` says (see PackedRowsCollator). With
    `lm_head: auto`, small logits on the CPU are computed whole instead of in TRL's tiles (pipeline/lm_head.py)."""

    def __init__(self, *args, overlong_rows: str = "truncate", source: str = "dataset",
                 packed_batch_layout: str = "auto", lm_head: str = "auto", **kwargs):
        if lm_head not in ("auto", "tiled"):
            raise ValueError(f"lm_head must be 'auto' or 'tiled', got {lm_head!r}")
        self.overlong_rows, self.source = overlong_rows, source  # read by _prepare_dataset, in super().__init__
        model = kwargs.get("model", args[0] if args else None)
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        flash = "flash" in str(getattr(getattr(model, "config", None), "_attn_implementation", None) or "")
        if packed_batch_layout == "rows" and flash:
            raise ValueError("packed_batch_layout: rows needs sdpa or eager attention (flash attention keeps packed "
                             "examples apart only in a single flattened row); use packed_batch_layout: auto or flat")
        packs = training_args is not None and training_args.packing_strategy in {"bfd", "bfd_split"} and (
            training_args.packing or training_args.eval_packing)
        self.packed_rows = bool(packs) and (packed_batch_layout == "rows"
                                            or packed_batch_layout == "auto" and not flash)
        trl_logger = logging.getLogger("trl.trainer.sft_trainer")
        if self.packed_rows:
            trl_logger.addFilter(_ROWS_WARNINGS)
        try:
            super().__init__(*args, **kwargs)
        finally:
            trl_logger.removeFilter(_ROWS_WARNINGS)
        if lm_head == "auto":  # on the CPU, small logits are cheaper whole than in TRL's tiles (pipeline/lm_head.py)
            logger.info("lm_head: auto: %s", lm_head_module.describe(lm_head_module.materialise_models([self.model])))
        if self.packed_rows:
            self.data_collator = PackedRowsCollator(self._tokenizer.pad_token_id, training_args.pad_to_multiple_of)
            logger.info("sft: bfd-packed rows of max_length=%s, batched as rows (examples kept apart by position_ids)",
                        training_args.max_length)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        real_tokens = inputs.pop(REAL_TOKENS, None)
        if real_tokens is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        counted = self._total_train_tokens
        # rows with pads and no mask: transformers warns that a mask is wanted; position_ids stand for it here
        quiet = logging.getLogger("transformers.modeling_utils")
        quiet.addFilter(_ROWS_WARNINGS)
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            quiet.removeFilter(_ROWS_WARNINGS)
        if self.model.training:  # TRL counts one row's length when there is no mask: count the rows' real tokens
            # per row, so that gather_for_metrics drops the rows repeated to even out the last batch across processes
            self._total_train_tokens = counted + self.accelerator.gather_for_metrics(real_tokens).sum().item()
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return result

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        try:
            return self._fit_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        except TemplateError as error:  # not a ValueError: a traceback otherwise
            raise data.template_refusal(error, dataset, processing_class, f"{self.source} [{dataset_name}]") from error

    def _fit_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        max_length = args.max_length
        tokenized = isinstance(dataset, Dataset) and "input_ids" in dataset.column_names  # given tokenized
        if (isinstance(dataset, Dataset) and "messages" in dataset.column_names and not tokenized
                and args.completion_only_loss and formatting_func is None):
            # TRL's completion_only_loss covers prompt/completion rows only: for conversations, the loss on the
            # assistant turns is computed here (labels), and TRL takes the tokenized rows as they are
            with PartialState().main_process_first():
                dataset = assistant_only_labels(dataset, processing_class, f"{self.source} [{dataset_name}]",
                                                args.dataset_num_proc if len(dataset) > 1 else None)
        # bfd packing keeps rows whole (it truncates overflow, as padding does): rows are fitted first, then packed.
        # bfd_split and wrapped cut rows across sequences by design: left to TRL.
        whole_rows = not packing or args.packing_strategy == "bfd"
        if max_length is None or not whole_rows or not isinstance(dataset, Dataset) or tokenized:
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        shuffle = args.shuffle_dataset
        args.max_length, args.shuffle_dataset = None, False  # TRL's tokenization without its truncation
        try:
            prepared = super()._prepare_dataset(dataset, processing_class, args, False, formatting_func,
                                                dataset_name)
        finally:
            args.max_length, args.shuffle_dataset = max_length, shuffle
        with PartialState().main_process_first():  # its map and select are cached: the others load them
            fitted = fit_to_max_length(prepared, max_length, self.overlong_rows, f"{self.source} [{dataset_name}]",
                                       args.truncation_mode)
        if packing:  # TRL packs the tokenized rows (and shuffles, if asked)
            return super()._prepare_dataset(fitted, processing_class, args, True, None, dataset_name)
        return fitted.shuffle(seed=args.seed) if shuffle else fitted


def main(script_args, training_args, model_args):
    if script_args.overlong_rows == "drop" and training_args.packing and training_args.packing_strategy != "bfd":
        raise ValueError(f"overlong_rows: drop needs packing: false or packing_strategy: bfd (packing_strategy "
                         f"{training_args.packing_strategy} splits long rows across sequences or cuts them)")
    check_model_kind(model_args.model_name_or_path, CAUSAL_LM, "model_name_or_path", model_args)
    check_before_loading("sft", script_args, training_args, model_args)
    setup(training_args, "sft")
    publication = hub.prepare("sft", script_args, training_args, model_args)  # before the trainer
    checkpoint = last_checkpoint(training_args)

    train_dataset, eval_dataset, source = load_data("sft", script_args)

    tokenizer = load_tokenizer(model_args.model_name_or_path, model_args)
    check_template_roles(tokenizer, model_args.model_name_or_path, source,
                         (train_dataset, script_args.dataset_train_split), (eval_dataset, script_args.dataset_test_split))
    model = load_causal_lm(model_args.model_name_or_path, tokenizer, model_args)
    unpack_if_leaking(model, training_args)

    trainer = SFTStageTrainer(
        overlong_rows=script_args.overlong_rows,
        source=source,
        packed_batch_layout=script_args.packed_batch_layout,
        lm_head=script_args.lm_head,
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    train_result = train(trainer, checkpoint, "sft")

    metrics = {"train_loss": train_result.training_loss}
    if eval_dataset is not None:
        metrics.update(trainer.evaluate())
        metrics["eval_perplexity"] = math.exp(metrics["eval_loss"])
    trainer.log_metrics("final", metrics)
    finish(trainer, training_args, source, metrics, tags=["pipeline", "sft"], publication=publication)
