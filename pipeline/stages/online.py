"""What the online stage-3 algorithms (PPO, GRPO, RLOO) share: prompts to sample from, and a reward."""

from .. import data
from ..monitor import Alarms
from .common import logger


def alarms_for(script_args) -> Alarms:
    """The reward-hacking alarms at the recipe's thresholds (alarm_<name>)."""
    return Alarms({"length_drift": script_args.alarm_length_drift,
                   "reward_length_correlation": script_args.alarm_reward_length_correlation,
                   "ensemble_disagreement": script_args.alarm_ensemble_disagreement})


def require_reward(stage: str, script_args, reward_model_path: str | None) -> None:
    """Before anything is loaded: the stage must be rewarded by something (a reward model with a weight, or a
    reward function)."""
    uses_model = bool(reward_model_path) and script_args.reward_model_weight != 0
    if not uses_model and not script_args.reward_functions:
        raise ValueError(f"{stage} has no reward: set reward_model_path (the reward stage's output_dir) or "
                         "reward_functions (module:function), or both")


def tokenize_prompts(dataset, tokenizer, max_prompt_length: int, source: str, keep_prompts: bool = False):
    """Prompts -> {"input_ids"} through the chat template's generation prompt; over-long ones are dropped.
    keep_prompts: the rows keep their prompt (TRL's GRPO and RLOO tokenize it themselves) and lose the ids."""
    def tokenize(row):
        prompt = row["prompt"]
        if isinstance(prompt, list):
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        else:
            ids = tokenizer(prompt)["input_ids"]
        return {"input_ids": ids}

    tokenized = dataset.map(tokenize, remove_columns=[] if keep_prompts else dataset.column_names)
    kept = tokenized.filter(lambda row: len(row["input_ids"]) <= max_prompt_length)
    if len(kept) < len(tokenized):
        logger.warning(f"{source}: dropped {len(tokenized) - len(kept)} prompts longer than {max_prompt_length} tokens")
    if len(kept) == 0:
        raise data.DataError(f"{source}: every prompt is longer than max_prompt_length={max_prompt_length} tokens")
    return kept.remove_columns("input_ids") if keep_prompts else kept




def evaluation_prompts(prompts, eval_prompts, tokenizer, max_prompt_length: int, source: str):
    """The prompts the policy is evaluated on after training: the test split's, filtered as training filters its
    own (a prompt longer than max_prompt_length would not fit the model with its answer). Without a test split
    the training prompts stand in, and the results say so (`eval_held_out: false`)."""
    if eval_prompts is None:
        logger.warning(f"{source} has no test split: the evaluation after training uses training prompts, which are "
                       "not held out (results.json: eval_held_out false)")
    return tokenize_prompts(eval_prompts if eval_prompts is not None else prompts, tokenizer, max_prompt_length,
                            f"{source} [evaluation]", keep_prompts=True)
