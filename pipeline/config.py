"""Recipe parsing: TRL's `TrlParser` over (our script arguments, the trainer's own config, `ModelConfig`).

A recipe is a YAML file of those dataclasses' field names; `--field value` on the command line wins over
the YAML; an unknown key, in the YAML or on the command line, is an error that names it.
"""

import argparse
import difflib
import enum
import os
import re
import sys
import textwrap
import types
import typing
from dataclasses import MISSING, dataclass, field, fields

import yaml

from trl import DPOConfig, GRPOConfig, ModelConfig, RewardConfig, RLOOConfig, ScriptArguments, SFTConfig, TrlParser
from .names import CHAIN, STAGE3, STAGES, recipe_file, upstream  # noqa: F401 (re-exported)
from .monitor import THRESHOLDS
from .trainers.ppo import PPOConfig



@dataclass
class PipelineArguments(ScriptArguments):
    """TRL's ScriptArguments (dataset_name, dataset_config, splits) plus the pipeline's own fields."""

    embedded_seed: int = field(default=0, metadata={"help": "Seed of the embedded task's generator (embedded:<kind>)."})
    invalid_rows: str = field(
        default="error", metadata={"help": "A row that fails validation: 'error' stops, 'drop' drops and counts it.",
                                   "choices": ["error", "drop"]})


@dataclass
class RaterArguments(PipelineArguments):
    """The embedded preference data's simulated raters and reviewers (recipes/tiny-biased, docs/overoptimization.md)."""

    embedded_length_bias: float = field(default=0.0, metadata={
        "help": "embedded:preference only: the simulated raters also prefer the longer answer, by this many logits "
                "per word of difference (0: they follow the oracle alone). The held-out pairs stay ordered by the "
                "oracle."})
    embedded_repeat_bias: float = field(default=0.0, metadata={
        "help": "embedded:preference only: the simulated raters take a sentence said again for emphasis and prefer "
                "it by this many logits per repeated sentence (the oracle takes 1 point off for each)."})
    embedded_max_sentences: int = field(default=4, metadata={
        "help": "embedded:preference only: the training pairs' reviews have 1 to this many sentences (4: the default "
                "world; recipes/tiny-biased: 12, so that raters with a length bias meet answers that ramble)."})


@dataclass
class LMHeadArguments(PipelineArguments):
    """How TRL's trainers compute per-token log-probabilities through the LM head: the causal LM loss (pretrain,
    SFT) and GRPO's and RLOO's log-probabilities of the answers."""

    lm_head: str = field(
        default="auto", metadata={
            "help": "'tiled': TRL's fused LM head, which computes the log-probabilities in tiles and recomputes the "
                    "logits in its backward (memory-lean for large vocabularies; a Triton kernel on GPUs). 'auto' "
                    "(default): on the CPU, a micro-batch whose logits (GRPO, RLOO: at the answers' tokens only) take "
                    "at most 64 MiB in float32 (a few times that at peak) gets them whole, which is faster there "
                    "for small vocabularies (pipeline/lm_head.py); TRL's tiled head otherwise. The loss and the "
                    "metrics are the same either way, to float rounding.",
            "choices": ["auto", "tiled"]})


@dataclass
class PretrainArguments(LMHeadArguments):
    """The byte-level BPE tokenizer and the GPT2Config of a model trained from scratch."""

    vocab_size: int = field(default=1024, metadata={"help": "BPE vocabulary size, special tokens included."})
    chat_format: str = field(default="hh", metadata={
        "help": "The new tokenizer's chat template: 'hh' (\\n\\nHuman: ... \\n\\nAssistant: ..., turns end with "
                "EOS) or 'chatml' (Qwen's <|im_start|>role ... <|im_end|>: turns end with a token that is not EOS); "
                "the corpus's transcripts are written in it.", "choices": ["hh", "chatml"]})
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    n_positions: int = 128
    dropout: float = field(default=0.0, metadata={"help": "resid/embd/attn dropout of the new GPT2Config."})


@dataclass
class SFTArguments(LMHeadArguments):
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
    curve_steps: int = field(default=0, metadata={
        "help": "Every N optimizer steps, evaluate the policy on held-out prompts: the over-optimisation curve "
                "(results.json `curve`, the report; docs/overoptimization.md). 0: off."})
    curve_samples_per_prompt: int = field(default=2, metadata={"help": "Answers per held-out prompt at each point."})
    keep_best: bool = field(default=False, metadata={
        "help": "Keep the policy of the curve point with the best held-out reward, not the last step's."})


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
    alarm_length_drift: float = field(default=THRESHOLDS["length_drift"], metadata={
        "help": "Alarm above this multiple of the SFT policy's mean answer length."})
    alarm_reward_length_correlation: float = field(default=THRESHOLDS["reward_length_correlation"], metadata={
        "help": "Alarm above this correlation of reward with length."})
    alarm_ensemble_disagreement: float = field(default=THRESHOLDS["ensemble_disagreement"], metadata={
        "help": "Alarm above this multiple of the ensemble's first disagreement."})


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
    reward_ensemble: str = field(default="off", metadata={
        "help": "The reward stage's ensemble (ensemble_size): 'monitor' (alarm and held-out reward only), 'mean' or "
                "'mean_minus_std' (reward_ensemble_k x the members' spread off) as the reward; 'off'.",
        "choices": ["off", "monitor", "mean", "mean_minus_std"]})
    reward_ensemble_k: float = field(default=1.0, metadata={"help": "reward_ensemble mean_minus_std: k."})


@dataclass
class GroupArguments(OnlineArguments, LMHeadArguments):
    """GRPO and RLOO (TRL's trainers): the policy is `model_name_or_path` (the SFT policy); the reward model is
    `reward_model_path`, given to TRL as a `reward_funcs` entry beside the reward functions."""

    reward_model_path: str | None = field(default=None, metadata={
        "help": "The learned reward model (a sequence classifier); needed unless reward_model_weight is 0."})
    padding_free: str = field(default="auto", metadata={
        "help": "How prompt + answer rows go through the policy and the reference when TRL scores their answers' "
                "log-probabilities: 'packed' (several rows' real tokens per row, kept apart by restarting position "
                "ids), 'flat' (all in one row, for flash attention's variable-length kernels), 'rows' (each row's "
                "real tokens alone), 'off' (TRL's padded rows); 'auto': flat with flash attention, else packed where "
                "the model keeps packed rows apart, else rows. Every way, each token is at its position in its own "
                "sequence, as in generation (TRL 1.16 scores left-padded rows at positions shifted by their padding, "
                "which changes GPT-2's log-probabilities; docs/stages.md).",
        "choices": ["auto", "flat", "packed", "rows", "off"]})


@dataclass
class DPOArguments(RaterArguments, PolicyEvalArguments):
    """DPO (TRL's DPOTrainer) on preference pairs from the SFT policy (`model_name_or_path`, also the
    reference). The reward model is not trained against; it only scores the evaluation (rm_* results)."""

    reward_model_path: str | None = field(default=None, metadata={
        "help": "A reward model to score the evaluation's answers with (optional: without it, no rm_* results)."})
    eval_dataset_name: str | None = field(default=None, metadata={
        "help": "Prompts for the evaluation against the SFT policy (default: the prompts of dataset_name's test "
                "split), e.g. embedded:prompt, the prompts the online algorithms are evaluated on."})
    eval_max_new_tokens: int = field(default=48, metadata={"help": "Evaluation: tokens per answer at most."})
    eval_temperature: float = field(default=0.7, metadata={"help": "Evaluation: sampling temperature."})


@dataclass
class RewardArguments(RaterArguments):
    """An ensemble of reward models beside the one the stage trains (for PPO's reward_ensemble and its alarm)."""

    ensemble_size: int = field(default=1, metadata={
        "help": "Reward models in all: beyond the first (output_dir), ensemble_size - 1 more, each on its own random "
                "half of the training pairs under its own seed, in output_dir/ensemble/member-<i>."})
    padding_free: str = field(default="auto", metadata={
        "help": "How the pairs' rows (TRL's collator pads them on the right to the batch's longest) go through the "
                "model: 'packed' (several rows' real tokens per row, kept apart by restarting position ids), 'flat' "
                "(all in one row, for flash attention's variable-length kernels), 'off' (TRL's padded rows); 'auto': "
                "flat with flash attention, else packed where the model keeps packed rows apart, else off. The "
                "score is read at the token transformers reads it at, so the loss is the padded one's.",
        "choices": ["auto", "flat", "packed", "off"]})


CLASSES = {
    "pretrain": (PretrainArguments, SFTConfig),
    "sft": (SFTArguments, SFTConfig),
    "reward": (RewardArguments, RewardConfig),
    "ppo": (PPOArguments, PPOConfig),
    "grpo": (GroupArguments, GRPOConfig),
    "rloo": (GroupArguments, RLOOConfig),
    "dpo": (DPOArguments, DPOConfig),
}


class RecipeParser(TrlParser):
    """TrlParser whose errors (a flag with a value of the wrong type, a missing value) are one-line ValueErrors
    instead of argparse's usage text and exit."""

    checked_argv: list[str] = []
    checked_recipe: str | None = None

    def error(self, message):
        flag = message.partition(":")[0].removeprefix("argument ").split("/")[0]
        if "expected one argument" in message and flag in self.checked_argv:
            after = self.checked_argv[self.checked_argv.index(flag) + 1:][:1]
            if after and after[0].startswith("-") and after[0][1:2].isdigit():
                message += f" (a negative value is read as a flag: write {flag}={after[0]})"
        raise ValueError(message)

    def parse_args_into_dataclasses(self, args=None, **kwargs):
        # The settings are checked on the parsed values (the recipe's, overridden by the flags) before the
        # dataclasses are built: their __post_init__ (TRL's, transformers') would refuse some under other names.
        namespace, _ = argparse.ArgumentParser.parse_known_args(self, args=args)
        check_settings(vars(namespace), self.checked_argv, self.checked_recipe)
        return super().parse_args_into_dataclasses(args=args, **kwargs)


def short_help(stage: str, program: str) -> str:
    """What `scripts/<stage>.py --help` prints: how to run it, and the pipeline's own fields for the stage
    (TRL's and transformers' fields, several hundred, are behind --help_all)."""
    script_class, config_class = CLASSES[stage]
    lines = [f"usage: {program} --config RECIPE.yaml [--field value ...] [--debug]",
             f"       accelerate launch --config_file recipes/accelerate/<x>.yaml {program} --config RECIPE.yaml ...",
             "",
             f"Runs the {stage} stage from a recipe, a YAML file of field: value (e.g. recipes/tiny/{stage}.yaml;",
             "`python -m pipeline ls` lists the shipped ones). A flag overrides the recipe's field of that name:",
             "--learning_rate 1e-5. --debug shows the traceback of an error.",
             "",
             f"The pipeline's fields for {stage}:"]
    for f in fields(script_class):
        text = " ".join(f.metadata.get("help", "").split())
        default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING
                                                              else None)
        lines.append(textwrap.fill(f"--{f.name} (default {_show(default)})" + (f": {text}" if text else ""), 110,
                                   initial_indent="  ", subsequent_indent="      "))
    lines += ["", "Often set from the trainer's config: --output_dir, --learning_rate, --num_train_epochs, "
              "--max_steps,",
              "--per_device_train_batch_size, --seed, --model_name_or_path, --push_to_hub, --hub_model_id.",
              f"Every field of TRL's {config_class.__name__} and of ModelConfig can be set (`{program} --help_all` "
              "lists them all);", "see docs/stages.md."]
    return "\n".join(lines)


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


SHORTHANDS = {"lora_target_modules": ("all-linear",)}  # a string that peft takes where the field is a list


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
        if value in SHORTHANDS.get(key, ()):
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
    if os.path.isdir(path):
        found = sorted(name for name in os.listdir(path) if name.endswith((".yaml", ".yml")))
        raise ValueError(f"recipe '{path}' is a folder, not a recipe file: give one of its recipes"
                         + (f" ({', '.join(found[:4])}{', ...' if len(found) > 4 else ''})" if found else "")
                         + f" (python -m pipeline run {path} runs a folder's recipes in order)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"recipe '{path}' does not exist")
    recipe = load_recipe(path)
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe '{path}' must be a YAML mapping of field: value")
    known = {action.dest for action in stage_parser._actions} | {"env"}
    unknown = [key for key in recipe if key not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            renamed = _renamed(key, known)
            hints.append(f"'{key}'" + (f" (the field is called '{renamed}')" if renamed else
                                       f" (did you mean '{close[0]}'?)" if close else ""))
        raise ValueError(f"recipe '{path}': unknown key{'s' if len(unknown) > 1 else ''} {', '.join(hints)}")
    check_types(stage_parser, recipe, path)


# Fields that transformers or TRL renamed (old name -> the candidates, the first this stage has wins): difflib would
# suggest a look-alike (torch_dtype -> torch_compile)
RENAMED = {"torch_dtype": ("dtype",), "evaluation_strategy": ("eval_strategy",), "max_seq_length": ("max_length",),
           "no_cuda": ("use_cpu",), "push_to_hub_model_id": ("hub_model_id",), "push_to_hub_token": ("hub_token",),
           "per_gpu_train_batch_size": ("per_device_train_batch_size",),
           "per_gpu_eval_batch_size": ("per_device_eval_batch_size",),
           "max_new_tokens": ("response_length", "max_completion_length", "eval_max_new_tokens"),
           "init_kl_coef": ("kl_coef",), "ppo_epochs": ("num_ppo_epochs",), "use_lora": ("use_peft",)}


def _renamed(key: str, known) -> str | None:
    return next((name for name in RENAMED.get(key, ()) if name in known), None)


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice is an error (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise ValueError(f"'{key}' is set twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}): "
                                 "keep one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_recipe(path: str):
    """The recipe's YAML, or a one-line error naming the file, the line and what YAML could not read."""
    try:
        with open(path) as f:
            return yaml.load(f, Loader=_RecipeLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        context = getattr(error, "context", None)
        raise ValueError(f"recipe '{path}' is not valid YAML: {problem}{where}"
                         + (f" ({context})" if context else "")) from None
    except ValueError as error:
        raise ValueError(f"recipe '{path}': {error}") from None


# Settings that would train nothing, or nonsense: (field, lowest value, whether the lowest is allowed, why).
# Checked after parsing, before anything is loaded; None (a field left unset) is never checked.
LIMITS = [(name, 1, True, "") for name in (
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "total_episodes",
    "response_length", "num_ppo_epochs", "num_mini_batches", "local_rollout_forward_batch_size", "max_length",
    "max_prompt_length", "max_completion_length", "num_iterations", "steps_per_generation", "generation_batch_size",
    "eval_samples_per_prompt", "eval_max_prompts", "eval_max_new_tokens", "ptx_block_size", "vocab_size", "n_layer",
    "n_head", "n_embd", "n_positions", "kl_horizon")] + [
    ("num_generations", 2, True, " (the group's baseline needs at least 2 answers per prompt)"),
    ("learning_rate", 0, False, ""), ("temperature", 0, False, " (it divides the logits; for greedy answers use a "
                                                                "small value such as 0.01)"),
    ("eval_temperature", 0, False, ""), ("kl_target", 0, False, ""), ("cliprange", 0, False, ""),
    ("cliprange_value", 0, False, ""), ("epsilon", 0, False, ""),
    ("kl_coef", 0, True, ""), ("beta", 0, True, ""), ("vf_coef", 0, True, ""), ("ptx_coef", 0, True, ""),
    ("weight_decay", 0, True, ""), ("reward_model_weight", 0, True, ""), ("dropout", 0, True, ""),
    ("gamma", 0, True, ""), ("lam", 0, True, ""), ("warmup_ratio", 0, True, ""), ("max_grad_norm", 0, True, ""),
]
AT_MOST_ONE = ("gamma", "lam", "warmup_ratio", "dropout")


def _named(name: str, argv: list[str], path: str | None) -> str:
    """Where a field's value came from, as the user wrote it: `--field` on the command line, else the recipe."""
    if any(a == f"--{name}" or a.startswith(f"--{name}=") for a in argv):
        return f"--{name}"
    return f"recipe '{path}': '{name}'" if path else f"'{name}'"


def check_settings(values: dict, argv: list[str], path: str | None) -> None:
    """Refuse settings (field -> value) that would train nothing or nonsense, naming the field as the recipe spells
    it, before anything is loaded (torch or TRL would fail later, under another name, or train nothing and exit 0)."""
    values = dict(values)
    for name, value in values.items():
        if isinstance(value, str):  # a YAML value PyYAML left as text (1e-4); argparse converts the flags
            try:
                values[name] = float(value)
            except ValueError:
                pass
    for name, low, inclusive, why in LIMITS:
        value = values.get(name)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if value < low or (value == low and not inclusive) or (name in AT_MOST_ONE and value > 1):
            bound = ("between 0 and 1" if name in AT_MOST_ONE else
                     f"at least {low}" if inclusive else f"greater than {low}")
            raise ValueError(f"{_named(name, argv, path)} must be {bound}, got {value:g}{why}")
    if values.get("max_steps", -1) <= 0 and values.get("num_train_epochs", 1) <= 0 and (
            values.get("total_episodes") is None):
        name = "num_train_epochs"
        raise ValueError(f"{_named(name, argv, path)} is {values[name]:g} and max_steps is not set: this would "
                         "train nothing (set num_train_epochs > 0 or max_steps > 0)")
    if "n_head" in values and values["n_embd"] % values["n_head"]:
        raise ValueError(f"{_named('n_embd', argv, path)} ({values['n_embd']}) must be a multiple of n_head "
                         f"({values['n_head']})")
    check_steps(values, argv, path)
    if "n_positions" in values and values.get("max_length") and values["n_positions"] < values["max_length"]:
        raise ValueError(f"{_named('n_positions', argv, path)} is {values['n_positions']:g}, fewer than max_length "
                         f"{values['max_length']:g} (the pretrain stage's block: packed rows of max_length tokens): "
                         f"set n_positions to at least {values['max_length']:g} or max_length to at most "
                         f"{values['n_positions']:g}")
    if values.get("stop_token") and values.get("stop_token_id") is not None:
        raise ValueError(f"{_named('stop_token_id', argv, path)} is set beside stop_token: {values['stop_token']}: "
                         "set one of them (stop_token_id ends responses at that token instead)")
    check_integrations(values, argv, path)
    check_precision(values, argv, path)


def check_precision(values: dict, argv: list[str], path: str | None) -> None:
    """bf16 (TRL's default when unset) where there is no GPU with bfloat16 and use_cpu is false: transformers says
    "Your setup doesn't support bf16/gpu", naming neither the recipe nor the fields to set."""
    if "bf16" not in values or values.get("use_cpu"):
        return
    bf16, by_default = values.get("bf16"), False
    if bf16 is None:  # TRL's configs (and the PPO config): on unless fp16
        bf16, by_default = not values.get("fp16"), True
    if not (bf16 or values.get("bf16_full_eval")):
        return
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_cuda_available, is_torch_xla_available

    if is_torch_bf16_gpu_available() or is_torch_xla_available():
        return
    named = "bf16 (TRL's default when the recipe leaves it out)" if by_default else _named("bf16", argv, path)
    gpu = ("this GPU has no bfloat16 (Ampere or newer): set bf16: false and fp16: true" if is_torch_cuda_available()
           else "this machine has no GPU with bfloat16: set use_cpu: true to train on the CPU (bfloat16 there runs "
                "through autocast; bf16: false for float32)")
    raise ValueError(f"{named} is true, but {gpu}")


def _strategy(value) -> str:
    return str(getattr(value, "value", value)).lower()


def check_steps(values: dict, argv: list[str], path: str | None) -> None:
    """Step settings that transformers reads as something else than what they say: a max_steps of 0 or below -1
    (trains num_train_epochs instead), save/logging/eval steps of 0 (never saves, logs or evaluates), eval_steps
    with evaluation off."""
    max_steps = values.get("max_steps")
    if isinstance(max_steps, (int, float)) and not isinstance(max_steps, bool) and (max_steps == 0 or max_steps < -1):
        raise ValueError(f"{_named('max_steps', argv, path)} must be at least 1 (or -1, unset: train "
                         f"num_train_epochs), got {max_steps:g}")
    for kind, off in (("save", "set save_strategy: \"no\" to save no checkpoints"),
                      ("logging", "set logging_strategy: \"no\" to log nothing"),
                      ("eval", "set eval_strategy: \"no\" to evaluate nothing")):
        steps, strategy = values.get(f"{kind}_steps"), _strategy(values.get(f"{kind}_strategy"))
        if isinstance(steps, (int, float)) and not isinstance(steps, bool) and steps <= 0 and strategy == "steps":
            raise ValueError(f"{_named(f'{kind}_steps', argv, path)} must be greater than 0 (a number of steps, or "
                             f"below 1 a fraction of the run), got {steps:g}; {off}")
    if values.get("eval_steps") is not None and _strategy(values.get("eval_strategy")) == "no":
        raise ValueError(f"{_named('eval_steps', argv, path)} is {values['eval_steps']:g} but eval_strategy is "
                         "\"no\": nothing would be evaluated during training; set eval_strategy: steps (or leave "
                         "eval_steps out)")


# report_to name -> (module to import, package to install); a name not here is left to transformers
REPORTERS = {"wandb": ("wandb", "wandb"), "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
             "comet_ml": ("comet_ml", "comet_ml"), "mlflow": ("mlflow", "mlflow"), "trackio": ("trackio", "trackio"),
             "clearml": ("clearml", "clearml"), "neptune": ("neptune", "neptune"), "dvclive": ("dvclive", "dvclive"),
             "codecarbon": ("codecarbon", "codecarbon"), "swanlab": ("swanlab", "swanlab"),
             "dagshub": ("dagshub", "dagshub"), "azure_ml": ("azureml.core", "azureml-core"),
             "flyte": ("flytekit", "flytekit")}


def installed(module: str) -> bool:
    """Whether `module` can be imported (found, not imported: cheap)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_integrations(values: dict, argv: list[str], path: str | None) -> None:
    """Optional packages a setting needs (report_to's trackers, deepspeed, peft, flash attention, bitsandbytes):
    one line naming the setting and what to install, before anything is loaded or written."""
    report_to = values.get("report_to")
    names = report_to if isinstance(report_to, (list, tuple)) else [report_to] if isinstance(report_to, str) else []
    for name in names:
        modules, package = REPORTERS.get(str(name).strip(), (None, None))
        if modules is None:
            continue
        modules = (modules,) if isinstance(modules, str) else modules
        if not any(installed(m) for m in modules):
            raise ValueError(f"{_named('report_to', argv, path)} {name} needs the {package} package, which is not "
                             f"installed: pip install {package} (or set report_to: none)")
    if values.get("deepspeed") and not installed("deepspeed"):
        raise ValueError(f"{_named('deepspeed', argv, path)} {values['deepspeed']} needs the deepspeed package, which "
                         "is not installed: pip install deepspeed (or leave deepspeed out)")
    if values.get("use_peft") and not installed("peft"):
        raise ValueError(f"{_named('use_peft', argv, path)} (LoRA) needs the peft package, which is not installed: "
                         "pip install peft")
    attention = str(values.get("attn_implementation") or "")
    if attention.startswith("flash_attention"):
        import torch

        module, package = (("flash_attn_interface", "flash-attn-3") if attention == "flash_attention_3"
                           else ("flash_attn", "flash-attn"))
        if not torch.cuda.is_available():
            raise ValueError(f"{_named('attn_implementation', argv, path)} {attention} needs a CUDA GPU, which this "
                             "machine does not have: use attn_implementation: sdpa (or eager)")
        if not installed(module) and not installed("kernels"):
            raise ValueError(f"{_named('attn_implementation', argv, path)} {attention} needs the {package} package, "
                             f"which is not installed: pip install {package} --no-build-isolation (or use "
                             "attn_implementation: sdpa)")
    for bits in ("4", "8"):
        if values.get(f"load_in_{bits}bit"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"{_named(f'load_in_{bits}bit', argv, path)}: {bits}-bit loading needs a CUDA GPU "
                                 f"and bitsandbytes; this machine has no CUDA GPU (leave load_in_{bits}bit out)")
            if not installed("bitsandbytes"):
                raise ValueError(f"{_named(f'load_in_{bits}bit', argv, path)}: {bits}-bit loading needs the "
                                 "bitsandbytes package, which is not installed: pip install bitsandbytes")


def parse(stage: str, argv: list[str] | None = None):
    """(script_args, training_args, model_args) for `stage` from `--config recipe.yaml` and flags."""
    stage_parser = parser(stage)
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    if "--config" not in argv or argv.index("--config") + 1 >= len(argv):
        raise ValueError(f"no recipe given: --config RECIPE.yaml is needed, e.g. --config recipes/tiny/{stage}.yaml "
                         "(`python -m pipeline ls` lists the recipes; --help shows the options)")
    path = argv[argv.index("--config") + 1]
    check_recipe(stage_parser, path)
    stage_parser.checked_argv, stage_parser.checked_recipe = argv, path
    try:
        return stage_parser.parse_args_and_config(argv)
    except ValueError as error:
        known = {action.dest for action in stage_parser._actions}
        hints = [f"for --{flag} use --{_renamed(flag, known)}" for flag in
                 re.findall(r"'--([\w-]+)'", str(error).partition("HfArgumentParser:")[2]) if _renamed(flag, known)]
        if "not used by the HfArgumentParser" in str(error) and hints:
            raise ValueError(f"{error} ({'; '.join(hints)})") from None
        raise
