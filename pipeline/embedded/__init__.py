"""The built-in task: a world of movie reviews with a gold oracle (see world.py and build.py)."""

from .generate import KINDS, build, rater_flip_rate
from .world import DEMONSTRATION, GOLD_TERMS, gold_score, gold_terms

DEFAULT_SENTENCES = DEMONSTRATION["sentences"]


def gold_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """The oracle as a reward function (`reward_functions: [pipeline.embedded:gold_reward]`, for PPO, GRPO or
    RLOO): an oracle-reward run is the upper bound a learned reward model can reach."""
    return [gold_score(prompt, completion) for prompt, completion in zip(prompts, completions)]


class GoldOracle:
    """The oracle as the evaluation uses it: called, the gold score of one answer; `term_means`, the score of
    many in its parts."""

    def __call__(self, prompt: str, response: str) -> float:
        return gold_score(prompt, response)

    @staticmethod
    def term_means(prompts: list[str], responses: list[str]) -> dict[str, float]:
        """`gold_<term>`: the mean of each term of the score (they sum to the mean gold score), and
        `title_only_rate`: how often an answer names the asked title and no other; `repeat_rate`: how often an
        answer repeats a sentence. What a policy learned, and what it exploited in the reward model, term by term."""
        terms = [gold_terms(p, r) for p, r in zip(prompts, responses)]
        means = {f"gold_{name}": sum(t[name] for t in terms) / len(terms) for name in GOLD_TERMS}
        means["title_only_rate"] = sum(t["asked_title"] > 0 and t["other_titles"] == 0 for t in terms) / len(terms)
        means["repeat_rate"] = sum(t["repeated_sentences"] < 0 for t in terms) / len(terms)
        return means


ORACLE = GoldOracle()

__all__ = ["DEFAULT_SENTENCES", "GOLD_TERMS", "KINDS", "ORACLE", "build", "gold_reward", "gold_score", "gold_terms", "rater_flip_rate"]
