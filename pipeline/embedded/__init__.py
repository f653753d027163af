"""The built-in task: a world of movie reviews with a gold oracle (see world.py and build.py)."""

from .generate import KINDS, build, rater_flip_rate
from .world import gold_score

__all__ = ["KINDS", "build", "gold_score", "rater_flip_rate"]
