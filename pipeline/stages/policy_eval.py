"""The evaluation every stage-3 algorithm (PPO, GRPO, RLOO, DPO) ends with, so that their results compare: the
trained policy against a copy of the SFT policy on the same held-out prompts, under the same result keys
(`gold_score_<stage>`, `gold_score_sft`, `gold_win_rate_vs_sft`, `rm_*`, `kl_to_sft`, lengths, EOS rates,
the gold score's terms, samples)."""

from trl.models import prepare_deepspeed, unwrap_model_for_generation

from .. import data, embedded
from ..evaluate import compare_policies
from ..models import load_causal_lm


def for_evaluation(model, trainer):
    """A frozen model that only the evaluation uses (a reward model not trained against, a copy of the SFT
    policy), ready on this process. Under DeepSpeed it is wrapped as TRL wraps its own reference and reward
    models: under ZeRO-3, from_pretrained has left each process only its shard of the weights, and the wrapped
    model gathers them layer by layer in every forward. Otherwise it moves to the trainer's device."""
    if model is None:
        return None
    if trainer.is_deepspeed_enabled:
        return prepare_deepspeed(model, trainer.accelerator)
    return model.to(trainer.accelerator.device)


def evaluate_against_sft(trainer, stage: str, script_args, model_args, tokenizer, prompts, sft_model_path: str,
                         reward_model, max_new_tokens: int, temperature: float, reference=None,
                         policy_of=lambda model: model) -> dict:
    """Runs on every process (under ZeRO-3 the weights are sharded), each answering its share of the prompts;
    every process returns the gathered result.

    reference: the SFT policy if the trainer already holds it (its reference model; PPO with LoRA: the policy with
    its adapters off, PPOTrainer.reference_model), else a copy is loaded from `sft_model_path` (GRPO's and DPO's
    LoRA, whose reference is the policy's own base, or no reference at all).
    reward_model: scores the answers (rm_*), even when training was rewarded by functions too or instead; None
    leaves the rm_* results out. policy_of: the policy inside the unwrapped trained model (PPO's holds the value
    model too)."""
    accelerator = trainer.accelerator
    rows = list(prompts["prompt"])[: script_args.eval_max_prompts]
    on_embedded_task = script_args.dataset_name.startswith(data.EMBEDDED_PREFIX)
    gather = getattr(trainer.args, "ds3_gather_for_generation", True)
    sft = reference if reference is not None else for_evaluation(
        load_causal_lm(sft_model_path, tokenizer, model_args), trainer)
    with unwrap_model_for_generation(trainer.model_wrapped, accelerator, gather_deepspeed3_params=gather) as unwrapped:
        policy = policy_of(unwrapped)
        was_training = policy.training
        policy.eval(), sft.eval()
        try:
            return compare_policies(
                policy, sft, reward_model, tokenizer, rows,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                oracle=embedded.ORACLE if on_embedded_task else None,
                samples_per_prompt=script_args.eval_samples_per_prompt,
                seed=trainer.args.seed,
                names=(stage, "sft"),
                process_index=accelerator.process_index,
                num_processes=accelerator.num_processes,
            )
        finally:
            policy.train(was_training)
