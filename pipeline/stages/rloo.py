"""Stage 3, RLOO: TRL's RLOOTrainer from the SFT policy against the reward model (see pipeline.stages.group)."""

from trl import RLOOTrainer

from .group import main_for


def main(script_args, training_args, model_args):
    main_for("rloo", RLOOTrainer, script_args, training_args, model_args)
