"""Stage 2, reward model: TRL's RewardTrainer on preference pairs, a 1-label sequence classifier."""

from trl import RewardTrainer, get_peft_config

from .. import data, hub, padding_free
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


def lay_out_pairs(trainer, model, setting: str) -> str:
    """The reward model runs its pairs' rows padding-free (`padding_free.packed_classifier`) where `setting`
    (RewardArguments.padding_free) and the model allow it, and the weights are not sharded over processes (ZeRO-3,
    FSDP: every process must then run the same passes). Returns the layout: 'packed', 'flat' or 'off'."""
    how = padding_free.choose_layout(setting, [model])
    if how not in ("packed", "flat") or padding_free.lockstep(trainer):
        return "off"
    padding_free.packed_classifier(model, how)
    return how


def train_ensemble(script_args, training_args, model_args, train_dataset, eval_dataset, tokenizer) -> dict:
    """ensemble_size - 1 more reward models, after the stage's own is saved: member i trains from the same starting
    model on its own random half of the training pairs under seed + i, into output_dir/ensemble/member-<i>
    (checkpoints and resume as any run; a member already written is kept). Returns each member's held-out
    accuracy (ensemble_member_<i>_eval_accuracy) and their mean."""
    import dataclasses
    import os

    from ..models import ENSEMBLE_DIR

    metrics = {}
    for index in range(1, script_args.ensemble_size):
        folder = os.path.join(training_args.output_dir, ENSEMBLE_DIR, f"member-{index}")
        args = dataclasses.replace(training_args, output_dir=folder, seed=training_args.seed + index,
                                   push_to_hub=False, report_to=[])
        half = train_dataset.shuffle(seed=training_args.seed + index).select(range(len(train_dataset) // 2))
        logger.info(f"reward ensemble: member {index} of {script_args.ensemble_size - 1} more, on {len(half)} pairs "
                    f"(a random half), seed {args.seed} -> {folder}")
        written = os.path.isfile(os.path.join(folder, "config.json"))
        model = (load_scalar_head_model(folder, tokenizer, model_args, "a reward ensemble member") if written
                 else load_scalar_head_model(model_args.model_name_or_path, tokenizer, model_args))
        member = RewardTrainer(model=model, args=args, train_dataset=half, eval_dataset=eval_dataset,
                               processing_class=tokenizer, peft_config=None if written else reward_peft_config(model_args))
        lay_out_pairs(member, model, script_args.padding_free)
        if written:
            logger.info(f"reward ensemble: {folder} is already written: kept")
        else:
            train(member, last_checkpoint(args), "reward")
        if eval_dataset is not None:
            metrics[f"ensemble_member_{index}_eval_accuracy"] = member.evaluate(member.eval_dataset)["eval_accuracy"]
    accuracies = [v for k, v in metrics.items() if k.startswith("ensemble_member_")]
    if accuracies:
        metrics["ensemble_members_mean_eval_accuracy"] = sum(accuracies) / len(accuracies)
    metrics["ensemble_size"] = script_args.ensemble_size
    return metrics


def main(script_args, training_args, model_args):
    if script_args.ensemble_size < 1:
        raise ValueError(f"ensemble_size must be at least 1 (the stage's own reward model), got {script_args.ensemble_size}")
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
    layout = lay_out_pairs(trainer, model, script_args.padding_free)
    logger.info(f"reward: the pairs' rows run {'padded' if layout == 'off' else layout} "
                f"(padding_free: {script_args.padding_free})")
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
    if script_args.ensemble_size > 1:
        metrics.update(train_ensemble(script_args, training_args, model_args, train_dataset, eval_dataset, tokenizer))
    trainer.log_metrics("final", metrics)
    finish(trainer, training_args, source, metrics, tags=["pipeline", "reward-model"], publication=publication)
