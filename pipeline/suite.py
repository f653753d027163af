"""The evaluation the pipeline runs after its stages, on the models the recipes wrote:

- the reward model on the held-out pairs of its recipe's dataset (against the oracle on the embedded task):
  accuracy, mean margin, score distribution;
- perplexity of every policy (pretrain, SFT, PPO and the other stage-3 policies) on the pretraining corpus's held-out text, which shows
  what RL costs the language model ("alignment tax");
- zero-, one- and few-shot accuracy of every policy on a held-out task of the embedded world.
The policies' answers to held-out prompts (scores, KL, win rates, diversity) are measured by the stage-3 stages.
"""

import os

from . import data, embedded
from .config import STAGE3, STAGES, parse, recipe_file
from .embedded.fewshot import sentiment_task
from .evaluate import evaluate_reward_model, few_shot_accuracy, perplexity
from .models import load_causal_lm, load_scalar_head_model, load_tokenizer

SHOTS = [0, 1, 2]  # the tiny model sees 128 positions: two demonstrations fit
POLICY_STAGES = ("pretrain", "sft", *STAGE3)


def _recipe(recipe_dir: str, stage: str, variant: str | None) -> str:
    """<stage>-<variant>.yaml where the folder has one (e.g. sft-lora.yaml), else <stage>.yaml."""
    chosen = recipe_file(recipe_dir, stage, variant)
    return str(chosen if chosen.is_file() else recipe_file(recipe_dir, stage))


def _resolved(recipe_dir: str, overrides: list[str], variant: str | None = None) -> dict:
    """The parsed recipes of the stages whose model exists (a partial run evaluates what it has); none is an error
    (an empty result would read as an evaluation that found nothing)."""
    stages = {stage: parse(stage, ["--config", _recipe(recipe_dir, stage, variant), *overrides])
              for stage in STAGES
              if os.path.isfile(_recipe(recipe_dir, stage, variant))}
    if not stages:
        raise FileNotFoundError(f"no stage recipe in '{recipe_dir}': eval suite evaluates the models a recipe folder's "
                                "stages wrote (e.g. recipes/tiny)")
    found = {stage: args for stage, args in stages.items()
             if os.path.isfile(os.path.join(args[1].output_dir, "config.json"))}
    if not found:
        raise FileNotFoundError(f"no model of '{recipe_dir}' exists yet (none in "
                                f"{', '.join(args[1].output_dir for args in stages.values())}): run "
                                f"`python -m pipeline run {recipe_dir}` first")
    return found


def evaluate_run(recipe_dir: str, overrides: list[str] = (), max_texts: int = 500, fewshot_examples: int = 100,
                 variant: str | None = None) -> dict:
    stages = _resolved(recipe_dir, list(overrides), variant)
    results = {}
    on_embedded = all(args[0].dataset_name.startswith(data.EMBEDDED_PREFIX) for args in stages.values())

    if "reward" in stages:
        script_args, training_args, model_args = stages["reward"]
        pairs = data.load_test("preference", script_args)
        if pairs is not None:
            tokenizer = load_tokenizer(training_args.output_dir, model_args)
            model = load_scalar_head_model(training_args.output_dir, tokenizer, model_args,
                                           "the reward stage's output_dir").eval()
            results["reward_model"] = evaluate_reward_model(model, tokenizer, pairs,
                                                            oracle=embedded.ORACLE if on_embedded else None)

    texts = None
    if "pretrain" in stages:
        corpus = data.load_test("text", stages["pretrain"][0])
        texts = corpus["text"][:max_texts] if corpus is not None else None
    task = sentiment_task(seed=stages[next(iter(stages))][0].embedded_seed, examples=fewshot_examples) if on_embedded else None

    for stage in POLICY_STAGES:
        if stage not in stages or (texts is None and task is None):
            continue
        script_args, training_args, model_args = stages[stage]
        tokenizer = load_tokenizer(training_args.output_dir, model_args)
        model = load_causal_lm(training_args.output_dir, tokenizer, model_args,
                               f"the {stage} stage's output_dir").eval()
        if texts is not None:
            results.setdefault("perplexity", {})[stage] = perplexity(model, tokenizer, texts)
        if task is not None:
            results.setdefault("few_shot_sentiment", {})[stage] = few_shot_accuracy(model, tokenizer, task, SHOTS)
    return results
