"""Reward functions for tests (`reward_functions: [reward_fns:constant]`, with tests/ on PYTHONPATH)."""


def constant(prompts, completions, **kwargs):
    return [2.5] * len(completions)


def length(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


def not_a_number(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)


def wrong_count(prompts, completions, **kwargs):
    return [1.0]


def not_numbers(prompts, completions, **kwargs):
    return ["good"] * len(completions)


def raises(prompts, completions, **kwargs):
    return [1.0 / 0 for _ in completions]


def bad_signature(texts):
    return [0.0] * len(texts)


CALLS = {"count": 0}


def _after_trial():
    CALLS["count"] += 1
    return CALLS["count"] > 1


def nan_after_trial(prompts, completions, **kwargs):
    """Fine on the trial call before training, NaN from the first update on."""
    return [float("nan") if _after_trial() else 0.0] * len(completions)


def raises_after_trial(prompts, completions, **kwargs):
    """Fine on the trial call before training; raises at the first update."""
    if _after_trial():
        raise KeyError("sentiment")
    return [0.0] * len(completions)
