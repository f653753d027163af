"""PPO for causal LMs on transformers' Trainer loop: TRL 1.12's algorithm and config field names, since TRL
deleted its `PPOTrainer` in 1.13.

Built the way TRL's current online trainers (RLOO, GRPO) are: the Trainer's dataloader hands over one rollout
batch of prompts per update, repeated once per micro-batch of the update; `_prepare_inputs` generates and
scores the rollouts when an update starts (policy samples, reference log-probs, values, rewards with the
per-token KL penalty, GAE advantages) and then returns one micro-batch of them per call; `compute_loss` is
PPO's clipped loss on that micro-batch. An update is `num_ppo_epochs x num_mini_batches` ordinary optimizer
steps, each of `gradient_accumulation_steps` micro-batches, so checkpoints, resume, gradient accumulation,
DDP/DeepSpeed/FSDP wrapping, callbacks, logging and progress bars are transformers' own.

Sizes, per update (as TRL 1.12 names them): `local_batch_size` = per_device_train_batch_size x
gradient_accumulation_steps x num_mini_batches rollouts per process, `batch_size` = that x processes;
`num_total_batches` = ceil(total_episodes / batch_size) updates. A step of the Trainer (`global_step`,
`logging_steps`, `save_steps`) is one optimizer step: an update is num_ppo_epochs x num_mini_batches steps.

Beside TRL 1.12: padding-free epochs and scoring passes (`padding_free`, pipeline/padding_free.py), reward
functions beside the reward model (`reward_functions`), adaptive KL (`kl_control`),
PPO-ptx (`ptx`, `ptx_coef`), checkpoints that hold the value model (`value_model/`) and, when taken in the middle
of an update, its rollouts, so that a resumed run continues exactly; NaN/inf scores and losses stop the run. With
LoRA, one copy of the base weights for policy, reference, value and reward (`share_base_model`, one_base.py).
"""

import json
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch.utils.data import Sampler
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments
from trl.models import create_reference_model, prepare_deepspeed, prepare_fsdp, unwrap_model_for_generation
from trl.trainer.utils import disable_dropout_in_model, entropy_from_logits, selective_log_softmax

from .. import padding_free, rollout
from . import one_base, ppo_math

VALUE_MODEL = "value_model"  # subfolder of the output folder and of every checkpoint
ROLLOUTS = "rollouts"  # subfolder of a checkpoint taken in the middle of an update: each process's rollouts
STATE_FILE = "ppo_state.json"  # the KL coefficient in force and the ensemble's calibration, in every checkpoint
ENSEMBLE_MODES = ("off", "monitor", "mean", "mean_minus_std")  # what reward_members are for (PPOTrainer)
INVALID_LOGPROB = 1.0  # log-prob written at padding (TRL 1.12's value): equal for policy and reference, KL 0


@dataclass
class PPOConfig(TrainingArguments):
    """TRL 1.12's `PPOConfig` fields and defaults (TRL's trainers' defaults for `learning_rate`, `logging_steps`,
    `gradient_checkpointing` and `bf16` too), on transformers' `TrainingArguments`. `max_grad_norm` defaults to
    0 (no clipping): TRL 1.12's loop never clipped, whatever the field said; here a value > 0 clips."""

    learning_rate: float = field(default=3e-6, metadata={"help": "Initial learning rate (AdamW)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X optimizer steps (a float < 1: a ratio)."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Recompute activations in backward."})
    bf16: bool | None = field(default=None, metadata={"help": "bfloat16 mixed precision; default: true unless fp16."})
    max_grad_norm: float = field(default=0.0, metadata={
        "help": "Clip the gradient norm at this value (0: no clipping, as TRL 1.12's PPO loop did)."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for dataset preprocessing."})
    num_mini_batches: int = field(default=1, metadata={
        "help": "Mini-batches per rollout batch per PPO epoch; each is one optimizer step."})
    total_episodes: int | None = field(default=None, metadata={
        "help": "Rollouts to train on in all (default: num_train_epochs x the prompts)."})
    local_rollout_forward_batch_size: int = field(default=64, metadata={
        "help": "Rows per generation and per scoring forward pass, per process."})
    num_sample_generations: int = field(default=10, metadata={
        "help": "How many times to print sample completions of the eval prompts during training (0: never)."})
    response_length: int = field(default=53, metadata={"help": "Tokens generated per response, at most."})
    stop_token: Literal["eos"] | None = field(default=None, metadata={
        "help": "'eos': responses end at the end of an assistant turn as the chat template writes it (ChatML's "
                "<|im_end|>, Llama 3's <|eot_id|>; EOS for templates that end turns with it) or at EOS; what "
                "follows is padding. Unset: the same tokens, which the policy's generation config stops at."})
    stop_token_id: int | None = field(default=None, metadata={"help": "A token id that ends responses instead."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature."})
    missing_eos_penalty: float | None = field(default=None, metadata={
        "help": "Subtracted from the score of a response that holds no stop token (it ran to response_length)."})
    sft_model_path: str = field(default="EleutherAI/pythia-160m", metadata={"help": "The SFT policy (and reference)."})
    reward_model_path: str = field(default="EleutherAI/pythia-160m", metadata={
        "help": "The reward model (frozen; the value model starts from it too)."})
    model_adapter_name: str | None = field(default=None, metadata={"help": "LoRA: the adapter to train."})
    ref_adapter_name: str | None = field(default=None, metadata={
        "help": "LoRA: an adapter to use as the reference (default: the policy with its adapters disabled)."})
    share_base_model: bool = field(default=True, metadata={
        "help": "LoRA (use_peft): one copy of the base weights for every role. The value model is a LoRA adapter "
                "with a head of its own on the policy's base model, and a reward model that is a LoRA adapter on the "
                "SFT model (the reward stage with use_peft) one more adapter, frozen. false: the value model is a "
                "whole copy of the reward model, trained in full, beside the reward model, as without LoRA."})
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten the per-token rewards before GAE."})
    kl_coef: float = field(default=0.05, metadata={"help": "Weight of the per-token KL penalty in the reward."})
    kl_estimator: Literal["k1", "k3"] = field(default="k1", metadata={
        "help": "KL estimator: 'k1' (log-ratio) or 'k3' (lower variance, never negative)."})
    cliprange: float = field(default=0.2, metadata={"help": "Clip range of the policy ratio."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Clip range of the value predictions."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    padding_free: Literal["auto", "flat", "packed", "rows", "off"] = field(default="auto", metadata={
        "help": "How rollout rows go through the model in the PPO epochs and the scoring passes: 'packed' (several "
                "rows' real tokens per row, kept apart by restarting position ids), 'flat' (all of them in one row: "
                "for flash attention's variable-length kernels), 'rows' (each row's real tokens alone, rows cut to "
                "the longest), 'off' (TRL 1.12's padded rows); 'auto': flat with flash attention, else packed where "
                "every model keeps packed rows apart, else rows. The same maths every way (pipeline/padding_free.py)."})
    ds3_gather_for_generation: bool = field(default=True, metadata={
        "help": "ZeRO-3: gather the policy's weights for generation (faster; off: generate sharded, less memory)."})
    # computed by the trainer (TRL 1.12 kept them in the config too); reported in recipe.yaml as the run used them
    num_total_batches: int | None = field(default=None, metadata={"help": "Computed: updates in the run."})
    micro_batch_size: int | None = field(default=None, metadata={"help": "Computed: rows per micro-batch, all processes."})
    local_batch_size: int | None = field(default=None, metadata={"help": "Computed: rollouts per update per process."})
    batch_size: int | None = field(default=None, metadata={"help": "Computed: rollouts per update, all processes."})
    local_mini_batch_size: int | None = field(default=None, metadata={"help": "Computed: rows per optimizer step per process."})
    mini_batch_size: int | None = field(default=None, metadata={"help": "Computed: rows per optimizer step."})

    def __post_init__(self):
        self.bf16 = not self.fp16 if self.bf16 is None else self.bf16
        if self.ddp_find_unused_parameters is None:  # every parameter of the policy and value model is used
            self.ddp_find_unused_parameters = False
        super().__post_init__()


class PolicyAndValue(torch.nn.Module):
    """The two trained models as one module, so one optimizer and one DDP/DeepSpeed/FSDP wrapper hold both.
    `forward` returns (policy output, value at every position); with `ptx_input_ids`, also the policy's
    causal-LM loss on those blocks (PPO-ptx), inside the same wrapped forward.

    With LoRA, `adapters` switches the policy's adapters (pipeline.trainers.one_base); on one base model
    (`share_base_model`) the value model is an adapter on the policy's base with a head of its own
    (`one_base.AdapterScalarHead`), read as a sequence classifier is."""

    def __init__(self, policy, value_model, adapters: "one_base.Adapters | None" = None):
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        self.adapters = adapters
        self.config = policy.config  # what Trainer and the model card read

    @property
    def one_base(self) -> bool:
        return isinstance(self.value_model, one_base.AdapterScalarHead)

    def _models(self):
        """The models with weights of their own (on one base model, the policy alone)."""
        return (self.policy,) if self.one_base else (self.policy, self.value_model)

    def value_parameters(self) -> list:
        """The value model's parameters: on one base model its adapter's and its head's."""
        if not self.one_base:
            return list(self.value_model.parameters())
        return one_base.adapter_parameters(self.policy, one_base.VALUE_ADAPTER) + list(self.value_model.parameters())

    def policy_parameters(self) -> list:
        """The policy's parameters: its base and its own adapter (not the value and reward adapters on that base)."""
        others = {id(p) for name in (one_base.VALUE_ADAPTER, one_base.REWARD_ADAPTER)
                  for p in one_base.adapter_parameters(self.policy, name)} if self.one_base else set()
        return [p for p in self.policy.parameters() if id(p) not in others]

    def reference_context(self, adapter_name: str | None = None):
        """Context yielding the LoRA policy as the reference: its adapters disabled (or `adapter_name` alone)."""
        return self.adapters.use(adapter_name)

    @property
    def is_gradient_checkpointing(self) -> bool:  # read by TRL's unwrap_model_for_generation
        policy = self.policy.get_base_model() if hasattr(self.policy, "get_base_model") else self.policy
        return getattr(policy, "is_activation_checkpointing", False)

    # transformers >= 5.25's Trainer calls `activation_checkpointing_enable(activation_checkpointing_kwargs=...,
    # every_n_layers=..., offload=...)`; TRL's generation helpers still call the older `gradient_checkpointing_*`
    # names. Both reach the two models with whatever keywords the caller passed.
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        if self.one_base:  # a layer recomputed in the backward pass runs under the adapter of its forward
            activation_checkpointing_kwargs = dict(activation_checkpointing_kwargs or {})
            if activation_checkpointing_kwargs.get("use_reentrant"):
                raise ValueError("gradient_checkpointing_kwargs use_reentrant: true cannot recompute a layer under the "
                                 "adapter of its forward, which PPO with LoRA on one base model needs: leave "
                                 "use_reentrant out (transformers' default is false), or set share_base_model: false")
            activation_checkpointing_kwargs.update(use_reentrant=False, context_fn=self.adapters.recompute_context)
        for model in self._models():
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs)
            else:  # transformers before 5.25
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs,
                                                    **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self):
        for model in self._models():
            disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
            disable()

    def gradient_checkpointing_disable(self):
        self.activation_checkpointing_disable()

    def forward(self, layout, where, ptx_input_ids=None, **kwargs):
        """Rollout rows laid out by pipeline.padding_free (`layout`, a Layout): (the policy's logits, the value
        model's values), both at the rollout positions `where` marks, and the PPO-ptx loss or None."""
        rows = layout
        logits = padding_free.logits_at(self.policy, rows, where)
        values = padding_free.scalar_at(self.value_model, rows, where)
        if ptx_input_ids is None:
            return logits, values, None
        logits_ptx = self.policy(input_ids=ptx_input_ids, return_dict=True, use_cache=False).logits[:, :-1].float()
        ptx_loss = torch.nn.functional.cross_entropy(logits_ptx.reshape(-1, logits_ptx.shape[-1]),
                                                     ptx_input_ids[:, 1:].reshape(-1))
        return logits, values, ptx_loss


class RolloutSampler(Sampler):
    """Prompt indices for the Trainer's dataloader: each epoch a permutation of the prompts drawn from
    (seed, epoch) alone, cut into rollout batches of `batch_size` (all processes; a last partial one is dropped),
    each batch repeated `repeats` times, once per micro-batch of its update. Accelerate then deals each copy of a
    batch out to the processes, the same slice to the same process every time. Seeding by epoch (transformers
    calls `set_epoch`) makes a resumed run draw what the uninterrupted one drew."""

    def __init__(self, num_prompts: int, batch_size: int, repeats: int, seed: int):
        self.num_prompts, self.batch_size, self.repeats, self.seed = num_prompts, batch_size, repeats, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(self.num_prompts, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        for start in range(0, self.num_prompts - self.batch_size + 1, self.batch_size):
            chunk = order[start:start + self.batch_size].tolist()
            for _ in range(self.repeats):
                yield from chunk

    def __len__(self) -> int:
        return self.num_prompts // self.batch_size * self.batch_size * self.repeats


class PPOTrainer(Trainer):
    """PPO on transformers' Trainer. Arguments as TRL 1.12's PPOTrainer (`model` is the policy; `ref_model`
    None: a copy of it, or with `peft_config` the policy with its adapters disabled), plus:

    value_model None, with LoRA (`peft_config`, or a PeftModel policy): the value model is a LoRA adapter with a
        head of its own on the policy's base (pipeline.trainers.one_base), starting from the reward model's head
        (and from its adapter, with `reward_adapter`);
    reward_adapter: instead of `reward_model`, the folder of a reward model's LoRA adapter (task SEQ_CLS, a `score`
        head) trained on the policy's base model: it runs as one more adapter on that base, frozen;

    reward_functions: callables `f(prompts=[str], completions=[str]) -> [float]`, as (name, function, weight),
        added to `reward_model_weight` x the reward model's score (which may be 0: functions alone);
    kl_control: an object with `.value` and `.update(kl, episodes)` (pipeline.rl), moving `kl_coef` after
        each update;
    ptx, ptx_coef: PPO-ptx: `ptx.next()` gives a batch of token blocks whose causal-LM loss, times ptx_coef,
        joins every micro-batch's loss (`ptx.skip(n)` passes over n batches on resume).
    """

    _tag_names = ["trl", "ppo", "pipeline"]

    def __init__(self, args: PPOConfig, processing_class, model, ref_model, reward_model, train_dataset, value_model,
                 data_collator=None, eval_dataset=None, optimizers=(None, None), callbacks=None, peft_config=None,
                 reward_functions=(), reward_model_weight: float = 1.0, kl_control=None, ptx=None,
                 ptx_coef: float = 0.0, reward_adapter: str | None = None, reward_members=(),
                 reward_ensemble: str = "off", reward_ensemble_k: float = 1.0, monitor=None):
        if ref_model is not None and ref_model is model:
            raise ValueError("model and ref_model must be different objects (pass ref_model=None for a copy)")
        if args.stop_token and args.stop_token_id is not None:
            raise ValueError("set stop_token or stop_token_id, not both")
        if args.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {args.kl_estimator!r}")
        from ..models import stop_token_ids

        # the tokens that end a response: an explicit stop_token_id, else the end of an assistant turn as the chat
        # template writes it and EOS (what `generate` stops at; TRL 1.12 assumed EOS, which a ChatML model never
        # writes at the end of its answers)
        # the embedding's rows (under ZeRO-3 a partitioned weight reads as empty: the config's size then)
        vocabulary = model.get_input_embeddings().weight.shape[0] or model.config.vocab_size
        if args.stop_token_id is not None and not 0 <= args.stop_token_id < vocabulary:
            raise ValueError(f"stop_token_id {args.stop_token_id} is not a token of the model's vocabulary "
                             f"(0 to {vocabulary - 1})")
        self.stop_token_ids = ([args.stop_token_id] if args.stop_token_id is not None
                               else stop_token_ids(processing_class, getattr(model, "generation_config", None)))

        if peft_config is not None:
            from peft import get_peft_model
            model = get_peft_model(model, peft_config)
        self.is_peft_model = hasattr(model, "disable_adapter") and hasattr(model, "peft_config")
        if ref_model is None and not self.is_peft_model:
            ref_model = create_reference_model(model)
        if reward_adapter is not None and reward_model is not None:
            raise ValueError("pass reward_model or reward_adapter, not both")
        adapters = None
        if self.is_peft_model and value_model is None:  # one base model for every role
            adapters, value_model, reward_model = one_base.attach(model, reward_model, reward_adapter)
        elif value_model is None or reward_adapter is not None:
            raise ValueError("value_model=None and reward_adapter need a LoRA policy (peft_config, or a PeftModel): "
                             "the value and reward adapters go on its base model")
        elif self.is_peft_model:
            adapters = one_base.Adapters(model, [model.active_adapter])
        for module in (model, ref_model, value_model, reward_model):
            if module is not None:
                disable_dropout_in_model(module)

        self._set_sizes(args, len(train_dataset))
        self.ref_model, self.reward_model = ref_model, reward_model
        from ..rl import CheckedRewardFunction

        self.reward_functions = [(name, f if isinstance(f, CheckedRewardFunction) else CheckedRewardFunction(name, f),
                                  w) for name, f, w in reward_functions]
        self.reward_model_weight = float(reward_model_weight)
        self.kl_coef = args.kl_coef if kl_control is None else kl_control.value
        self.kl_control = kl_control
        self.ptx, self.ptx_coef = (ptx if ptx_coef else None), ptx_coef
        # a reward-model ensemble (the reward stage's ensemble_size): the reward model and `reward_members`
        if reward_ensemble not in ENSEMBLE_MODES:
            raise ValueError(f"reward_ensemble must be one of {', '.join(ENSEMBLE_MODES)}, got {reward_ensemble!r}")
        if reward_ensemble != "off" and (not reward_members or not reward_model_weight
                                         or reward_model is None and reward_adapter is None):
            raise ValueError(f"reward_ensemble: {reward_ensemble} needs a reward model (reward_model_weight not 0) and "
                             "the members of its ensemble")
        self.reward_members = list(reward_members) if reward_ensemble != "off" else []
        self.reward_ensemble, self.reward_ensemble_k = reward_ensemble, float(reward_ensemble_k)
        self.ensemble_calibration = None  # per member (mean, std) of its scores on the first rollouts
        self.monitor = monitor  # pipeline.monitor.Monitor: its alarms see every rollout batch
        self._buffer = None  # the current update's rollouts
        self._micro_step = None  # micro-batches trained since the start of the run
        self._metrics: dict[str, list[float]] = {}
        self._resume_from = None
        self.layout = padding_free.choose_layout(args.padding_free, [  # an adapter's head: probed with the policy's body
            m for m in (model, ref_model, value_model, reward_model) if not isinstance(m, one_base.AdapterScalarHead)])
        self.token_counts = {"computed": 0, "real": 0}  # tokens through the models in scoring and epochs

        super().__init__(model=PolicyAndValue(model, value_model, adapters), args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                         optimizers=optimizers,
                         data_collator=data_collator or DataCollatorWithPadding(processing_class))

        self.ref_model, self.reward_model = self._ready(self.ref_model), self._ready(self.reward_model)
        self.lockstep = padding_free.lockstep(self)  # sharded weights: layouts whose passes every process makes
        self.reward_members = [self._ready(member) for member in self.reward_members]

    def _ready(self, frozen):
        """A frozen model (reference, reward, ensemble member) on this process's device, wrapped as the policy is
        (DeepSpeed, FSDP); None stays None."""
        if frozen is None:
            return None
        if isinstance(frozen, one_base.AdapterScalarHead):  # its head alone: the rest is the policy's
            return frozen.to(self.accelerator.device).eval()
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(frozen, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(frozen, self.accelerator)
        return frozen.to(self.accelerator.device).eval()

    def _count_tokens(self, laid, passes: int) -> None:
        self.token_counts["computed"] += passes * laid.computed_tokens
        self.token_counts["real"] += passes * laid.real_tokens

    @staticmethod
    def _set_sizes(args: PPOConfig, num_prompts: int) -> None:
        """The batch sizes of TRL 1.12's names, and the Trainer's step budget (`max_steps`) from them."""
        _ = args.device  # sets up the distributed state, which `world_size` reads
        processes = args.world_size
        args.local_mini_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps
        args.local_batch_size = args.local_mini_batch_size * args.num_mini_batches
        args.micro_batch_size = args.per_device_train_batch_size * processes
        args.mini_batch_size = args.local_mini_batch_size * processes
        args.batch_size = args.local_batch_size * processes
        if args.whiten_rewards and args.local_mini_batch_size < 8:
            raise ValueError(f"whiten_rewards needs at least 8 rows per process and optimizer step, got "
                             f"{args.local_mini_batch_size} (per_device_train_batch_size x gradient_accumulation_steps)")
        if num_prompts < args.batch_size:
            raise ValueError(f"{num_prompts} prompts are fewer than one rollout batch of {args.batch_size} "
                             f"(per_device_train_batch_size x gradient_accumulation_steps x num_mini_batches x "
                             f"{processes} processes)")
        if args.total_episodes is None:
            args.total_episodes = int(args.num_train_epochs * num_prompts)
        if args.total_episodes <= 0:
            raise ValueError(f"total_episodes must be > 0, got {args.total_episodes}")
        args.num_total_batches = math.ceil(args.total_episodes / args.batch_size)
        args.max_steps = args.num_total_batches * args.num_ppo_epochs * args.num_mini_batches

    @property
    def steps_per_update(self) -> int:
        return self.args.num_ppo_epochs * self.args.num_mini_batches

    @property
    def micro_batches_per_update(self) -> int:
        return self.steps_per_update * self.args.gradient_accumulation_steps

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """TRL 1.12's schedule: the learning rate moves once per update (its loop stepped the scheduler after
        each update's epochs, over `num_total_batches` steps, warmup counted in updates), so every optimizer
        step of an update uses the same rate. transformers steps the scheduler after every optimizer step:
        each multiplier here is read at the update the step belongs to. Schedulers that are not
        multiplier-based (e.g. reduce_lr_on_plateau) are left as transformers makes them."""
        if self.lr_scheduler is not None:  # passed in `optimizers`: the caller's own
            return self.lr_scheduler
        scheduler = super().create_scheduler(self.args.num_total_batches, optimizer)
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            per_update = self.steps_per_update

            def at_update(multiplier):  # a function: LambdaLR's state_dict leaves it out, as it should
                return lambda step: multiplier(step // per_update)

            scheduler.lr_lambdas = [at_update(m) for m in scheduler.lr_lambdas]  # step 0 is update 0 for both
        return scheduler

    # ---- data: one rollout batch of prompts, once per micro-batch of its update
    def _set_signature_columns_if_needed(self):
        self._signature_columns = ["input_ids"]

    def get_train_dataloader(self):
        return self._get_dataloader(self.train_dataset, "Training", batch_size=self.args.local_batch_size,
                                    sampler_fn=self._get_train_sampler, is_training=True)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return RolloutSampler(len(dataset), self.args.batch_size, self.micro_batches_per_update, self.args.seed)

    def train(self, resume_from_checkpoint=None, **kwargs):
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        self._resume_from, self._micro_step, self._buffer = resume_from_checkpoint, None, None
        if resume_from_checkpoint:
            self._check_value_model_layout(resume_from_checkpoint)
            self._load_ppo_state(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _prepare_inputs(self, batch):
        if self._micro_step is None:  # the first micro-batch of this run (a resumed one starts where it stopped)
            self._micro_step = self.state.global_step * self.args.gradient_accumulation_steps
            if self.ptx is not None:
                self.ptx.skip(self._micro_step)
            if self._micro_step % self.micro_batches_per_update:
                self._buffer = self._load_rollouts(self._resume_from)
        position = self._micro_step % self.micro_batches_per_update
        if position == 0:
            self._buffer = self._make_rollouts(batch["input_ids"].to(self.accelerator.device))
        self._micro_step += 1
        indices = self._buffer["schedule"][position]
        inputs = {key: value[indices] for key, value in self._buffer.items()
                  if isinstance(value, torch.Tensor) and key != "schedule"}
        if self.ptx is not None:
            inputs["ptx_input_ids"] = self.ptx.next().to(self.accelerator.device)
        return inputs

    # ---- rollouts
    @torch.no_grad()
    def _make_rollouts(self, queries: torch.Tensor) -> dict:
        """Generate, score and compute advantages for one update's prompts on this process; the micro-batch
        schedule of the update (a fresh shuffle per PPO epoch) comes with them."""
        args, pad = self.args, self.processing_class.pad_token_id
        context = queries.shape[1]
        step = self.state.global_step + 1
        config = rollout.sampling_config(args.response_length, args.temperature, self.stop_token_ids, pad)
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                         gather_deepspeed3_params=args.ds3_gather_for_generation) as unwrapped:
            query_responses, logprobs = rollout.generate(unwrapped.policy, queries, pad, config,
                                                         args.local_rollout_forward_batch_size, return_logprobs=True)
        responses = rollout.truncate_after(self.stop_token_ids, pad, query_responses[:, context:])
        query_responses = torch.cat((queries, responses), 1)
        mask = rollout.attention_mask(query_responses, context, pad, self.stop_token_ids)

        # the whole batch laid out at once (packed: the best packing of all its rows), run a part of at most
        # local_rollout_forward_batch_size layout rows at a time (flat: one layout row of as many tokens)
        wrapper = self.accelerator.unwrap_model(self.model)
        chunk = args.local_rollout_forward_batch_size
        # flat: one layout row per part, of at most the tokens of `chunk` rows of the longest
        budget = chunk * int(mask.sum(1).max()) if self.layout == "flat" else None
        laid = None if self.lockstep else padding_free.layout(query_responses, mask, self.layout, capacity=budget)
        read = mask[:, context - 1:-1]  # the positions before each response token, and its last one
        where = _at_columns(read, context - 1, query_responses.shape[1])
        last = context + mask[:, context:].sum(1) - 1  # each row's last real token
        at_last = torch.zeros_like(mask).scatter_(1, last[:, None], True)
        ref_logprobs = torch.full(read.shape, INVALID_LOGPROB, device=queries.device)
        values = torch.zeros(read.shape, device=queries.device)
        scores = torch.zeros(len(queries), device=queries.device)
        member_scores = torch.zeros(len(self.reward_members), len(queries), device=queries.device)
        parts = (padding_free.groups(query_responses, mask, self.layout, chunk) if self.lockstep
                 else laid.parts(1 if self.layout == "flat" else chunk))
        for rows, part in parts:
            part_read, part_where = read[rows], where[rows]
            with self._reference() as reference:
                ref_logits = padding_free.logits_at(reference, part, part_where)
            targets = query_responses[rows, context:][part_read]
            ref_logprobs[rows] = _scatter(part_read, _logprobs(ref_logits / (args.temperature + 1e-7), targets),
                                          INVALID_LOGPROB)
            values[rows] = _scatter(part_read, padding_free.scalar_at(wrapper.value_model, part, part_where).float(),
                                    0.0)
            passes = 2
            if self.reward_model_weight:
                scores[rows] = self.reward_model_weight * padding_free.scalar_at(self.reward_model, part,
                                                                                 at_last[rows]).float()
                passes += 1
            for index, member in enumerate(self.reward_members):
                member_scores[index, rows] = padding_free.scalar_at(member, part, at_last[rows]).float()
                passes += 1
            self._count_tokens(part, passes)
        model_scores = scores / self.reward_model_weight if self.reward_model_weight else None
        if self.reward_members:  # every member's score, the reward model's first
            member_scores = torch.cat((model_scores[None], member_scores))
            if self.reward_ensemble != "monitor":
                scores = self.reward_model_weight * self._ensemble_score(member_scores)
        if self.monitor is not None:
            gather = self.accelerator.gather
            self._record(self.monitor.alarms.observe(
                step, gather(mask[:, context:].sum(1)), None if model_scores is None else gather(model_scores),
                gather(member_scores.T.contiguous()).T if self.reward_members else None))
        if self.reward_functions:
            scores = scores + self._function_rewards(query_responses, context, step)
        self._check_finite(scores, "the reward (objective/scores)", step)

        scores, has_eos = ppo_math.apply_missing_eos_penalty(scores, rollout.ended(responses, self.stop_token_ids),
                                                             args.missing_eos_penalty)
        _, padding, padding_p1, score_at = ppo_math.response_masks(mask[:, context:])
        logprobs = logprobs.masked_fill(padding, INVALID_LOGPROB)
        ref_logprobs = ref_logprobs.masked_fill(padding, INVALID_LOGPROB)
        values = values.masked_fill(padding_p1, 0)

        kl = ppo_math.kl_per_token(logprobs, ref_logprobs, args.kl_estimator)
        rewards, non_score = ppo_math.token_rewards(scores, kl, self.kl_coef, score_at)
        if args.whiten_rewards:
            rewards = ppo_math.masked_whiten(rewards, ~padding_p1, shift_mean=False).masked_fill(padding_p1, 0)
        advantages, returns = ppo_math.gae(rewards, values, args.gamma, args.lam)
        advantages = ppo_math.masked_whiten(advantages, ~padding).masked_fill(padding, 0)

        mean_kl = self._global_mean(kl.sum(1).mean())
        self._record({
            "objective/kl": mean_kl,
            "objective/entropy": (-logprobs).masked_fill(padding, 0).sum(1).mean(),
            "objective/non_score_reward": non_score.sum(1).mean(),
            "objective/rlhf_reward": non_score.sum(1).mean() + scores.mean(),
            "objective/scores": scores.mean(),
            "objective/kl_coef": self.kl_coef,
            "val/num_eos_tokens": has_eos.float().sum() * self.accelerator.num_processes,
            "episode": (self.state.global_step // self.steps_per_update + 1) * args.batch_size,
        })
        self._print_samples(query_responses, context, scores)
        if self.kl_control is not None:  # the next update's coefficient, from this one's KL
            self.kl_coef = self.kl_control.update(mean_kl, args.batch_size)

        schedule = []
        for _ in range(args.num_ppo_epochs):
            order = torch.randperm(args.local_batch_size, device=queries.device)
            schedule += list(order.split(args.per_device_train_batch_size))
        return {"query_responses": query_responses, "attention_mask": mask, "logprobs": logprobs, "values": values, "returns": returns,
                "advantages": advantages, "padding": padding, "padding_p1": padding_p1,
                "context_length": torch.full((len(queries),), context, device=queries.device),
                "schedule": schedule}

    def _ensemble_score(self, member_scores: torch.Tensor) -> torch.Tensor:
        """The ensemble's reward for each answer: every member's score standardised by its mean and spread on the
        run's first rollouts (members trained apart differ in offset and scale), then their mean (`mean`), or
        the mean minus reward_ensemble_k times their standard deviation (`mean_minus_std`: uncertain answers
        earn less), put back on the reward model's own scale."""
        if self.ensemble_calibration is None:
            everyone = self.accelerator.gather(member_scores.T.contiguous()).T
            self.ensemble_calibration = [everyone.mean(1).tolist(), everyone.std(1).clamp_min(1e-6).tolist()]
        mean, std = (torch.tensor(v, device=member_scores.device)[:, None] for v in self.ensemble_calibration)
        z = (member_scores - mean) / std
        combined = z.mean(0)
        if self.reward_ensemble == "mean_minus_std":
            combined = combined - self.reward_ensemble_k * z.std(0)
        self._record({"objective/ensemble_std": z.std(0).mean()})
        return mean[0] + std[0] * combined

    def _print_samples(self, query_responses: torch.Tensor, context: int, scores: torch.Tensor, rows: int = 4):
        """`num_sample_generations` times in a run, a few of this update's rollouts and scores (main process)."""
        every = max(1, self.args.num_total_batches // self.args.num_sample_generations) \
            if self.args.num_sample_generations > 0 else 0
        update = self.state.global_step // self.steps_per_update
        if not every or update % every or not self.accelerator.is_main_process:
            return
        decode = self.processing_class.batch_decode
        print(f"update {update + 1}/{self.args.num_total_batches}: sample rollouts (score | prompt | response)")
        for prompt, response, score in zip(decode(query_responses[:rows, :context], skip_special_tokens=True),
                                           decode(query_responses[:rows, context:], skip_special_tokens=True),
                                           scores[:rows].tolist()):
            print(f"  {score:+.3f} | {' '.join(prompt.split())} | {' '.join(response.split())}")

    def _reference(self):
        """The reference policy: the frozen copy, or the LoRA policy with its adapters disabled (or set to
        `ref_adapter_name`)."""
        if self.ref_model is not None:
            return nullcontext(self.ref_model)
        return self.accelerator.unwrap_model(self.model).reference_context(self.args.ref_adapter_name)

    def reference_model(self):
        """The reference as a model, for the evaluation: the frozen copy, or with LoRA the policy with its adapters
        disabled (or `ref_adapter_name` alone) as a model of its own (one_base.AdapterView), so that no copy of
        the SFT model is loaded for it."""
        if self.ref_model is not None:
            return self.ref_model
        wrapper = self.accelerator.unwrap_model(self.model)
        return one_base.AdapterView(wrapper.adapters, self.args.ref_adapter_name)

    def _function_rewards(self, query_responses: torch.Tensor, context: int, step: int) -> torch.Tensor:
        tokenizer = self.processing_class
        rows = query_responses.tolist()
        prompts = tokenizer.batch_decode([row[:context] for row in rows], skip_special_tokens=True)
        completions = tokenizer.batch_decode([row[context:] for row in rows], skip_special_tokens=True)
        total = torch.zeros(len(rows), device=query_responses.device)
        for name, function, weight in self.reward_functions:
            values = function(prompts=prompts, completions=completions, step=step)  # checked: rl.CheckedRewardFunction
            values = torch.tensor(values, device=total.device)
            self._record({f"rewards/{name}": values.mean()})
            total = total + weight * values
        return total

    # ---- the loss of one micro-batch
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        context = int(inputs["context_length"][0])
        rows, mask = inputs["query_responses"], inputs["attention_mask"]
        padding, padding_p1 = inputs["padding"], inputs["padding_p1"]
        read = ~padding_p1  # the positions before each response token, and its last one (the value's)
        laid = padding_free.layout(rows, mask, self.layout, one_block=self.lockstep)
        self._count_tokens(laid, 2)
        logits, values, ptx_loss = model(layout=laid, where=_at_columns(read, context - 1, rows.shape[1]),
                                         ptx_input_ids=inputs.get("ptx_input_ids"))
        logits = logits / (args.temperature + 1e-7)
        logprobs = _scatter(read, _logprobs(logits, rows[:, context:][read]), INVALID_LOGPROB)
        logprobs = logprobs.masked_fill(padding, INVALID_LOGPROB)
        values = _scatter(read, values.float(), 0.0)

        pg_loss, pg_clipfrac, ratio = ppo_math.policy_loss(logprobs, inputs["logprobs"], inputs["advantages"],
                                                           ~padding, args.cliprange)
        vf_loss, vf_clipfrac = ppo_math.value_loss(values, inputs["values"], inputs["returns"], ~padding_p1,
                                                   args.cliprange_value)
        loss = pg_loss + args.vf_coef * vf_loss
        if ptx_loss is not None:
            loss = loss + self.ptx_coef * ptx_loss
        step = self.state.global_step + 1
        self._check_finite(loss, "the PPO loss", step)
        with torch.no_grad():
            tokens = ~padding
            record = {
                "loss/policy_avg": pg_loss, "loss/value_avg": vf_loss,
                "policy/clipfrac_avg": pg_clipfrac, "val/clipfrac_avg": vf_clipfrac,
                "policy/approxkl_avg": ppo_math.masked_mean(0.5 * (logprobs - inputs["logprobs"]) ** 2, tokens),
                "policy/entropy_avg": entropy_from_logits(logits.float())[tokens[read]].mean(),
                "val/ratio": ppo_math.masked_mean(ratio, tokens),
            }
            if ptx_loss is not None:
                record["loss/ptx_avg"] = ptx_loss
            self._record(record)
        return (loss, logits) if return_outputs else loss

    # ---- logging: every value recorded since the last log, averaged, then averaged over processes
    def _record(self, values: dict) -> None:
        for key, value in values.items():
            self._metrics.setdefault(key, []).append(float(value))

    def _global_mean(self, value) -> float:
        tensor = torch.as_tensor(float(value), device=self.accelerator.device).reshape(1)
        return self.accelerator.gather(tensor).mean().item()

    def _check_finite(self, value: torch.Tensor, what: str, step: int) -> None:
        if not torch.isfinite(value).all():
            from ..stages.common import check_finite
            bad = value[~torch.isfinite(value)].flatten()[0].item() if value.dim() else value.item()
            check_finite(bad, what, step)

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if self._metrics:
            keys = sorted(self._metrics)
            local = torch.tensor([sum(self._metrics[k]) / len(self._metrics[k]) for k in keys],
                                 device=self.accelerator.device)
            merged = self.accelerator.gather(local[None]).mean(0).tolist()
            logs = {**logs, **dict(zip(keys, merged))}
            ratios = self._metrics.get("val/ratio", [])
            if len(ratios) > 1:
                logs["val/ratio_var"] = float(torch.tensor(ratios).var())
            self._metrics = {}
        if self.token_counts["computed"]:
            logs["perf/padding_fraction"] = 1 - self.token_counts["real"] / self.token_counts["computed"]
        super().log(logs, start_time)

    # ---- saving and loading: the policy in the folder, the value model in value_model/
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        wrapper = self.accelerator.unwrap_model(self.model)
        if state_dict is None:
            state_dict = wrapper.state_dict()
        parts = {name: {k[len(name) + 1:]: v for k, v in state_dict.items() if k.startswith(name + ".")}
                 for name in ("policy", "value_model")}
        os.makedirs(output_dir, exist_ok=True)
        if wrapper.one_base:  # the policy's adapter; value_model/: the value adapter and its head (one_base)
            wrapper.policy.save_pretrained(output_dir, state_dict=parts["policy"],
                                           selected_adapters=[wrapper.adapters.trained[0]])
            head = {key[len("score."):]: value for key, value in parts["value_model"].items()}
            one_base.save_value_model(wrapper.adapters, os.path.join(output_dir, VALUE_MODEL), parts["policy"], head)
        else:
            wrapper.policy.save_pretrained(output_dir, state_dict=parts["policy"])
            wrapper.value_model.save_pretrained(os.path.join(output_dir, VALUE_MODEL), state_dict=parts["value_model"])
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_checkpoint(self, model, trial):
        # written before transformers writes trainer_state.json, the checkpoint's completion mark
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        os.makedirs(folder, exist_ok=True)
        if self._micro_step is not None and self._micro_step % self.micro_batches_per_update:
            os.makedirs(os.path.join(folder, ROLLOUTS), exist_ok=True)
            torch.save({**self._buffer, "metrics": self._metrics},
                       os.path.join(folder, ROLLOUTS, f"process-{self.accelerator.process_index}.pt"))
        if self.args.should_save:
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump({"kl_coef": self.kl_coef, "ensemble_calibration": self.ensemble_calibration}, f)
            if self.monitor is not None:
                self.monitor.write(folder)
        super()._save_checkpoint(model, trial)

    def _save_rng_state(self, output_dir):
        super()._save_rng_state(output_dir)
        # every process's files (its RNG state, its rollouts) are on disk before the main process writes
        # trainer_state.json, the mark of a complete checkpoint
        self.accelerator.wait_for_everyone()

    def _check_value_model_layout(self, checkpoint: str) -> None:
        """A checkpoint's value model is an adapter on the policy's base (share_base_model with LoRA) or a whole
        model: resuming it as the other kind cannot work, and is refused before anything loads."""
        from ..models import is_adapter

        folder = os.path.join(checkpoint, VALUE_MODEL)
        if not os.path.isdir(folder):
            return  # transformers' own loading says what is missing
        saved, running = is_adapter(folder), self.accelerator.unwrap_model(self.model).one_base
        if saved != running:
            def layout(adapter):
                return ("as an adapter on the policy's base model (LoRA with share_base_model: true)" if adapter
                        else "whole (share_base_model: false, or no LoRA)")
            raise ValueError(f"{checkpoint} holds the value model {layout(saved)}, and this run has it {layout(running)}:"
                             " resume with the settings it was saved with, or start in a new output_dir")

    def _load_ppo_state(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, STATE_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f)
            self.kl_coef, self.ensemble_calibration = saved["kl_coef"], saved.get("ensemble_calibration")
            if self.kl_control is not None:
                self.kl_control.value = self.kl_coef

    def _load_rollouts(self, checkpoint: str) -> dict:
        path = os.path.join(checkpoint, ROLLOUTS, f"process-{self.accelerator.process_index}.pt")
        if not os.path.isfile(path):
            raise ValueError(f"{checkpoint} was saved in the middle of a PPO update but has no {path}: "
                             f"resume from a checkpoint at an update boundary")
        saved = torch.load(path, map_location="cpu", weights_only=False)
        self._metrics = saved.pop("metrics")
        device = self.accelerator.device
        saved["schedule"] = [indices.to(device) for indices in saved["schedule"]]
        return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in saved.items()}

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        wrapper = self.accelerator.unwrap_model(model if model is not None else self.model)
        if wrapper.one_base:  # both adapters and the head, with peft's set_peft_model_state_dict
            name = wrapper.adapters.trained[0]
            policy_folder = resume_from_checkpoint if name == "default" else os.path.join(resume_from_checkpoint, name)
            one_base.load_policy_adapter(wrapper.adapters, policy_folder)
            one_base.load_value_model(wrapper.adapters, wrapper.value_model,
                                      os.path.join(resume_from_checkpoint, VALUE_MODEL))
            return
        for module, folder in ((wrapper.policy, resume_from_checkpoint),
                               (wrapper.value_model, os.path.join(resume_from_checkpoint, VALUE_MODEL))):
            # transformers' own loading (full weights or a peft adapter); it reads self.model for tied weights
            wrapped, self.model = self.model, module
            try:
                super()._load_from_checkpoint(folder, model=module)
            finally:
                self.model = wrapped


def _at_columns(read: torch.Tensor, first: int, width: int) -> torch.Tensor:
    """`read` (rows, n), marks over columns first..first+n-1, as marks over all `width` columns."""
    where = torch.zeros(len(read), width, dtype=torch.bool, device=read.device)
    where[:, first:first + read.shape[1]] = read
    return where


def _scatter(read: torch.Tensor, values: torch.Tensor, fill: float) -> torch.Tensor:
    """Values read at the marks of `read` (row-major), back in a (rows, n) tensor, `fill` elsewhere."""
    return torch.full(read.shape, fill, dtype=values.dtype, device=values.device).masked_scatter(read, values)


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of `tokens` (n) under `logits` (n, vocabulary); one batch row for TRL's helper, which
    loops over its first dimension."""
    return selective_log_softmax(logits[None], tokens[None])[0]
