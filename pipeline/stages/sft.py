"""Stage 1, SFT: TRL's SFTTrainer on prompt/completion or conversational demonstrations."""

import math

from datasets import Dataset
from trl import SFTTrainer, get_peft_config

from .. import data, hub
from ..models import load_causal_lm, load_tokenizer
from .common import finish, last_checkpoint, logger, setup, train


def fit_to_max_length(dataset: Dataset, max_length: int, overlong_rows: str, source: str,
                      truncation_mode: str = "keep_start") -> Dataset:
    """Tokenized rows ({"input_ids", "labels"}) -> rows of at most `max_length` tokens. Rows longer than that
    are truncated (overlong_rows="truncate", TRL's behaviour) or dropped ("drop"); either way they are counted
    and reported. As in TRL, a row left with no token to learn (every label -100: a prompt that fills
    max_length) is dropped, and counted too. Raises DataError if no row is left."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    overlong = sum(length > max_length for length in lengths)
    if overlong_rows == "drop":
        fitted = dataset.select([i for i, length in enumerate(lengths) if length <= max_length])
    else:
        cut = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
        fitted = dataset.map(lambda row: {"input_ids": row["input_ids"][cut], "labels": row["labels"][cut]})
    learnable = [i for i, labels in enumerate(fitted["labels"]) if any(label != -100 for label in labels)]
    no_target = len(fitted) - len(learnable)
    if no_target:
        fitted = fitted.select(learnable)
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


class SFTStageTrainer(SFTTrainer):
    """TRL's SFTTrainer, with rows longer than max_length counted, reported and truncated or dropped as the
    recipe's `overlong_rows` says (TRL truncates them silently, and silently drops the rows left with no
    completion token). Tokenization is TRL's own: only its truncation step is replaced. Packed datasets are
    left to TRL (packing splits or cuts rows by `packing_strategy`)."""

    def __init__(self, *args, overlong_rows: str = "truncate", source: str = "dataset", **kwargs):
        self.overlong_rows, self.source = overlong_rows, source  # read by _prepare_dataset, in super().__init__
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        max_length = args.max_length
        if (max_length is None or packing or not isinstance(dataset, Dataset)
                or "input_ids" in dataset.column_names):
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        args.max_length = None  # TRL's preparation without its truncation
        try:
            prepared = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func,
                                                dataset_name)
        finally:
            args.max_length = max_length
        return fit_to_max_length(prepared, max_length, self.overlong_rows, f"{self.source} [{dataset_name}]",
                                 args.truncation_mode)


def main(script_args, training_args, model_args):
    if script_args.overlong_rows == "drop" and training_args.packing:
        raise ValueError("overlong_rows: drop needs packing: false (packing splits long rows across sequences or "
                         "cuts them, as packing_strategy says)")
    setup(training_args, "sft")
    publication = hub.prepare("sft", script_args, training_args, model_args)  # before the trainer
    checkpoint = last_checkpoint(training_args)

    train_dataset, eval_dataset, source = data.load_for("sft", script_args)

    tokenizer = load_tokenizer(model_args.model_name_or_path, model_args)
    model = load_causal_lm(model_args.model_name_or_path, tokenizer, model_args)

    trainer = SFTStageTrainer(
        overlong_rows=script_args.overlong_rows,
        source=source,
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
