"""Stage 3, DPO: TRL's DPOTrainer on the preference pairs (the reward stage's data), from the SFT policy
(`model_name_or_path`), which is also the frozen reference (with LoRA: the policy with its adapters disabled).
No reward model is trained against and nothing is sampled during training. Then the policy is evaluated
against the SFT policy exactly as PPO's is (pipeline.stages.policy_eval), on `eval_dataset_name`'s held-out
prompts, the reward model of `reward_model_path` (if given) scoring the answers."""

from trl import DPOTrainer, get_peft_config

from .. import data, hub
from ..models import (CAUSAL_LM, SCALAR_HEAD, check_before_loading, check_model_kind, load_causal_lm,
                      load_reward_model, load_tokenizer)
from .common import finish, last_checkpoint, load_data, logger, setup, train
from .policy_eval import evaluate_against_sft, for_evaluation


def eval_prompts(script_args, test_pairs):
    """The held-out prompts of `eval_dataset_name`, or else those of the preference test split."""
    if not script_args.eval_dataset_name:
        if test_pairs is None:
            raise ValueError(f"dpo: {script_args.dataset_name} has no test split to evaluate on: set "
                             "eval_dataset_name (prompts with a test split, e.g. embedded:prompt)")
        return test_pairs.select_columns(["prompt"]) if "prompt" in test_pairs.column_names else data.normalise(
            test_pairs, "prompt", f"{script_args.dataset_name} [{script_args.dataset_test_split}]")
    train, test, source = data.load_splits(script_args.eval_dataset_name, None, script_args.dataset_train_split,
                                           script_args.dataset_test_split, seed=script_args.embedded_seed)
    split = script_args.dataset_test_split if test is not None else script_args.dataset_train_split
    return data.normalise(test if test is not None else train, "prompt", f"{source} [{split}]",
                          script_args.invalid_rows)


def main(script_args, training_args, model_args):
    check_model_kind(model_args.model_name_or_path, CAUSAL_LM, "model_name_or_path", model_args)
    if script_args.reward_model_path:
        check_model_kind(script_args.reward_model_path, SCALAR_HEAD, "reward_model_path", model_args)
    check_before_loading("dpo", script_args, training_args, model_args)
    setup(training_args, "dpo")
    publication = hub.prepare("dpo", script_args, training_args, model_args)  # before the trainer
    peft_config = get_peft_config(model_args)
    checkpoint = last_checkpoint(training_args)

    pairs, test_pairs, source = load_data("preference", script_args)
    prompts = eval_prompts(script_args, test_pairs)

    policy_path = model_args.model_name_or_path
    tokenizer = load_tokenizer(policy_path, model_args)
    reward_model = (load_reward_model(script_args.reward_model_path, tokenizer, model_args)[0]
                    if script_args.reward_model_path else None)
    policy = load_causal_lm(policy_path, tokenizer, model_args)
    reference = None if peft_config else load_causal_lm(policy_path, tokenizer, model_args)

    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=training_args,
        train_dataset=pairs,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    dropped = len(pairs) - len(trainer.train_dataset)
    if dropped:
        logger.warning(f"{source}: dropped {dropped} of {len(pairs)} training pairs longer than "
                       f"max_length={training_args.max_length} tokens")
    train_result = train(trainer, checkpoint, "dpo")

    metrics = {"train_loss": train_result.training_loss}
    metrics.update(evaluate_against_sft(
        trainer, "dpo", script_args, model_args, tokenizer, prompts, sft_model_path=policy_path,
        reward_model=for_evaluation(reward_model, trainer), max_new_tokens=script_args.eval_max_new_tokens,
        temperature=script_args.eval_temperature, reference=trainer.ref_model))
    if trainer.accelerator.is_main_process:
        trainer.log_metrics("final", {k: v for k, v in metrics.items() if k != "samples"})
    finish(trainer, training_args, source, metrics, tags=["pipeline", "dpo", "alignment"], publication=publication)
