"""The stage names and how recipes are found: what the command line needs before it imports torch or TRL
(`python -m pipeline --help` and `ls` stay fast)."""

from pathlib import Path

STAGES = ("pretrain", "sft", "reward", "ppo", "grpo", "rloo", "dpo")  # the order the runner runs them in
CHAIN = ("pretrain", "sft", "reward", "ppo")  # what `run` runs without --stages: the ChatGPT chain
STAGE3 = ("ppo", "grpo", "rloo", "dpo")  # alternatives to each other, each from the SFT policy (and reward model)
CEILING = "ppo-oracle"  # PPO with the gold oracle as its reward (recipe ppo-oracle.yaml): the runner runs it after
# ppo where that recipe exists (the embedded default), as the ceiling a learned reward model can reach
PUSH_FAILED = 3  # exit code of a stage whose training succeeded but whose push did not


def script_of(stage: str) -> str:
    """The stage whose script and recipe fields a run named `stage` uses (the ceiling is a PPO run)."""
    return "ppo" if stage == CEILING else stage


def upstream(stage: str) -> tuple[str, ...]:
    """The stages whose output `stage` reads: those before it, except the other stage-3 algorithms."""
    stage = script_of(stage)
    return tuple(s for s in STAGES[: STAGES.index(stage)] if s not in STAGE3)


def recipe_file(recipe_dir, stage: str, variant: str | None = None) -> Path:
    """A stage's recipe in a folder: <stage>.yaml, or <stage>-<variant>.yaml (e.g. sft-lora.yaml); the ceiling's
    is ppo-oracle.yaml."""
    return Path(recipe_dir) / (f"{stage}-{variant}.yaml" if variant else f"{stage}.yaml")
