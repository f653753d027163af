"""What the PPO stage adds to PPO as TRL 1.12 had it: KL control, reward functions, and PPO-ptx data.

- KL control: `FixedKLController` (TRL's behaviour) or `AdaptiveKLController` (Ziegler et al. 2019: the
  coefficient moves toward the value that keeps the policy's KL to the reference at a target).
- Reward functions: Python callables named `module:function` in the recipe, called TRL-GRPO style as
  `function(prompts=[str], completions=[str]) -> [float]`; the PPO trainer adds them, weighted, to (or, with
  `reward_model_weight: 0`, instead of) the reward model's score.
- PPO-ptx (InstructGPT): `PtxBatches`, an endless stream of packed causal-LM blocks of pretraining or SFT
  text whose loss, times `ptx_coef`, joins every policy update.
"""

import importlib
import math

import torch

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


def load_reward_functions(specs: list[str], weights: list[float] | None = None) -> list[tuple]:
    """The recipe's `reward_functions` (and their weights, default 1 each) as (name, function, weight), for
    pipeline.trainers.ppo.PPOTrainer, which calls each as `function(prompts=[str], completions=[str])`."""
    weights = list(weights) if weights else [1.0] * len(specs)
    if len(weights) != len(specs):
        raise ValueError(f"reward_function_weights has {len(weights)} values for {len(specs)} reward functions")
    return [(spec.partition(":")[2], load_function(spec), float(w)) for spec, w in zip(specs, weights)]


def for_trl(name: str, function, tokenizer):
    """One of our reward functions (text in, floats out) as a reward function for TRL's GRPO/RLOO trainers,
    which call it with conversational prompts and completions (lists of messages): the prompt is passed as the
    text the policy saw (the chat template's, as PPO passes it), the completion as the answer's text. A wrong
    number of values, or a value that is not a finite number, stops training with a line naming the function."""
    def reward(prompts, completions, **kwargs):
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                 if isinstance(p, list) else p for p in prompts]
        answers = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        values = list(function(prompts=texts, completions=answers))
        if len(values) != len(answers):
            raise ValueError(f"reward function {name} returned {len(values)} values for {len(answers)} completions")
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise ValueError(f"reward function {name} returned {values[:3]}...: expected a number per completion") from None
        bad = [v for v in values if not math.isfinite(v)]
        if bad:
            from .stages.common import NonFiniteError
            step = kwargs.get("trainer_state").global_step if kwargs.get("trainer_state") is not None else "?"
            raise NonFiniteError(f"reward function {name} returned {bad[0]} at step {step}: training stopped before "
                                 "that update; the checkpoints already in output_dir are kept")
        return values

    reward.__name__ = name
    return reward


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
