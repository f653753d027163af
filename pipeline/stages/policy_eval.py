"""The evaluation every stage-3 algorithm (PPO, GRPO, RLOO, DPO) ends with, so that their results compare: the
trained policy against a copy of the SFT policy on the same held-out prompts, under the same result keys
(`gold_score_<stage>`, `gold_score_sft`, `gold_win_rate_vs_sft`, `rm_*`, `kl_to_sft`, lengths, EOS rates,
the gold score's terms, samples)."""

import os

from trl.models import prepare_deepspeed, unwrap_model_for_generation

from .. import data, embedded
from ..evaluate import compare_policies, evaluate_policy
from ..models import load_causal_lm
from ..monitor import Alarms, Monitor

CURVE_FIGURES = ("gold_score", "rm_score", "heldout_rm_score", "kl_to_reference", "response_length", "eos_rate",
                 "repeat_rate", "gold_repeated_sentences", "gold_sentiment")


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


def check_curve_settings(script_args) -> None:
    """Before anything loads: keep_best picks among the curve's points, so it needs curve_steps."""
    if script_args.keep_best and not script_args.curve_steps:
        raise ValueError("keep_best needs curve_steps > 0: the best step is chosen among the curve's evaluations")
    if script_args.curve_steps < 0 or script_args.curve_samples_per_prompt < 1:
        raise ValueError("curve_steps must be >= 0 and curve_samples_per_prompt >= 1")


class MonitorInCheckpoints:
    """Mixed into a Trainer: its `monitor` state (pipeline.monitor.Monitor) goes into every checkpoint before the
    trainer marks it complete, so a resumed run keeps its curve, its alarms' baseline and the alarms that fired."""

    monitor = None

    def _save_checkpoint(self, model, trial):
        if self.monitor is not None and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            self.monitor.write(folder)
        super()._save_checkpoint(model, trial)


def monitor_for(trainer, script_args, tokenizer, prompts, reward_model, reference, max_new_tokens: int,
                temperature: float, policy_of=lambda model: model, heldout_reward_models=(), alarms: Alarms | None = None,
                checkpoint: str | None = None) -> Monitor:
    """The run's pipeline.monitor.Monitor, added to the trainer's callbacks and resumed from `checkpoint`: its
    alarms (online stages feed them), and every `curve_steps` steps the policy on the held-out `prompts`
    (`curve_samples_per_prompt` answers each, at most eval_max_prompts prompts): gold score on the embedded task,
    the score of `reward_model` and of `heldout_reward_models`, KL to `reference` (the SFT policy), length.
    Every process runs the same evaluation (models sharded by ZeRO-3 take part in every forward)."""
    rows = list(prompts["prompt"])[: script_args.eval_max_prompts]
    on_embedded_task = script_args.dataset_name.startswith(data.EMBEDDED_PREFIX)
    gather = getattr(trainer.args, "ds3_gather_for_generation", True)

    def evaluate() -> dict:
        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator,
                                         gather_deepspeed3_params=gather) as unwrapped:
            policy = policy_of(unwrapped)
            policy.eval()
            results = evaluate_policy(policy, tokenizer, rows, max_new_tokens, temperature, reward_model=reward_model,
                                      reference=reference, oracle=embedded.ORACLE if on_embedded_task else None,
                                      samples_per_prompt=script_args.curve_samples_per_prompt, seed=trainer.args.seed,
                                      heldout_reward_models=heldout_reward_models)
        point = {key: results[key] for key in CURVE_FIGURES if key in results}
        if "kl_to_reference" in point:
            point["kl_to_sft"] = point.pop("kl_to_reference")
        return point

    if script_args.keep_best and trainer.is_deepspeed_enabled and getattr(
            trainer.accelerator.state.deepspeed_plugin, "zero_stage", 0) == 3:
        raise ValueError("keep_best does not work under ZeRO-3 yet (the policy's weights are sharded): use ZeRO-2, "
                         "DDP or one process")
    monitor = Monitor(trainer.args.output_dir, alarms or Alarms(), script_args.curve_steps, evaluate,
                      policy=lambda: policy_of(trainer.accelerator.unwrap_model(trainer.model)),
                      keep_best=script_args.keep_best, is_main_process=trainer.accelerator.is_main_process)
    monitor.alarms.verbose = trainer.accelerator.is_main_process
    monitor.resume(checkpoint)
    trainer.add_callback(monitor)
    return monitor


def log_final(trainer, metrics: dict) -> None:
    """The evaluation's figures on the main process's console (the samples, the curve and the alarms' steps, which
    are not figures, stay in results.json)."""
    if trainer.accelerator.is_main_process:
        trainer.log_metrics("final", {k: (", ".join(v) or "none") if k == "alarms" else v for k, v in metrics.items()
                                      if k == "alarms" or isinstance(v, (int, float, str))})
