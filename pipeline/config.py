"""Recipe parsing: TRL's `TrlParser` over (our script arguments, the trainer's own config, `ModelConfig`).

A recipe is a YAML file of those dataclasses' field names; `--field value` on the command line wins over
the YAML; an unknown key, in the YAML or on the command line, is an error that names it.
"""

from dataclasses import dataclass, field

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


def parse(stage: str, argv: list[str] | None = None):
    """(script_args, training_args, model_args) for `stage` from `--config recipe.yaml` and flags."""
    return parser(stage).parse_args_and_config(argv)
