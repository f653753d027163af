"""Stage 3, PPO: pipeline.trainers.ppo.PPOTrainer (TRL 1.12's algorithm on transformers' Trainer) with policy,
reference, reward and value models.

The policy and reference start from `sft_model_path`; the reward and value models from
`reward_model_path` (the value model is trained, the reward model frozen). After training, the policy is
evaluated against the SFT policy on held-out prompts (reward-model score, KL, win rates, and the gold
oracle's judgement on the embedded task). The value model is saved to `<output_dir>/value_model`.

With LoRA and `share_base_model` (the default), one copy of the base weights serves every role: the reference is
the policy with its adapters off, the value model an adapter with a head of its own on the policy's base, and a
reward model that is a LoRA adapter on the SFT model one more adapter (models.reward_adapter_on decides); any other
reward model is loaded whole beside it.
"""

import logging

from trl import get_peft_config

from .. import hub, rl
from ..models import (CAUSAL_LM, SCALAR_HEAD, check_before_loading, check_model_kind, check_same_tokenizer,
                      load_causal_lm, load_ensemble, load_scalar_head_model, load_tokenizer, require_ensemble,
                      reward_adapter_on)
from ..trainers.ppo import PPOTrainer
from .common import check_template_roles, finish, last_checkpoint, load_data, setup, train
from .online import alarms_for, evaluation_prompts, require_reward, tokenize_prompts
from .policy_eval import check_curve_settings, evaluate_against_sft, log_final, monitor_for

logger = logging.getLogger("pipeline")


def main(script_args, training_args, model_args):
    require_reward("ppo", script_args, training_args.reward_model_path)
    check_model_kind(training_args.sft_model_path, CAUSAL_LM, "sft_model_path", model_args)
    check_model_kind(training_args.reward_model_path, SCALAR_HEAD, "reward_model_path", model_args)
    if script_args.reward_ensemble != "off":
        require_ensemble(training_args.reward_model_path)
        if not script_args.reward_model_weight:
            raise ValueError(f"reward_ensemble: {script_args.reward_ensemble} needs the reward model "
                             "(reward_model_weight is 0): set reward_ensemble: off")
    check_curve_settings(script_args)
    check_before_loading("ppo", script_args, training_args, model_args)
    setup(training_args, "ppo")
    publication = hub.prepare("ppo", script_args, training_args, model_args)  # before the trainer
    peft_config = get_peft_config(model_args)

    prompts, eval_prompts, source = load_data("prompt", script_args)

    tokenizer = load_tokenizer(training_args.sft_model_path, model_args, padding_side="left")
    check_template_roles(tokenizer, training_args.sft_model_path, source, (prompts, script_args.dataset_train_split),
                         (eval_prompts, script_args.dataset_test_split))
    check_same_tokenizer({
        "policy": tokenizer,
        "reward": load_tokenizer(training_args.reward_model_path, model_args),
    })
    policy = load_causal_lm(training_args.sft_model_path, tokenizer, model_args, "sft_model_path")
    reference = None if peft_config else load_causal_lm(training_args.sft_model_path, tokenizer, model_args,
                                                        "sft_model_path")
    one_base = bool(peft_config) and training_args.share_base_model
    reward_adapter = reward_model = value_model = None  # on one base model the trainer puts the value adapter on it
    if one_base:
        reward_adapter, what = reward_adapter_on(training_args.reward_model_path, training_args.sft_model_path)
        logger.info(f"reward_model_path {training_args.reward_model_path} is {what}: " + (
            "an adapter on the policy's base model, as the value model is (one copy of the base weights)"
            if reward_adapter else "loaded whole beside the policy's base model, on which the value model is an adapter"))
    if reward_adapter is None:
        reward_model = load_scalar_head_model(training_args.reward_model_path, tokenizer, model_args,
                                              "reward_model_path")
    if not one_base:
        value_model = load_scalar_head_model(training_args.reward_model_path, tokenizer, model_args,
                                             "reward_model_path")
    members = load_ensemble(training_args.reward_model_path, tokenizer, model_args) \
        if script_args.reward_ensemble != "off" else []
    reward_functions = rl.load_reward_functions(script_args.reward_functions, script_args.reward_function_weights)
    rl.trial_call(reward_functions, tokenizer, prompts)
    ptx = None
    if script_args.ptx_coef:
        if not script_args.ptx_dataset_name:
            raise ValueError("ptx_coef > 0 needs ptx_dataset_name (pretraining or SFT data, e.g. embedded:corpus)")
        ptx = rl.load_ptx(script_args, tokenizer, script_args.ptx_block_size,
                          training_args.per_device_train_batch_size,
                          seed=training_args.seed + training_args.process_index)  # other blocks per process

    train_dataset = tokenize_prompts(prompts, tokenizer, script_args.max_prompt_length, source)
    held_out = evaluation_prompts(prompts, eval_prompts, tokenizer, script_args.max_prompt_length, source)
    eval_dataset = tokenize_prompts(held_out, tokenizer, script_args.max_prompt_length, source)  # already filtered

    trainer = PPOTrainer(
        args=training_args,
        processing_class=tokenizer,
        model=policy,
        ref_model=reference,
        reward_model=reward_model,
        reward_adapter=reward_adapter,
        value_model=value_model,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=peft_config,
        reward_functions=reward_functions,
        reward_model_weight=script_args.reward_model_weight,
        kl_control=rl.kl_controller(script_args, training_args.kl_coef),
        ptx=ptx,
        ptx_coef=script_args.ptx_coef,
        reward_members=members,
        reward_ensemble=script_args.reward_ensemble,
        reward_ensemble_k=script_args.reward_ensemble_k,
    )
    checkpoint = last_checkpoint(training_args)
    trainer.monitor = monitor_for(
        trainer, script_args, tokenizer, held_out, trainer.reward_model, trainer.reference_model(),
        training_args.response_length, training_args.temperature, policy_of=lambda model: model.policy,
        heldout_reward_models=trainer.reward_members if script_args.reward_ensemble == "monitor" else (),
        alarms=alarms_for(script_args), checkpoint=checkpoint)
    train(trainer, checkpoint, "ppo")

    metrics = evaluate_against_sft(
        trainer, "ppo", script_args, model_args, tokenizer, held_out,
        sft_model_path=training_args.sft_model_path, reward_model=trainer.reward_model,
        max_new_tokens=training_args.response_length, temperature=training_args.temperature,
        reference=trainer.reference_model(), policy_of=lambda model: model.policy)
    metrics["eval_held_out"] = eval_prompts is not None
    metrics.update(trainer.monitor.results())
    log_final(trainer, metrics)
    finish(trainer, training_args, source, metrics, tags=["pipeline", "ppo", "rlhf"], publication=publication)
