"""Stage 3, PPO: trl.experimental.ppo.PPOTrainer with policy, reference, reward and value models.

The policy and reference start from `sft_model_path`; the reward and value models from
`reward_model_path` (the value model is trained, the reward model frozen). After training, the policy is
evaluated against the SFT policy on held-out prompts (reward-model score, KL, win rates, and the gold
oracle's judgement on the embedded task). The value model is saved to `<output_dir>/value_model`.
"""

import math
import os

import torch
from torch.utils.data import DataLoader
from transformers import TrainerCallback
from trl import get_peft_config
from trl.experimental import ppo as trl_ppo
from trl.experimental.ppo.ppo_trainer import OnlineTrainerState

from .. import data, embedded, hub, rl
from ..evaluate import compare_policies
from ..models import check_same_tokenizer, load_causal_lm, load_scalar_head_model, load_tokenizer
from .common import (check_finite, finish, gradient_norm, last_checkpoint, load_data, logger, mark_output_dir,
                     setup)

VALUE_MODEL = "value_model"  # subfolder of the output folder and of every checkpoint
# logged every update; a NaN/inf in any of them stops the run before that update is saved
WATCHED_METRICS = ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg")


class PPOTrainer(trl_ppo.PPOTrainer):
    """TRL's PPOTrainer, made resumable and safe, with KL control, reward functions and PPO-ptx, without
    touching its training loop:

    - KL control: `kl_control` (pipeline.rl) sets `args.kl_coef`, which TRL's loop reads at every update, from
      each update's logged KL; the coefficient used is logged as `objective/kl_coef`;
    - reward functions: `reward_model` may be a `rl.CombinedReward`; each prompt batch tells it its prompt
      length (the loaders are wrapped), and the functions' means are logged as `rewards/<name>`;
    - PPO-ptx: with `ptx` batches and `ptx_coef` > 0, every backward pass of a policy update (TRL calls
      `accelerator.backward`) also carries `ptx_coef` x the policy's causal-LM loss on a ptx batch; logged as
      `loss/ptx_avg`;
    - resume: TRL 1.12's `train()` always starts at step 0 and its checkpoints hold the policy only. Here a
      checkpoint also holds `value_model/` (saved before transformers writes trainer_state.json, the
      checkpoint's completion mark), and `train(resume_from_checkpoint=...)` loads policy, value model,
      optimizer, scheduler and RNG states, runs only the remaining updates with the step/episode counters and
      log history restored, and skips the prompt batches already trained on. For that, the data order comes
      from a generator seeded by `seed` alone (TRL's shuffles from the global RNG that sampling also draws
      from, which no checkpoint could replay);
    - numerical faults: a NaN/inf gradient refuses the optimizer step, a NaN/inf score, KL or loss stops the run
      before that update is checkpointed (`NonFiniteError`, naming the step);
    - DDP saving (two TRL 1.12 bugs that only show with several processes): its `save_model` looks for
      `self.model.policy`, which a DistributedDataParallel wrapper hides, and then saves policy and value model
      as one state dict (shared tensors: safetensors refuses); unwrapping first gives it the model it expects.
      It never runs `Trainer.__init__`, so an attribute that transformers 5's `_save` reads on the non-saving
      processes is missing."""

    is_distributed_loading_by_transformers = False
    is_fsdp_xla_v1_enabled = False  # read by transformers when loading optimizer state; TRL never sets it

    def __init__(self, *args, kl_control=None, ptx: rl.PtxBatches | None = None, ptx_coef: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        unwrapped = self.accelerator.unwrap_model(self.model)
        if unwrapped is not self.model:  # TRL reads `self.model.policy` (the LoRA reference), hidden by DDP
            self.model.__dict__["policy"] = unwrapped.policy  # plain attributes, not submodules of the wrapper
            self.model.__dict__["value_model"] = unwrapped.value_model
        self.kl_control = kl_control or rl.FixedKLController(self.args.kl_coef)
        self.args.kl_coef = self.kl_control.value
        self.ptx, self.ptx_coef, self._ptx_losses = (ptx if ptx_coef else None), ptx_coef, []
        if self.ptx is not None:
            backward = self.accelerator.backward

            def backward_with_ptx(loss, **backward_kwargs):
                batch = self.ptx.next().to(self.accelerator.device)
                ptx_loss = rl.causal_lm_loss(self.accelerator.unwrap_model(self.model).policy, batch)
                self._ptx_losses.append(ptx_loss.detach())
                return backward(loss + self.ptx_coef * ptx_loss, **backward_kwargs)

            self.accelerator.backward = backward_with_ptx
        loader = DataLoader(self.train_dataset, batch_size=self.local_dataloader_batch_size, shuffle=True,
                            collate_fn=self.data_collator, drop_last=True,
                            generator=torch.Generator().manual_seed(self.args.seed))
        self.dataloader = self.accelerator.prepare(loader)
        step = self.optimizer.step

        def checked_step(*step_args, **step_kwargs):  # TRL calls optimizer.step() itself: checked here
            # (not with fp16 loss scaling, whose inf gradients are routine, nor between accumulation steps)
            if self.accelerator.scaler is None and self.accelerator.sync_gradients:
                norm = gradient_norm(self.accelerator.unwrap_model(self.model).parameters())
                if norm is not None:
                    check_finite(norm, "the gradient norm (a NaN/inf loss or reward)", self.state.global_step + 1)
            return step(*step_args, **step_kwargs)

        self.optimizer.step = checked_step

    @property
    def backward_passes_per_update(self) -> int:
        """As TRL's loop makes them: per PPO epoch, per mini-batch, one per micro-batch."""
        args = self.args
        return args.num_ppo_epochs * args.num_mini_batches * math.ceil(
            args.local_mini_batch_size / args.per_device_train_batch_size)

    def generate_completions(self, sampling: bool = False):
        # TRL's sample generations are scored by the reward too: keep them out of the functions' training means
        if not isinstance(self.reward_model, rl.CombinedReward):
            return super().generate_completions(sampling)
        sums = {name: list(values) for name, values in self.reward_model._sums.items()}
        try:
            return super().generate_completions(sampling)
        finally:
            self.reward_model._sums = sums

    def train(self, resume_from_checkpoint: str | None = None):
        loader, eval_loader, total, kl_coef = self.dataloader, self.eval_dataloader, self.args.num_total_batches, \
            self.args.kl_coef
        done = self._resume(resume_from_checkpoint) if resume_from_checkpoint else 0
        if done:
            self.dataloader = _SkipBatches(self.dataloader, done)
            self.args.num_total_batches = total - done
        if isinstance(self.reward_model, rl.CombinedReward):
            self.dataloader = _ScoringContext(self.dataloader, self.reward_model, self.state)
            self.eval_dataloader = _ScoringContext(self.eval_dataloader, self.reward_model, self.state)
        try:
            return super().train()
        finally:  # args as the recipe gave them (recipe.yaml and the model card are written from them)
            self.args.num_total_batches, self.args.kl_coef = total, kl_coef
            self.dataloader, self.eval_dataloader = loader, eval_loader

    def _resume(self, resume_from_checkpoint: str) -> int:
        """Load everything a checkpoint holds; returns the number of updates it had done."""
        saved = OnlineTrainerState.load_from_json(
            os.path.join(resume_from_checkpoint, "trainer_state.json"))
        model = self.accelerator.unwrap_model(self.model)
        self._load_weights(resume_from_checkpoint, model.policy)
        self._load_weights(os.path.join(resume_from_checkpoint, VALUE_MODEL), model.value_model)
        self._load_optimizer_and_scheduler(resume_from_checkpoint)
        self._load_rng_state(resume_from_checkpoint)
        done = saved.global_step
        # TRL's loop runs `num_total_batches` updates from step 0: the caller gives it the remaining ones, and the
        # counters go back (before the progress bar reads them) in on_train_begin, which it calls after zeroing them
        self.callback_handler.callbacks.insert(0, _RestoreState(saved, self.args.num_total_batches))
        logged = [row for row in saved.log_history if "objective/kl_coef" in row]
        # the KL controller where it was: the last coefficient used, updated by that update's KL
        if logged and isinstance(self.kl_control, rl.AdaptiveKLController):
            self.kl_control.value = logged[-1]["objective/kl_coef"]
            self.args.kl_coef = self.kl_control.update(logged[-1]["objective/kl"], self.args.batch_size)
        if self.ptx is not None:
            self.ptx.skip(done * self.backward_passes_per_update)
        return done

    def _load_weights(self, folder: str, module) -> None:
        """transformers' checkpoint loading (full weights or a peft adapter) into one of the two models; it
        reads `self.model` for tied-weight handling, so that is the module while it runs."""
        wrapped, self.model = self.model, module
        try:
            self._load_from_checkpoint(folder, model=module)
        finally:
            self.model = wrapped

    def log(self, logs: dict, *args, **kwargs):
        if "objective/scores" in logs:  # an update's metrics (the loop logs after the update, before saving)
            for key in WATCHED_METRICS:
                if key in logs:
                    check_finite(logs[key], key, self.state.global_step)
            logs["objective/kl_coef"] = self.args.kl_coef  # the coefficient this update's rewards used
            if self._ptx_losses:
                logs["loss/ptx_avg"] = self._mean_over_processes(torch.stack(self._ptx_losses).mean())
                self._ptx_losses = []
            if isinstance(self.reward_model, rl.CombinedReward):
                for key, value in self.reward_model.take_means().items():
                    logs[key] = self._mean_over_processes(torch.tensor(value, device=self.accelerator.device))
            self.args.kl_coef = self.kl_control.update(logs["objective/kl"], self.args.batch_size)
        return super().log(logs, *args, **kwargs)

    def _mean_over_processes(self, value: torch.Tensor) -> float:
        return self.accelerator.gather_for_metrics(value.reshape(1)).mean().item()

    def _save_checkpoint(self, model, trial):
        # the value model first: transformers writes trainer_state.json last, which marks the checkpoint complete
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        if self.args.should_save:
            self.accelerator.unwrap_model(self.model).value_model.save_pretrained(os.path.join(folder, VALUE_MODEL))
        # TRL writes the model card from `self.model.config`, which a DDP wrapper hides
        wrapped, self.model = self.model, self.accelerator.unwrap_model(self.model)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.model = wrapped

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        if self.is_deepspeed_enabled:
            return super().save_model(output_dir, _internal_call)
        wrapped, self.model = self.model, self.accelerator.unwrap_model(self.model)
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            self.model = wrapped


class _RestoreState(TrainerCallback):
    """Puts a checkpoint's step, episode and log history back into the state TRL's `train()` just zeroed."""

    def __init__(self, saved, total_steps: int):
        self.saved, self.total_steps = saved, total_steps

    def on_train_begin(self, args, state, control, **kwargs):
        state.global_step = self.saved.global_step
        state.episode = self.saved.episode
        state.log_history = self.saved.log_history
        state.max_steps = self.total_steps
        for name in ("logging_steps", "eval_steps", "save_steps"):  # fractions are of the whole run
            value = getattr(args, name)
            if value is not None and value < 1:
                setattr(state, name, math.ceil(self.total_steps * value))
        logger.info(f"PPO resumed at update {state.global_step} of {self.total_steps} (episode {state.episode})")


class _ScoringContext:
    """Passes the prompt loader's batches through, telling the combined reward each batch's prompt length
    (TRL scores `query + response` rows; the functions get prompts and completions apart) and update number."""

    def __init__(self, loader, reward: rl.CombinedReward, state):
        self.loader, self.reward, self.state = loader, reward, state

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.reward.context_length = batch["input_ids"].shape[1]
            self.reward.step = self.state.global_step + 1
            yield batch


class _SkipBatches:
    """The prompt loader with the batches a checkpoint has already trained on passed over, epochs included
    (iterating replays the seeded shuffles without running any model)."""

    def __init__(self, loader, skip: int):
        self.loader, self.skip = loader, skip

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        while self.skip >= len(self.loader):
            for _ in self.loader:
                pass
            self.skip -= len(self.loader)
        batches = iter(self.loader)
        for _ in range(self.skip):
            next(batches)
        self.skip = 0
        yield from batches


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
    reward = reward_model
    if script_args.reward_functions or script_args.reward_model_weight != 1.0:
        reward = rl.CombinedReward(reward_model, tokenizer, script_args.reward_functions,
                                   script_args.reward_function_weights, script_args.reward_model_weight)
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
        reward_model=reward,
        value_model=value_model,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=peft_config,
        kl_control=rl.kl_controller(script_args, training_args.kl_coef),
        ptx=ptx,
        ptx_coef=script_args.ptx_coef,
    )
    mark_output_dir(training_args, "ppo")
    trainer.train(resume_from_checkpoint=last_checkpoint(training_args))

    metrics = {}
    if trainer.accelerator.is_main_process:
        metrics = evaluate_against_sft(trainer, reward_model, script_args, training_args, model_args, tokenizer,
                                       eval_prompts if eval_prompts is not None else prompts)
        trainer.log_metrics("final", {k: v for k, v in metrics.items() if k != "samples"})
        trainer.accelerator.unwrap_model(trainer.model).value_model.save_pretrained(
            os.path.join(training_args.output_dir, VALUE_MODEL))
    finish(trainer, training_args, source, metrics, tags=["pipeline", "ppo", "rlhf"], publication=publication)


def evaluate_against_sft(trainer, reward_model, script_args, training_args, model_args, tokenizer, prompts) -> dict:
    """The trained policy against a fresh copy of the SFT policy, on the held-out prompts (rm_* by the learned
    reward model, even when the run was rewarded by functions too or instead)."""
    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    sft = load_causal_lm(training_args.sft_model_path, tokenizer, model_args).to(policy.device)
    policy.eval(), sft.eval()
    rows = list(prompts["prompt"])[: script_args.eval_max_prompts]
    on_embedded_task = script_args.dataset_name.startswith(data.EMBEDDED_PREFIX)
    return compare_policies(
        policy, sft, reward_model, tokenizer, rows,
        max_new_tokens=training_args.response_length,
        temperature=training_args.temperature,
        oracle=embedded.gold_score if on_embedded_task else None,
        samples_per_prompt=script_args.eval_samples_per_prompt,
        seed=training_args.seed,
    )
