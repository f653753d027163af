"""Stage 2, reward model: TRL's RewardTrainer on preference pairs, a 1-label sequence classifier."""

from trl import RewardTrainer, get_peft_config

from .. import data, hub
from ..models import check_before_loading, load_scalar_head_model, load_tokenizer
from .common import check_template_roles, finish, last_checkpoint, load_data, logger, setup, train


def reward_peft_config(model_args):
    """TRL's LoRA config as a sequence classifier's (task SEQ_CLS): peft then trains the new `score` head in full
    (modules_to_save) beside the adapters. With ModelConfig's default task (CAUSAL_LM) the head would stay at
    its random initialisation."""
    peft_config = get_peft_config(model_args)
    if peft_config is not None and peft_config.task_type != "SEQ_CLS":
        logger.info(f"reward model LoRA: task_type {peft_config.task_type} -> SEQ_CLS (trains the score head)")
        peft_config.task_type = "SEQ_CLS"
    return peft_config


def main(script_args, training_args, model_args):
    check_before_loading("reward", script_args, training_args, model_args)
    setup(training_args, "reward")
    publication = hub.prepare("reward", script_args, training_args, model_args)  # before the trainer
    checkpoint = last_checkpoint(training_args)

    train_dataset, eval_dataset, source = load_data("preference", script_args)
    # Held-out splits beside the test split (embedded: test_title_only, test_repeat_only), reported as
    # eval_<name>_accuracy
    extra_tests = load_data("preference", script_args, data.load_extra_tests) if eval_dataset is not None else {}

    tokenizer = load_tokenizer(model_args.model_name_or_path, model_args)
    check_template_roles(tokenizer, model_args.model_name_or_path, source,
                         (train_dataset, script_args.dataset_train_split), (eval_dataset, script_args.dataset_test_split),
                         *((split, name) for name, split in extra_tests.items()))
    model = load_scalar_head_model(model_args.model_name_or_path, tokenizer, model_args)

    trainer = RewardTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset={"test": eval_dataset, **extra_tests} if extra_tests else eval_dataset,
        processing_class=tokenizer,
        peft_config=reward_peft_config(model_args),
    )
    # RewardTrainer drops pairs longer than max_length: say how many, and stop clearly if none is left.
    dropped = len(train_dataset) - len(trainer.train_dataset)
    if dropped:
        logger.warning(f"{source}: dropped {dropped} of {len(train_dataset)} training pairs longer than "
                       f"max_length={training_args.max_length} tokens")
    if len(trainer.train_dataset) == 0:
        raise data.DataError(f"{source}: every training pair is longer than max_length={training_args.max_length} "
                             "tokens; raise max_length")
    train_result = train(trainer, checkpoint, "reward")

    # On the embedded task the test pairs are ordered by the oracle without noise, so eval_accuracy is the
    # reward model's agreement with the gold preference (eval_title_only_accuracy: on pairs that differ only
    # in the film's title).
    metrics = {"train_loss": train_result.training_loss}
    if eval_dataset is not None:
        prepared = trainer.eval_dataset if extra_tests else {"test": trainer.eval_dataset}
        metrics.update(trainer.evaluate(prepared["test"]))
        for name in extra_tests:  # TRL adds its own metrics as eval_accuracy, eval_margin, ...: renamed here
            extra = trainer.evaluate(prepared[name], metric_key_prefix=f"eval_{name}")
            metrics.update({key if key.startswith(f"eval_{name}_") else f"eval_{name}_{key.removeprefix('eval_')}": value
                            for key, value in extra.items()})
    trainer.log_metrics("final", metrics)
    finish(trainer, training_args, source, metrics, tags=["pipeline", "reward-model"], publication=publication)
