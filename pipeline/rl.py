"""The parts the PPO stage adds to TRL's PPOTrainer: KL control, reward functions, and PPO-ptx data.

- KL control: `FixedKLController` (TRL's behaviour) or `AdaptiveKLController` (Ziegler et al. 2019: the
  coefficient moves toward the value that keeps the policy's KL to the reference at a target).
- Reward functions: Python callables named `module:function` in the recipe, called TRL-GRPO style as
  `function(prompts=[str], completions=[str]) -> [float]`; `CombinedReward` adds them, weighted, to (or, with
  `reward_model_weight: 0`, instead of) the reward model's score, behind the interface TRL's PPO reads a reward
  model through (`base_model_prefix` backbone + `score`).
- PPO-ptx (InstructGPT): `PtxBatches`, an endless stream of packed causal-LM blocks of pretraining or SFT
  text whose loss, times `ptx_coef`, joins every policy update.
"""

import importlib
import math
from types import SimpleNamespace

import torch
from torch import nn

from . import data


class FixedKLController:
    """kl_coef stays where the recipe put it."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, kl: float, n_steps: int) -> float:
        return self.value


class AdaptiveKLController:
    """Ziegler et al. (2019), "Fine-Tuning Language Models from Human Preferences", section 2.2: after each
    batch of `n_steps` episodes with mean KL `kl`, multiply the coefficient by 1 + e * n_steps / horizon, where
    e = clip(kl / target - 1, -0.2, 0.2): above the target it grows (pulling the policy back), below it shrinks."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs kl_target > 0 and kl_horizon > 0, got {target} and {horizon}")
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, kl: float, n_steps: int) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


def kl_controller(script_args, kl_coef: float):
    if script_args.kl_control == "adaptive":
        return AdaptiveKLController(kl_coef, script_args.kl_target, script_args.kl_horizon)
    return FixedKLController(kl_coef)


def load_function(spec: str):
    """`package.module:function` -> the callable, or a one-line ValueError naming what is wrong."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ValueError(f"reward function {spec!r}: expected 'module:function' (e.g. pipeline.embedded:gold_reward)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"reward function {spec!r}: cannot import {module_name!r} ({error})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"reward function {spec!r}: {module_name} has no function {name!r}")
    return function


class CombinedReward(nn.Module):
    """reward_model_weight x the reward model's score + sum of weight x function(prompts, completions).

    TRL's PPO scores a batch through `get_reward(model, query_responses, pad, context_length)`, which runs
    `getattr(model, model.base_model_prefix)(...)` and `model.score(hidden_states[-1])` and reads the value at
    each sequence's last token. Here the "backbone" returns the combined reward at every position (the reward
    model's per-token score plus the functions' per-sequence values) and `score` passes it through. The prompt
    length of the batch being scored is set by the trainer (`context_length`) before each batch; `step` names
    the update in error messages. The mean of each function over an update is kept for the logs (`take_means`).
    """

    base_model_prefix = "combined"

    def __init__(self, reward_model, tokenizer, functions: list[str], weights: list[float] | None = None,
                 model_weight: float = 1.0):
        super().__init__()
        weights = list(weights) if weights else [1.0] * len(functions)
        if len(weights) != len(functions):
            raise ValueError(f"reward_function_weights has {len(weights)} values for {len(functions)} reward functions")
        self.reward_model = reward_model
        self.tokenizer = tokenizer
        self.functions = [(spec.partition(":")[2], load_function(spec), float(w)) for spec, w in zip(functions, weights)]
        self.model_weight = float(model_weight)
        self.config = reward_model.config
        self.context_length: int | None = None
        self.step = 0
        self._sums: dict[str, list[float]] = {}

    @property
    def combined(self):
        return self._per_token_rewards

    def score(self, hidden):
        return hidden

    def _per_token_rewards(self, input_ids, attention_mask, position_ids=None, **kwargs):
        rewards = torch.zeros((*input_ids.shape, 1), device=input_ids.device)
        if self.model_weight:
            model = self.reward_model
            output = getattr(model, model.base_model_prefix)(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, return_dict=True,
                output_hidden_states=True, use_cache=False)
            rewards = rewards + self.model_weight * model.score(output.hidden_states[-1]).float()
        if self.functions:
            if self.context_length is None:
                raise RuntimeError("CombinedReward.context_length must be set before scoring a batch")
            ids = input_ids.masked_fill(~attention_mask.bool(), self.tokenizer.pad_token_id).tolist()
            prompts = self.tokenizer.batch_decode([row[: self.context_length] for row in ids], skip_special_tokens=True)
            completions = self.tokenizer.batch_decode([row[self.context_length:] for row in ids],
                                                      skip_special_tokens=True)
            for name, function, weight in self.functions:
                values = [float(v) for v in function(prompts=prompts, completions=completions)]
                if len(values) != len(completions):
                    raise ValueError(f"reward function {name} returned {len(values)} values for {len(completions)} completions")
                bad = [v for v in values if not math.isfinite(v)]
                if bad:
                    from .stages.common import NonFiniteError
                    raise NonFiniteError(f"reward function {name} returned {bad[0]} at step {self.step}: training "
                                         f"stopped before that update; the checkpoints already in output_dir are kept")
                self._sums.setdefault(name, []).extend(values)
                rewards = rewards + weight * torch.tensor(values, device=rewards.device)[:, None, None]
        return SimpleNamespace(hidden_states=(rewards,))

    def take_means(self) -> dict[str, float]:
        """{"rewards/<function>": mean value since the last call} (the raw values, before weighting)."""
        means = {f"rewards/{name}": sum(v) / len(v) for name, v in self._sums.items() if v}
        self._sums = {}
        return means


class PtxBatches:
    """Endless shuffled batches of `block_size`-token blocks, cut from the dataset's texts joined with EOS
    (the causal-LM pretraining objective). Text rows are used as they are; prompt/completion and
    conversational rows through the tokenizer's chat template. Reproducible: a generator seeded by `seed`."""

    def __init__(self, dataset, tokenizer, block_size: int, batch_size: int, seed: int, source: str):
        texts = [self._text(row, tokenizer) for row in dataset]
        ids = []
        for text in texts:
            ids.extend(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
        n_blocks = len(ids) // block_size
        if n_blocks < batch_size:
            raise data.DataError(f"{source}: {len(ids)} tokens of ptx text make {n_blocks} blocks of {block_size} "
                                 f"tokens, fewer than one batch of {batch_size}")
        self.blocks = torch.tensor(ids[: n_blocks * block_size]).view(n_blocks, block_size)
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._order, self._next = torch.empty(0, dtype=torch.long), 0

    @staticmethod
    def _text(row, tokenizer) -> str:
        if "text" in row:
            return row["text"]
        if "messages" in row:
            return tokenizer.apply_chat_template(row["messages"], tokenize=False)
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, list):
            return tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        return prompt + completion

    def __len__(self):
        return len(self.blocks)

    def next(self) -> torch.Tensor:
        if self._next + self.batch_size > len(self._order):
            self._order, self._next = torch.randperm(len(self.blocks), generator=self.generator), 0
        batch = self.blocks[self._order[self._next:self._next + self.batch_size]]
        self._next += self.batch_size
        return batch

    def skip(self, n_batches: int) -> None:
        """Pass over the batches a resumed run's checkpoint had already used."""
        for _ in range(n_batches):
            self.next()


def load_ptx(script_args, tokenizer, block_size: int, batch_size: int, seed: int) -> PtxBatches:
    """The ptx dataset named in the PPO recipe (any name `dataset_name` accepts), as text or SFT rows."""
    train, _, source = data.load_splits(script_args.ptx_dataset_name, None, "train", "test",
                                        seed=script_args.embedded_seed)
    try:
        rows = data.normalise(train, "text", f"{source} [train]", script_args.invalid_rows)
    except data.DataError:
        rows = data.normalise(train, "sft", f"{source} [train]", script_args.invalid_rows)
    return PtxBatches(rows, tokenizer, block_size, batch_size, seed, source)


def causal_lm_loss(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `model` on full blocks (no padding)."""
    logits = model(input_ids=input_ids).logits[:, :-1].float()
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
