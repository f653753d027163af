"""The built-in task: a world of movie reviews with a gold oracle (see world.py and build.py)."""

from .generate import KINDS, build, rater_flip_rate
from .world import gold_score


def gold_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """The oracle as a PPO reward function (`reward_functions: [pipeline.embedded:gold_reward]`): an
    oracle-reward run is the upper bound a learned reward model can reach."""
    return [gold_score(prompt, completion) for prompt, completion in zip(prompts, completions)]


__all__ = ["KINDS", "build", "gold_reward", "gold_score", "rater_flip_rate"]
