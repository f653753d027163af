"""Stage 3, DPO: TRL's DPOTrainer on the preference pairs (the reward stage's data), from the SFT policy
(`model_name_or_path`), which is also the frozen reference (with LoRA: the policy with its adapters disabled).
No reward model is trained against and nothing is sampled during training. Then the policy is evaluated
against the SFT policy exactly as PPO's is (pipeline.stages.policy_eval), on `eval_dataset_name`'s held-out
prompts, the reward model of `reward_model_path` (if given) scoring the answers."""

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset
from jinja2 import TemplateError
from accelerate import PartialState
from trl import DPOTrainer, get_peft_config

from .. import data, hub
from ..models import (CAUSAL_LM, SCALAR_HEAD, check_before_loading, check_model_kind, load_causal_lm,
                      load_reward_model, load_tokenizer)
from .common import check_template_roles, finish, last_checkpoint, load_data, logger, setup, train
from .policy_eval import (MonitorInCheckpoints, check_curve_settings, evaluate_against_sft, for_evaluation, log_final,
                          monitor_for)


def _lengths(dataset: Dataset, column: str) -> np.ndarray:
    """The token count of each row's `column`, from the Arrow column (follows select/shuffle)."""
    if not len(dataset):
        return np.zeros(0, dtype=np.int64)
    table = dataset.select_columns([column]).with_format("arrow")[:]
    return pc.list_value_length(table.column(column)).to_numpy(zero_copy_only=False)


def fit_pairs(dataset: Dataset, max_length: int, truncation_mode: str, source: str) -> Dataset:
    """Tokenized pairs ({"prompt_ids", "chosen_ids", "rejected_ids"}) -> the pairs DPO can train on, with what
    max_length does to them counted and said: TRL cuts a pair longer than max_length (the end of its answers, with
    truncation_mode keep_start) and, with keep_start, drops a pair whose prompt alone fills max_length (nothing of
    its answers would be left). Raises DataError when no pair is left (TRL would stop on an empty sampler)."""
    prompt = _lengths(dataset, "prompt_ids")
    longest = prompt + np.maximum(_lengths(dataset, "chosen_ids"), _lengths(dataset, "rejected_ids"))
    no_answer = prompt >= max_length if truncation_mode == "keep_start" else np.zeros(len(prompt), dtype=bool)
    if len(dataset) and no_answer.all():
        raise data.DataError(
            f"{source}: every pair's prompt alone fills max_length={max_length} tokens, so no answer token is left to "
            f"train on (prompts of {prompt.min()} to {prompt.max()} tokens; pairs of {longest.min()} to "
            f"{longest.max()}); raise max_length (above {prompt.min()} keeps the shortest), or set "
            "truncation_mode: keep_end (which cuts the prompt's start instead)")
    cut = int(((longest > max_length) & ~no_answer).sum())
    if cut or no_answer.any():
        what = "the end of their answers" if truncation_mode == "keep_start" else "the start of their prompts"
        message = (f"{source}: {cut} of {len(dataset)} pairs are longer than max_length={max_length} tokens (up to "
                   f"{longest.max()}): cut to it ({what}, truncation_mode: {truncation_mode})")
        if no_answer.any():
            message += (f"; {int(no_answer.sum())} pairs whose prompt alone fills max_length: dropped; "
                        f"{int((~no_answer).sum())} pairs left")
        logger.warning(message)
    return dataset.select(np.flatnonzero(~no_answer)) if no_answer.any() else dataset


class DPOStageTrainer(MonitorInCheckpoints, DPOTrainer):
    """TRL's DPOTrainer, with pairs longer than max_length counted and said (fit_pairs) instead of dropped or cut
    without a word, and one line instead of a sampler's "num_samples=0" when no pair is left."""

    def __init__(self, *args, source: str = "dataset", **kwargs):
        self.source = source  # read by _prepare_dataset, in super().__init__
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        max_length = args.max_length
        if not isinstance(dataset, Dataset):
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        args.max_length = None  # TRL's tokenization without its filter of prompts that fill max_length
        try:
            prepared = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        except TemplateError as error:  # not a ValueError: a traceback otherwise
            raise data.template_refusal(error, dataset, processing_class, f"{self.source} [{dataset_name}]") from error
        finally:
            args.max_length = max_length
        if max_length is None:
            return prepared
        with PartialState().main_process_first():  # its select is cached: the others load it
            return fit_pairs(prepared, max_length, args.truncation_mode, f"{self.source} [{dataset_name}]")


def eval_prompts(script_args, test_pairs):
    """The held-out prompts of `eval_dataset_name`, or else those of the preference test split."""
    if not script_args.eval_dataset_name:
        if test_pairs is None:
            raise ValueError(f"dpo: {script_args.dataset_name} has no test split to evaluate on: set "
                             "eval_dataset_name (prompts with a test split, e.g. embedded:prompt)")
        return test_pairs.select_columns(["prompt"]) if "prompt" in test_pairs.column_names else data.normalise(
            test_pairs, "prompt", f"{script_args.dataset_name} [{script_args.dataset_test_split}]")
    train, test, source = data.load_splits(script_args.eval_dataset_name, None, script_args.dataset_train_split,
                                           script_args.dataset_test_split, seed=script_args.embedded_seed)
    split = script_args.dataset_test_split if test is not None else script_args.dataset_train_split
    return data.normalise(test if test is not None else train, "prompt", f"{source} [{split}]",
                          script_args.invalid_rows)


def main(script_args, training_args, model_args):
    check_curve_settings(script_args)
    check_model_kind(model_args.model_name_or_path, CAUSAL_LM, "model_name_or_path", model_args)
    if script_args.reward_model_path:
        check_model_kind(script_args.reward_model_path, SCALAR_HEAD, "reward_model_path", model_args)
    check_before_loading("dpo", script_args, training_args, model_args)
    setup(training_args, "dpo")
    publication = hub.prepare("dpo", script_args, training_args, model_args)  # before the trainer
    peft_config = get_peft_config(model_args)
    checkpoint = last_checkpoint(training_args)

    pairs, test_pairs, source = load_data("preference", script_args)
    prompts = eval_prompts(script_args, test_pairs)

    policy_path = model_args.model_name_or_path
    tokenizer = load_tokenizer(policy_path, model_args)
    check_template_roles(tokenizer, policy_path, source, (pairs, script_args.dataset_train_split))
    reward_model = (load_reward_model(script_args.reward_model_path, tokenizer, model_args)[0]
                    if script_args.reward_model_path else None)
    policy = load_causal_lm(policy_path, tokenizer, model_args)
    reference = None if peft_config else load_causal_lm(policy_path, tokenizer, model_args)

    trainer = DPOStageTrainer(
        source=source,
        model=policy,
        ref_model=reference,
        args=training_args,
        train_dataset=pairs,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    scorer = for_evaluation(reward_model, trainer)
    sft = trainer.ref_model if trainer.ref_model is not None or not script_args.curve_steps else for_evaluation(
        load_causal_lm(policy_path, tokenizer, model_args), trainer)  # the curve's KL needs the SFT policy
    # the over-optimisation curve (no alarms: DPO samples no answers while it trains)
    monitor = monitor_for(trainer, script_args, tokenizer, prompts, scorer, sft, script_args.eval_max_new_tokens,
                          script_args.eval_temperature, checkpoint=checkpoint)
    trainer.monitor = monitor
    train_result = train(trainer, checkpoint, "dpo")

    metrics = {"train_loss": train_result.training_loss}
    metrics.update(evaluate_against_sft(
        trainer, "dpo", script_args, model_args, tokenizer, prompts, sft_model_path=policy_path,
        reward_model=scorer, max_new_tokens=script_args.eval_max_new_tokens,
        temperature=script_args.eval_temperature, reference=sft))
    metrics.update({key: value for key, value in monitor.results().items() if not key.startswith("alarm")})
    log_final(trainer, metrics)
    finish(trainer, training_args, source, metrics, tags=["pipeline", "dpo", "alignment"], publication=publication)
