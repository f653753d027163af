"""Stage 3, GRPO: TRL's GRPOTrainer from the SFT policy against the reward model (see pipeline.stages.group)."""

from trl import GRPOTrainer

from .group import main_for


def main(script_args, training_args, model_args):
    main_for("grpo", GRPOTrainer, script_args, training_args, model_args)
