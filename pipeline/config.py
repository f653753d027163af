"""Recipe parsing: TRL's `TrlParser` over (our script arguments, the trainer's own config, `ModelConfig`).

A recipe is a YAML file of those dataclasses' field names; `--field value` on the command line wins over
the YAML; an unknown key, in the YAML or on the command line, is an error that names it.
"""

import difflib
import os
from dataclasses import dataclass, field

import yaml

from trl import ModelConfig, RewardConfig, ScriptArguments, SFTConfig, TrlParser
from trl.experimental.ppo import PPOConfig

STAGES = ("pretrain", "sft", "reward", "ppo")


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
class PPOArguments(PipelineArguments):
    """Evaluation after PPO: the policy against the SFT policy on held-out prompts."""

    max_prompt_length: int = field(default=128, metadata={"help": "Longer prompts are dropped (and counted)."})
    eval_samples_per_prompt: int = field(default=4, metadata={"help": "Samples per held-out prompt and policy."})
    eval_max_prompts: int | None = field(default=None, metadata={"help": "Cap on held-out prompts evaluated."})


CLASSES = {
    "pretrain": (PretrainArguments, SFTConfig),
    "sft": (PipelineArguments, SFTConfig),
    "reward": (PipelineArguments, RewardConfig),
    "ppo": (PPOArguments, PPOConfig),
}


def parser(stage: str) -> TrlParser:
    if stage not in CLASSES:
        raise ValueError(f"unknown stage {stage!r}; stages are: {', '.join(STAGES)}")
    script_class, config_class = CLASSES[stage]
    return TrlParser((script_class, config_class, ModelConfig))


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


def parse(stage: str, argv: list[str] | None = None):
    """(script_args, training_args, model_args) for `stage` from `--config recipe.yaml` and flags."""
    stage_parser = parser(stage)
    if argv is not None and "--config" in argv and argv.index("--config") + 1 < len(argv):
        check_recipe(stage_parser, str(argv[argv.index("--config") + 1]))
    return stage_parser.parse_args_and_config(argv)
