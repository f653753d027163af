"""Stage 1, SFT: TRL's SFTTrainer on prompt/completion or conversational demonstrations."""

import math

from trl import SFTTrainer, get_peft_config

from .. import data, hub
from ..models import load_causal_lm, load_tokenizer
from .common import finish, last_checkpoint, setup


def main(script_args, training_args, model_args):
    setup(training_args)
    publication = hub.prepare("sft", script_args, training_args, model_args)  # before the trainer
    checkpoint = last_checkpoint(training_args)

    train_dataset, eval_dataset, source = data.load_for("sft", script_args)

    tokenizer = load_tokenizer(model_args.model_name_or_path, model_args)
    model = load_causal_lm(model_args.model_name_or_path, tokenizer, model_args)

    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    train_result = trainer.train(resume_from_checkpoint=checkpoint)

    metrics = {"train_loss": train_result.training_loss}
    if eval_dataset is not None:
        metrics.update(trainer.evaluate())
        metrics["eval_perplexity"] = math.exp(metrics["eval_loss"])
    trainer.log_metrics("final", metrics)
    finish(trainer, training_args, source, metrics, tags=["pipeline", "sft"], publication=publication)
