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
import inspect
import math
import os
import traceback

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


def answer_words(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """Each answer's length in words: with a negative weight, a length-penalised reward (a defence against a reward
    model that pays for length: `reward_functions: [pipeline.rl:answer_words]`, `reward_function_weights: [-0.1]`).
    The same for PPO, GRPO and RLOO."""
    return [float(len(completion.split())) for completion in completions]


def load_function(spec: str):
    """`package.module:function` -> the callable, or a one-line ValueError naming what is wrong."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ValueError(f"reward function {spec!r}: expected 'module:function' (e.g. pipeline.embedded:gold_reward)")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):  # the module itself (or its package) is not found
            raise ValueError(f"reward function {spec!r}: cannot import {module_name!r} ({error})") from None
        raise ValueError(f"reward function {spec!r}: importing {module_name} failed: {_where_failed(error)}") from None
    except Exception as error:  # SyntaxError, NameError, ... raised by the module's own code
        raise ValueError(f"reward function {spec!r}: importing {module_name} failed: {_where_failed(error)}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"reward function {spec!r}: {module_name} has no function {name!r}")
    return function


def _where_failed(error: BaseException) -> str:
    """'SyntaxError: invalid syntax (rewards/mine.py, line 3)': the error and the place in the user's code."""
    if isinstance(error, SyntaxError) and error.filename:
        filename, line, text = error.filename, error.lineno, error.msg
    else:
        frames = [f for f in traceback.extract_tb(error.__traceback__) if "<frozen" not in f.filename]
        frame = frames[-1] if frames else None
        filename, line, text = (frame.filename if frame else None), (frame.lineno if frame else None), str(error)
    where = f" ({os.path.relpath(filename)}, line {line})" if filename else ""
    return f"{type(error).__name__}: {' '.join(text.split())}{where}"


# A reward's size beyond which it is refused: finite, but the value loss squares it and the advantages scale with it,
# so it ends as a NaN/inf loss a few steps later, blamed on the learning rate. Rewards are usually within +-100.
REWARD_BOUND = 1e6


class RewardFunctionError(ValueError):
    """A reward function of the recipe that failed: raised, or returned something other than a number per
    completion. The message names it (module:function), what it did, and the update."""


def _signature_problem(function) -> str | None:
    """Why `function` cannot be called as function(prompts=..., completions=...), or None."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return None  # a builtin or C callable: not inspectable, tried on the trial call instead
    kinds = {p.kind for p in parameters.values()}
    takes = set(parameters) if inspect.Parameter.VAR_KEYWORD not in kinds else {"prompts", "completions"}
    missing = [name for name in ("prompts", "completions") if name not in takes]
    required = [name for name, p in parameters.items() if p.default is p.empty
                and name not in ("prompts", "completions") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if missing or required:
        return (f"must accept the keyword arguments prompts= and completions= (and **kwargs for the rest); its "
                f"signature is {inspect.signature(function)}")
    return None


class CheckedRewardFunction:
    """A recipe's reward function, called as function(prompts=[str], completions=[str]) -> [float] and checked:
    an exception, a wrong number of values, a value that is not a number or not finite stops training with one
    line naming `spec` and the update (`step`)."""

    def __init__(self, spec: str, function):
        self.spec, self.function = spec, function
        self.__name__ = spec.rpartition(":")[2]  # the function's own name

    def __call__(self, prompts: list[str], completions: list[str], step="?", **kwargs) -> list[float]:
        trial = step == "trial"
        at = "on a trial call before training (2 prompts of the dataset)" if trial else f"at update {step}"
        stopped = ("nothing was trained" if trial
                   else "training stopped before that update; the checkpoints already in output_dir are kept")
        try:
            values = self.function(prompts=prompts, completions=completions, **kwargs)
        except Exception as error:
            where = traceback.extract_tb(error.__traceback__)[-1]
            raise RewardFunctionError(
                f"reward function {self.spec} raised {type(error).__name__}: {' '.join(str(error).split())} {at} "
                f"({os.path.relpath(where.filename)}, line {where.lineno}); {stopped}") from error
        returned = values
        if not isinstance(values, (str, bytes, dict)):
            try:
                values = list(values)
            except TypeError:  # None (a function without a return), a number: one line naming what came back
                values = returned
        if isinstance(values, (str, bytes, dict)) or not isinstance(values, list):
            shown = repr(returned) if len(repr(returned)) <= 80 else repr(returned)[:77] + "..."
            raise RewardFunctionError(f"reward function {self.spec} returned a {type(returned).__name__}, {shown} "
                                      f"{at}: expected a list of numbers, one per completion")
        if len(values) != len(completions):
            raise RewardFunctionError(f"reward function {self.spec} returned {len(values)} values for "
                                      f"{len(completions)} completions {at}")
        try:
            if any(isinstance(v, (str, bytes, dict, list, tuple)) or v is None for v in values):
                raise TypeError  # float("1.0") would pass: a string is a mistake
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise RewardFunctionError(f"reward function {self.spec} returned {values[:3]}...: expected a number per "
                                      f"completion ({at})") from None
        bad = [v for v in values if not math.isfinite(v)]
        if bad:
            from .stages.common import NonFiniteError

            raise NonFiniteError(f"reward function {self.spec} returned {bad[0]} {at.replace('update', 'step')}: "
                                 f"{stopped}")
        huge = [v for v in values if abs(v) > REWARD_BOUND]
        if huge:
            raise RewardFunctionError(f"reward function {self.spec} returned {huge[0]:g} {at}: rewards beyond "
                                      f"+-{REWARD_BOUND:g} overflow the value and policy losses (a NaN/inf loss a few "
                                      f"steps later); scale it to a few units (e.g. -10 to 10); {stopped}")
        return values


def load_reward_functions(specs: list[str], weights: list[float] | None = None) -> list[tuple]:
    """The recipe's `reward_functions` (and their weights, default 1 each) as (name, CheckedRewardFunction,
    weight), their signatures checked, for pipeline.trainers.ppo.PPOTrainer and `for_trl`."""
    weights = list(weights) if weights else [1.0] * len(specs)
    if len(weights) != len(specs):
        raise ValueError(f"reward_function_weights has {len(weights)} values for {len(specs)} reward functions")
    functions = []
    for spec, weight in zip(specs, weights):
        function = load_function(spec)
        if problem := _signature_problem(function):
            raise RewardFunctionError(f"reward function {spec} {problem}")
        functions.append((spec.partition(":")[2], CheckedRewardFunction(spec, function), float(weight)))
    return functions


def trial_call(functions: list[tuple], tokenizer, prompts) -> None:
    """Call every reward function once before training, on 2 prompts of the dataset (as the text the policy
    sees) with an empty and a short answer: a function that fails is named before anything is trained."""
    if not functions:
        return
    rows = prompts.select(range(min(2, len(prompts))))
    texts = [tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
             if isinstance(row["prompt"], list) else row["prompt"] for row in rows]
    texts = (texts * 2)[:2]
    for _, function, _ in functions:
        function(prompts=texts, completions=["", "It was fine."], step="trial")


def for_trl(name: str, function, tokenizer):
    """One of our reward functions (a CheckedRewardFunction: text in, floats out) as a reward function for TRL's
    GRPO/RLOO trainers, which call it with conversational prompts and completions (lists of messages): the prompt
    is passed as the text the policy saw (the chat template's, as PPO passes it), the completion as the answer's
    text."""
    def reward(prompts, completions, **kwargs):
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                 if isinstance(p, list) else p for p in prompts]
        answers = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        state = kwargs.get("trainer_state")
        return function(prompts=texts, completions=answers, step=state.global_step + 1 if state is not None else "?")

    reward.__name__ = name
    return reward


class PtxBatches:
    """Endless shuffled batches of `block_size`-token blocks, cut from the dataset's texts joined with EOS
    (the causal-LM pretraining objective). Text rows are used as they are; prompt/completion and
    conversational rows through the tokenizer's chat template, rendered to ids once (a tokenizer that adds BOS
    itself gets one BOS per conversation). Reproducible: a generator seeded by `seed`."""

    def __init__(self, dataset, tokenizer, block_size: int, batch_size: int, seed: int, source: str):
        ids = []
        for row in dataset:
            ids.extend(self._ids(row, tokenizer) + [tokenizer.eos_token_id])
        n_blocks = len(ids) // block_size
        if n_blocks < batch_size:
            raise data.DataError(f"{source}: {len(ids)} tokens of ptx text make {n_blocks} blocks of {block_size} "
                                 f"tokens, fewer than one batch of {batch_size}")
        self.blocks = torch.tensor(ids[: n_blocks * block_size]).view(n_blocks, block_size)
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._order, self._next = torch.empty(0, dtype=torch.long), 0

    @staticmethod
    def _ids(row, tokenizer) -> list[int]:
        """A row's token ids: a conversation through the chat template straight to ids (never to text and then
        through the tokenizer's special tokens again), a text with the tokenizer's own special tokens."""
        if "text" in row:
            return tokenizer(row["text"])["input_ids"]
        if "messages" in row:
            return tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=False)
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, list):
            return tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=False)
        return tokenizer(prompt + completion)["input_ids"]

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
