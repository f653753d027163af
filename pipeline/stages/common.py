"""The steps every stage shares: set-up, checkpoint detection, and the closing save/card/eval/push."""

import json
import logging
import os
import sys

import datasets
import transformers
from transformers.trainer_utils import get_last_checkpoint

logger = logging.getLogger("pipeline")


def setup(training_args) -> None:
    """Seed and logging, the way transformers' example scripts do it."""
    transformers.set_seed(training_args.seed)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    level = training_args.get_process_log_level()
    logger.setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    if level > logging.INFO:  # keep the training bar, drop the bars of every small map/load/save
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def last_checkpoint(training_args) -> str | None:
    """The newest `checkpoint-N` in output_dir, to resume from (None for a fresh run)."""
    if not os.path.isdir(training_args.output_dir):
        return None
    checkpoint = get_last_checkpoint(training_args.output_dir)
    if checkpoint is not None:
        logger.info(f"resuming from {checkpoint}")
    return checkpoint


def write_results(output_dir: str, results: dict) -> None:
    """`results.json` in the stage's output folder: what the pipeline runner collects."""
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)


def finish(trainer, training_args, dataset_name: str, metrics: dict, tags: list[str], publication) -> None:
    """Save the final model (+ tokenizer, generation config), write results, recipe.yaml and the model card,
    then push the output folder if the recipe asked for it (`publication`, from `hub.prepare`; a failed
    push exits with code 3 and keeps everything on disk)."""
    trainer.save_model(training_args.output_dir)
    metrics = {**metrics, "num_processes": trainer.accelerator.num_processes}
    if trainer.accelerator.is_main_process:
        write_results(training_args.output_dir, metrics)
        # the log history (losses, rewards, KL per step) for the run report, even when no checkpoint was saved
        trainer.state.save_to_json(os.path.join(training_args.output_dir, "trainer_state.json"))
        publication.write_files(metrics, dataset_name, tags)
    trainer.accelerator.wait_for_everyone()
    if trainer.accelerator.is_main_process:
        publication.push()
