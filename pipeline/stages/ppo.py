"""Stage 3, PPO: pipeline.trainers.ppo.PPOTrainer (TRL 1.12's algorithm on transformers' Trainer) with policy,
reference, reward and value models.

The policy and reference start from `sft_model_path`; the reward and value models from
`reward_model_path` (the value model is trained, the reward model frozen). After training, the policy is
evaluated against the SFT policy on held-out prompts (reward-model score, KL, win rates, and the gold
oracle's judgement on the embedded task). The value model is saved to `<output_dir>/value_model`.
"""

from trl import get_peft_config
from trl.models import unwrap_model_for_generation

from .. import data, embedded, hub, rl
from ..evaluate import compare_policies
from ..models import check_same_tokenizer, load_causal_lm, load_scalar_head_model, load_tokenizer
from ..trainers.ppo import PPOTrainer
from .common import finish, last_checkpoint, load_data, logger, setup, train


def tokenize_prompts(dataset, tokenizer, max_prompt_length: int, source: str):
    """Prompts -> {"input_ids"} through the chat template's generation prompt; over-long ones are dropped."""
    def tokenize(row):
        prompt = row["prompt"]
        if isinstance(prompt, list):
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        else:
            ids = tokenizer(prompt)["input_ids"]
        return {"input_ids": ids}

    tokenized = dataset.map(tokenize, remove_columns=dataset.column_names)
    kept = tokenized.filter(lambda row: len(row["input_ids"]) <= max_prompt_length)
    if len(kept) < len(tokenized):
        logger.warning(f"{source}: dropped {len(tokenized) - len(kept)} prompts longer than {max_prompt_length} tokens")
    if len(kept) == 0:
        raise data.DataError(f"{source}: every prompt is longer than max_prompt_length={max_prompt_length} tokens")
    return kept


def main(script_args, training_args, model_args):
    setup(training_args, "ppo")
    publication = hub.prepare("ppo", script_args, training_args, model_args)  # before the trainer
    peft_config = get_peft_config(model_args)

    prompts, eval_prompts, source = load_data("prompt", script_args)

    tokenizer = load_tokenizer(training_args.sft_model_path, model_args, padding_side="left")
    check_same_tokenizer({
        "policy": tokenizer,
        "reward": load_tokenizer(training_args.reward_model_path, model_args),
    })
    policy = load_causal_lm(training_args.sft_model_path, tokenizer, model_args)
    reference = None if peft_config else load_causal_lm(training_args.sft_model_path, tokenizer, model_args)
    reward_model = load_scalar_head_model(training_args.reward_model_path, tokenizer, model_args)
    value_model = load_scalar_head_model(training_args.reward_model_path, tokenizer, model_args)
    reward_functions = rl.load_reward_functions(script_args.reward_functions, script_args.reward_function_weights)
    ptx = None
    if script_args.ptx_coef:
        if not script_args.ptx_dataset_name:
            raise ValueError("ptx_coef > 0 needs ptx_dataset_name (pretraining or SFT data, e.g. embedded:corpus)")
        ptx = rl.load_ptx(script_args, tokenizer, script_args.ptx_block_size,
                          training_args.per_device_train_batch_size,
                          seed=training_args.seed + training_args.process_index)  # other blocks per process

    train_dataset = tokenize_prompts(prompts, tokenizer, script_args.max_prompt_length, source)
    eval_dataset = tokenize_prompts(eval_prompts if eval_prompts is not None else prompts, tokenizer,
                                    script_args.max_prompt_length, source)

    trainer = PPOTrainer(
        args=training_args,
        processing_class=tokenizer,
        model=policy,
        ref_model=reference,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=peft_config,
        reward_functions=reward_functions,
        reward_model_weight=script_args.reward_model_weight,
        kl_control=rl.kl_controller(script_args, training_args.kl_coef),
        ptx=ptx,
        ptx_coef=script_args.ptx_coef,
    )
    train(trainer, last_checkpoint(training_args), "ppo")

    # every process takes part (under ZeRO-3 the weights are sharded): each answers its share of the prompts
    metrics = evaluate_against_sft(trainer, script_args, training_args, model_args, tokenizer,
                                   eval_prompts if eval_prompts is not None else prompts)
    if trainer.accelerator.is_main_process:
        trainer.log_metrics("final", {k: v for k, v in metrics.items() if k != "samples"})
    finish(trainer, training_args, source, metrics, tags=["pipeline", "ppo", "rlhf"], publication=publication)


def evaluate_against_sft(trainer, script_args, training_args, model_args, tokenizer, prompts) -> dict:
    """The trained policy against a fresh copy of the SFT policy on the held-out prompts, on every process
    (each its share of the prompts, the results gathered); rm_* by the learned reward model, even when the
    run was rewarded by functions too or instead."""
    accelerator = trainer.accelerator
    rows = list(prompts["prompt"])[: script_args.eval_max_prompts]
    on_embedded_task = script_args.dataset_name.startswith(data.EMBEDDED_PREFIX)
    with unwrap_model_for_generation(trainer.model_wrapped, accelerator,
                                     gather_deepspeed3_params=training_args.ds3_gather_for_generation) as unwrapped:
        policy = unwrapped.policy
        # the frozen reference is the SFT policy (under DeepSpeed a prepared copy: sharded with ZeRO-3); with LoRA
        # the reference is the policy's own base, so the SFT policy is loaded once more for the comparison
        sft = trainer.ref_model if trainer.ref_model is not None else load_causal_lm(
            training_args.sft_model_path, tokenizer, model_args).to(policy.device)
        was_training = policy.training
        policy.eval(), sft.eval()
        try:
            return compare_policies(
                policy, sft, trainer.reward_model, tokenizer, rows,
                max_new_tokens=training_args.response_length,
                temperature=training_args.temperature,
                oracle=embedded.gold_score if on_embedded_task else None,
                samples_per_prompt=script_args.eval_samples_per_prompt,
                seed=training_args.seed,
                process_index=accelerator.process_index,
                num_processes=accelerator.num_processes,
            )
        finally:
            policy.train(was_training)
