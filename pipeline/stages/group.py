"""Stage 3 without a value model, GRPO and RLOO: TRL's `GRPOTrainer` and `RLOOTrainer` sample several answers per
prompt (`num_generations`) and take each answer's advantage against the others of its group. They start from the
SFT policy (`model_name_or_path`) and are rewarded by the learned reward model (`reward_model_path`, a TRL
`reward_funcs` entry) and/or Python reward functions, in the same `module:function` syntax as PPO's, weighted by
`reward_model_weight` and `reward_function_weights`. Then the policy is evaluated against the SFT policy exactly as
PPO's is (pipeline.stages.policy_eval)."""

from trl import get_peft_config

from .. import hub, rl
from ..models import (CAUSAL_LM, SCALAR_HEAD, check_before_loading, check_model_kind, load_causal_lm,
                      load_reward_model, load_tokenizer)
from .common import check_template_roles, finish, last_checkpoint, load_data, setup, train
from .online import evaluation_prompts, require_reward, tokenize_prompts
from .policy_eval import evaluate_against_sft, for_evaluation


def main_for(stage: str, trainer_class, script_args, training_args, model_args):
    require_reward(stage, script_args, script_args.reward_model_path)
    check_model_kind(model_args.model_name_or_path, CAUSAL_LM, "model_name_or_path", model_args)
    if script_args.reward_model_path:
        check_model_kind(script_args.reward_model_path, SCALAR_HEAD, "reward_model_path", model_args)
    check_before_loading(stage, script_args, training_args, model_args)
    setup(training_args, stage)
    functions = rl.load_reward_functions(script_args.reward_functions, script_args.reward_function_weights)
    trains_on_model = bool(script_args.reward_model_path) and script_args.reward_model_weight != 0
    # TRL's reward_weights, one per reward_funcs entry, the reward model's first; set before the recipe is saved
    # (a saved recipe.yaml, which has them, reruns as it is)
    weights = ([script_args.reward_model_weight] if trains_on_model else []) + [w for _, _, w in functions]
    if training_args.reward_weights is not None and list(training_args.reward_weights) != weights:
        raise ValueError(f"{stage}: set reward_model_weight and reward_function_weights, not reward_weights "
                         "(the pipeline builds TRL's reward_weights from them)")
    training_args.reward_weights = weights
    publication = hub.prepare(stage, script_args, training_args, model_args)  # before the trainer
    peft_config = get_peft_config(model_args)

    prompts, eval_prompts, source = load_data("prompt", script_args)
    policy_path = model_args.model_name_or_path
    tokenizer = load_tokenizer(policy_path, model_args, padding_side="left")
    check_template_roles(tokenizer, policy_path, source, (prompts, script_args.dataset_train_split),
                         (eval_prompts, script_args.dataset_test_split))
    rl.trial_call(functions, tokenizer, prompts)
    reward_model, reward_tokenizer = (load_reward_model(script_args.reward_model_path, tokenizer, model_args)
                                      if script_args.reward_model_path else (None, None))
    policy = load_causal_lm(policy_path, tokenizer, model_args)

    reward_funcs = ([reward_model] if trains_on_model else []) + [
        rl.for_trl(name, function, tokenizer) for name, function, _ in functions]
    processing = ([reward_tokenizer] if trains_on_model else []) + [None] * len(functions)

    trainer = trainer_class(
        model=policy,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=tokenize_prompts(prompts, tokenizer, script_args.max_prompt_length, source, keep_prompts=True),
        processing_class=tokenizer,
        reward_processing_classes=processing,
        peft_config=peft_config,
    )
    held_out = evaluation_prompts(prompts, eval_prompts, tokenizer, script_args.max_prompt_length, source)
    train(trainer, last_checkpoint(training_args), stage)

    # the reward model as the trainer holds it (on its device, prepared for DeepSpeed), or, if it was not trained
    # against, made ready the same way
    scorer = trainer.reward_funcs[0] if trains_on_model else for_evaluation(reward_model, trainer)
    metrics = evaluate_against_sft(
        trainer, stage, script_args, model_args, tokenizer, held_out,
        sft_model_path=policy_path, reward_model=scorer, max_new_tokens=training_args.max_completion_length,
        temperature=training_args.temperature, reference=trainer.ref_model)
    metrics["eval_held_out"] = eval_prompts is not None
    if trainer.accelerator.is_main_process:
        trainer.log_metrics("final", {k: v for k, v in metrics.items() if k != "samples"})
    finish(trainer, training_args, source, metrics, tags=["pipeline", stage, "rlhf"], publication=publication)
