"""Stage 3, PPO: trl.experimental.ppo.PPOTrainer with policy, reference, reward and value models.

The policy and reference start from `sft_model_path`; the reward and value models from
`reward_model_path` (the value model is trained, the reward model frozen). After training, the policy is
evaluated against the SFT policy on held-out prompts (reward-model score, KL, win rates, and the gold
oracle's judgement on the embedded task). The value model is saved to `<output_dir>/value_model`.
"""

import os

from trl import get_peft_config
from trl.experimental import ppo as trl_ppo

from .. import data, embedded, hub
from ..evaluate import compare_policies
from ..models import check_same_tokenizer, load_causal_lm, load_scalar_head_model, load_tokenizer
from .common import finish, logger, setup


class PPOTrainer(trl_ppo.PPOTrainer):
    """TRL's PPOTrainer, saving correctly under DDP (two TRL 1.12 bugs that only show with several processes):
    - its `save_model` looks for `self.model.policy`, which a DistributedDataParallel wrapper hides, and then
      saves policy and value model as one state dict (shared tensors: safetensors refuses). Unwrapping first
      gives it the model it expects;
    - it never runs `Trainer.__init__`, so an attribute that transformers 5's `_save` reads on the
      non-saving processes is missing."""

    is_distributed_loading_by_transformers = False

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        if self.is_deepspeed_enabled:
            return super().save_model(output_dir, _internal_call)
        wrapped, self.model = self.model, self.accelerator.unwrap_model(self.model)
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            self.model = wrapped


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
    setup(training_args)
    publication = hub.prepare("ppo", script_args, training_args, model_args)  # before the trainer
    peft_config = get_peft_config(model_args)

    prompts, eval_prompts, source = data.load_for("prompt", script_args)

    tokenizer = load_tokenizer(training_args.sft_model_path, model_args, padding_side="left")
    check_same_tokenizer({
        "policy": tokenizer,
        "reward": load_tokenizer(training_args.reward_model_path, model_args),
    })
    policy = load_causal_lm(training_args.sft_model_path, tokenizer, model_args)
    reference = None if peft_config else load_causal_lm(training_args.sft_model_path, tokenizer, model_args)
    reward_model = load_scalar_head_model(training_args.reward_model_path, tokenizer, model_args)
    value_model = load_scalar_head_model(training_args.reward_model_path, tokenizer, model_args)

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
    )
    trainer.train()

    metrics = {}
    if trainer.accelerator.is_main_process:
        metrics = evaluate_against_sft(trainer, script_args, training_args, model_args, tokenizer,
                                       eval_prompts if eval_prompts is not None else prompts)
        trainer.log_metrics("final", {k: v for k, v in metrics.items() if k != "samples"})
        trainer.accelerator.unwrap_model(trainer.model).value_model.save_pretrained(
            os.path.join(training_args.output_dir, "value_model"))
    finish(trainer, training_args, source, metrics, tags=["pipeline", "ppo", "rlhf"], publication=publication)


def evaluate_against_sft(trainer, script_args, training_args, model_args, tokenizer, prompts) -> dict:
    """The trained policy against a fresh copy of the SFT policy, on the held-out prompts."""
    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    if hasattr(policy, "merge_and_unload"):
        policy = policy.merge_and_unload()
    sft = load_causal_lm(training_args.sft_model_path, tokenizer, model_args).to(policy.device)
    policy.eval(), sft.eval()
    rows = list(prompts["prompt"])[: script_args.eval_max_prompts]
    on_embedded_task = script_args.dataset_name.startswith(data.EMBEDDED_PREFIX)
    return compare_policies(
        policy, sft, trainer.reward_model, tokenizer, rows,
        max_new_tokens=training_args.response_length,
        temperature=training_args.temperature,
        oracle=embedded.gold_score if on_embedded_task else None,
        samples_per_prompt=script_args.eval_samples_per_prompt,
        seed=training_args.seed,
    )
