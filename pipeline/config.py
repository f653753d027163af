"""Recipe parsing: TRL's `TrlParser` over (our script arguments, the trainer's own config, `ModelConfig`).

A recipe is a YAML file of those dataclasses' field names; `--field value` on the command line wins over
the YAML; an unknown key, in the YAML or on the command line, is an error that names it.
"""

import difflib
import enum
import os
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import yaml

from trl import DPOConfig, GRPOConfig, ModelConfig, RewardConfig, RLOOConfig, ScriptArguments, SFTConfig, TrlParser
from .trainers.ppo import PPOConfig

STAGES = ("pretrain", "sft", "reward", "ppo", "grpo", "rloo", "dpo")  # the order the runner runs them in
CHAIN = ("pretrain", "sft", "reward", "ppo")  # what `run` runs without --stages: the ChatGPT chain
STAGE3 = ("ppo", "grpo", "rloo", "dpo")  # alternatives to each other, each from the SFT policy (and reward model)


def upstream(stage: str) -> tuple[str, ...]:
    """The stages whose output `stage` reads: those before it, except the other stage-3 algorithms."""
    return tuple(s for s in STAGES[: STAGES.index(stage)] if s not in STAGE3)


@dataclass
class PipelineArguments(ScriptArguments):
    """TRL's ScriptArguments (dataset_name, dataset_config, splits) plus the pipeline's own fields."""

    embedded_seed: int = field(default=0, metadata={"help": "Seed of the embedded task's generator (embedded:<kind>)."})
    invalid_rows: str = field(
        default="error", metadata={"help": "A row that fails validation: 'error' stops, 'drop' drops and counts it.",
                                   "choices": ["error", "drop"]})


@dataclass
class PretrainArguments(PipelineArguments):
    """The byte-level BPE tokenizer and the GPT2Config of a model trained from scratch."""

    vocab_size: int = field(default=1024, metadata={"help": "BPE vocabulary size, special tokens included."})
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    n_positions: int = 128
    dropout: float = field(default=0.0, metadata={"help": "resid/embd/attn dropout of the new GPT2Config."})


@dataclass
class SFTArguments(PipelineArguments):
    """What to do with demonstrations longer than the trainer's `max_length`, and how packed batches are laid out."""

    overlong_rows: str = field(
        default="truncate", metadata={"help": "A row longer than max_length tokens: 'truncate' cuts it to max_length "
                                      "(TRL's default), 'drop' drops it; either way they are counted and reported.",
                                      "choices": ["truncate", "drop"]})
    packed_batch_layout: str = field(
        default="auto", metadata={
            "help": "With packing_strategy bfd: 'rows' keeps each packed row of max_length as a row of the batch, the "
                    "examples in it kept apart by their position_ids (a block-diagonal causal mask per row: correct "
                    "and fast with sdpa/eager); 'flat' is TRL's padding-free layout, the whole batch as one row "
                    "(for flash-attention kernels; with sdpa/eager its mask grows with the square of the batch's "
                    "tokens); 'auto': 'flat' with a flash-attention implementation, else 'rows'.",
            "choices": ["auto", "rows", "flat"]})


@dataclass
class PolicyEvalArguments(PipelineArguments):
    """The evaluation after a stage-3 algorithm: the trained policy against the SFT policy on held-out prompts."""

    eval_samples_per_prompt: int = field(default=4, metadata={"help": "Samples per held-out prompt and policy."})
    eval_max_prompts: int | None = field(default=None, metadata={"help": "Cap on held-out prompts evaluated."})


@dataclass
class OnlineArguments(PolicyEvalArguments):
    """What the online algorithms (PPO, GRPO, RLOO) are rewarded by: the learned reward model, Python reward
    functions, or both, weighted."""

    max_prompt_length: int = field(default=128, metadata={"help": "Longer prompts are dropped (and counted)."})
    reward_functions: list[str] = field(default_factory=list, metadata={
        "help": "Python callables 'module:function', called as function(prompts=[str], completions=[str]) -> "
                "[float], added to the reward model's score (e.g. pipeline.embedded:gold_reward)."})
    reward_function_weights: list[float] = field(default_factory=list, metadata={
        "help": "One weight per reward function (default 1 each)."})
    reward_model_weight: float = field(default=1.0, metadata={
        "help": "Weight of the reward model's score; 0 leaves the reward to the functions alone."})


@dataclass
class PPOArguments(OnlineArguments):
    """Reward functions, KL control and PPO-ptx (see pipeline/rl.py), and the evaluation after PPO."""

    kl_control: str = field(default="fixed", metadata={
        "help": "'fixed': kl_coef throughout; 'adaptive': kl_coef moves toward keeping the KL at kl_target "
                "(Ziegler et al. 2019).", "choices": ["fixed", "adaptive"]})
    kl_target: float = field(default=6.0, metadata={"help": "Adaptive KL: the target KL (nats per response)."})
    kl_horizon: int = field(default=10000, metadata={"help": "Adaptive KL: the horizon, in episodes."})
    ptx_coef: float = field(default=0.0, metadata={
        "help": "PPO-ptx: weight of a causal-LM loss on ptx_dataset_name mixed into every policy update (0: off)."})
    ptx_dataset_name: str | None = field(default=None, metadata={
        "help": "PPO-ptx: pretraining or SFT data (any name dataset_name accepts, e.g. embedded:corpus)."})
    ptx_block_size: int = field(default=128, metadata={"help": "PPO-ptx: tokens per ptx sequence."})


@dataclass
class GroupArguments(OnlineArguments):
    """GRPO and RLOO (TRL's trainers): the policy is `model_name_or_path` (the SFT policy); the reward model is
    `reward_model_path`, given to TRL as a `reward_funcs` entry beside the reward functions."""

    reward_model_path: str | None = field(default=None, metadata={
        "help": "The learned reward model (a sequence classifier); needed unless reward_model_weight is 0."})


@dataclass
class DPOArguments(PolicyEvalArguments):
    """DPO (TRL's DPOTrainer) on preference pairs from the SFT policy (`model_name_or_path`, also the
    reference). The reward model is not trained against; it only scores the evaluation (rm_* results)."""

    reward_model_path: str | None = field(default=None, metadata={
        "help": "A reward model to score the evaluation's answers with (optional: without it, no rm_* results)."})
    eval_dataset_name: str | None = field(default=None, metadata={
        "help": "Prompts for the evaluation against the SFT policy (default: the prompts of dataset_name's test "
                "split), e.g. embedded:prompt, the prompts the online algorithms are evaluated on."})
    eval_max_new_tokens: int = field(default=48, metadata={"help": "Evaluation: tokens per answer at most."})
    eval_temperature: float = field(default=0.7, metadata={"help": "Evaluation: sampling temperature."})


def recipe_file(recipe_dir, stage: str, variant: str | None = None) -> Path:
    """A stage's recipe in a folder: <stage>.yaml, or <stage>-<variant>.yaml (e.g. sft-lora.yaml)."""
    return Path(recipe_dir) / (f"{stage}-{variant}.yaml" if variant else f"{stage}.yaml")


CLASSES = {
    "pretrain": (PretrainArguments, SFTConfig),
    "sft": (SFTArguments, SFTConfig),
    "reward": (PipelineArguments, RewardConfig),
    "ppo": (PPOArguments, PPOConfig),
    "grpo": (GroupArguments, GRPOConfig),
    "rloo": (GroupArguments, RLOOConfig),
    "dpo": (DPOArguments, DPOConfig),
}


class RecipeParser(TrlParser):
    """TrlParser whose errors (a flag with a value of the wrong type, a missing value) are one-line ValueErrors
    instead of argparse's usage text and exit."""

    def error(self, message):
        raise ValueError(message)


def parser(stage: str) -> TrlParser:
    if stage not in CLASSES:
        raise ValueError(f"unknown stage {stage!r}; stages are: {', '.join(STAGES)}")
    script_class, config_class = CLASSES[stage]
    return RecipeParser((script_class, config_class, ModelConfig))


def _describe(annotation) -> str:
    """A type annotation in words, for error messages."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        words = []
        for arg in args:
            if _describe(arg) not in words:
                words.append(_describe(arg))
        return " or ".join(words)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(repr(e.value) for e in annotation)
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
            list: "a list", type(None): "null"}.get(origin or annotation, getattr(annotation, "__name__", "a value"))


def _fits(value, annotation) -> bool:
    """Whether a YAML value can stand for a field of this type (lenient for types it does not know)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is typing.Any or isinstance(annotation, typing.TypeVar):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if annotation is type(None):
        return value is None
    if origin is typing.Literal:
        return value in args
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return isinstance(value, annotation) or value in [e.value for e in annotation]
    if annotation is bool:
        return isinstance(value, bool) or isinstance(value, str) and value.lower() in (
            "yes", "no", "true", "false", "t", "f", "y", "n", "1", "0")
    if annotation in (int, float):
        if isinstance(value, str):  # argparse converts strings (PyYAML reads 1e-4, without a dot, as one)
            try:
                value = annotation(value)
            except ValueError:
                return False
        return isinstance(value, (int, float) if annotation is float else int) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple) or annotation in (list, tuple):
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value) if args else isinstance(value, list)
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    return True


def _show(value) -> str:
    return {True: "true", False: "false", None: "null"}.get(value, repr(value)) if isinstance(
        value, (bool, type(None))) else repr(value)


def check_types(stage_parser: TrlParser, recipe: dict, path: str) -> None:
    """Fail on a recipe value of the wrong type (`learning_rate: fast`, `num_train_epochs: [1]`) or outside a
    field's choices, naming the key and what it expects. argparse only converts string values, so without
    this a list or a float would reach the trainer as is."""
    annotations, defaults = {}, {}
    for cls in stage_parser.dataclass_types:
        try:
            annotations.update(typing.get_type_hints(cls))
        except Exception:  # a type that cannot be resolved: that class is not checked
            continue
        defaults.update({f.name: f.default for f in fields(cls) if f.default is not MISSING})
    choices = {action.dest: action.choices for action in stage_parser._actions if action.choices}
    for key, value in recipe.items():
        if key not in annotations:
            continue
        annotation = annotations[key]
        if value is None and defaults.get(key, MISSING) is None:
            continue
        outside_choices = key in choices and value is not None and (
            isinstance(value, (bool, dict, list)) or str(value) not in choices[key])
        if _fits(value, annotation) and not outside_choices:
            continue
        expected = ("one of " + ", ".join(repr(c) for c in choices[key]) if key in choices
                    else _describe(annotation))
        hint = " (YAML reads unquoted yes/no/on/off as booleans: quote it)" if isinstance(value, bool) else ""
        raise ValueError(f"recipe '{path}': '{key}' must be {expected}, got {_show(value)}{hint}")


def check_recipe(stage_parser: TrlParser, path: str) -> None:
    """Fail on a missing recipe or an unknown key with the key's name and the closest known field."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"recipe '{path}' does not exist")
    with open(path) as f:
        recipe = yaml.safe_load(f)
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe '{path}' must be a YAML mapping of field: value")
    known = {action.dest for action in stage_parser._actions} | {"env"}
    unknown = [key for key in recipe if key not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise ValueError(f"recipe '{path}': unknown key{'s' if len(unknown) > 1 else ''} {', '.join(hints)}")
    check_types(stage_parser, recipe, path)


def parse(stage: str, argv: list[str] | None = None):
    """(script_args, training_args, model_args) for `stage` from `--config recipe.yaml` and flags."""
    stage_parser = parser(stage)
    if argv is not None and "--config" in argv and argv.index("--config") + 1 < len(argv):
        check_recipe(stage_parser, str(argv[argv.index("--config") + 1]))
    return stage_parser.parse_args_and_config(argv)
