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
