"""The steps every stage shares: set-up, checkpoint detection, and the closing save/card/eval/push."""

import ast
import json
import logging
import math
import os
import re
import shutil
import sys
import zipfile

import datasets
import torch
import transformers
from accelerate import PartialState
from transformers import TrainerCallback

from .. import data
from . import preemption
from .lock import LOCK_FILE
from .preemption import Preempted, StopOnSignal

logger = logging.getLogger("pipeline")

STAGE_FILE = "pipeline_stage.json"  # which stage an output folder belongs to
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class StageOutputError(ValueError):
    """output_dir belongs to another stage."""


class NonFiniteError(ValueError):
    """A NaN/inf loss, gradient or reward: training stops before the update, the checkpoints on disk are kept."""


def setup(training_args, stage: str) -> None:
    """Seed and logging, the way transformers' example scripts do it; then claim output_dir for `stage`
    (refusing a folder that holds another stage's output)."""
    transformers.set_seed(training_args.seed)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    level = training_args.get_process_log_level()
    # the pipeline's own lines (resuming, dropped rows) on the main process even at transformers' quiet default
    logger.setLevel(logging.INFO if training_args.log_level == "passive" and training_args.should_log else level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    if level > logging.INFO:  # keep the training bar, drop the bars of every small map/load/save
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    claim_output_dir(training_args.output_dir, stage)
    asked_checkpoint(training_args, stage)  # a resume_from_checkpoint that cannot be used: said before anything loads


def output_dir_stage(output_dir: str) -> str | None:
    """The stage whose output or checkpoints `output_dir` holds: from its stage file, or, for folders written
    before it existed, from the newest checkpoint (a PPO checkpoint has value_model/, a reward model a
    sequence-classification head, pretrain/SFT a causal LM: those two can't be told apart, so "sft")."""
    recorded = output_dir_stage_file(os.path.join(output_dir, STAGE_FILE))
    if recorded is not None:
        return recorded
    checkpoints = complete_checkpoints(output_dir)
    if not checkpoints:
        return None
    newest = checkpoints[-1]
    if os.path.isdir(os.path.join(newest, "value_model")):
        return "ppo"
    try:
        with open(os.path.join(newest, "config.json")) as f:
            architectures = json.load(f).get("architectures") or []
    except (OSError, ValueError):
        return None
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "reward"
    return "sft" if any(a.endswith("LMHeadModel") or a.endswith("ForCausalLM") for a in architectures) else None


def holds_output(output_dir: str) -> bool:
    """Whether a folder holds a model or checkpoints (a stage file alone, from a run that stopped before
    writing anything, claims nothing)."""
    names = os.listdir(output_dir)
    return any(_CHECKPOINT.match(n) for n in names) or any(
        n in names for n in ("config.json", "adapter_config.json", "adapter", "results.json"))


def claim_output_dir(output_dir: str, stage: str) -> None:
    """Refuse an output_dir that holds another stage's checkpoints (resuming from them would load the wrong
    kind of model, and training would write over them). Writes nothing: `mark_output_dir` records the stage
    when training starts."""
    if os.path.isdir(output_dir) and not os.path.isfile(os.path.join(output_dir, STAGE_FILE)) and \
            not any(_CHECKPOINT.match(name) for name in os.listdir(output_dir)):
        # a folder that no stage wrote: its files would be overwritten (config.json, README.md, ...)
        others = sorted(name for name in os.listdir(output_dir) if name != LOCK_FILE)
        if others:
            raise StageOutputError(
                f"output_dir {output_dir} holds files that no stage of the pipeline wrote ({', '.join(others[:5])}"
                f"{', ...' if len(others) > 5 else ''}), which the stage would overwrite: give it a new or empty "
                "folder (nothing was written)")
    if os.path.isdir(output_dir) and holds_output(output_dir):
        found = output_dir_stage(output_dir)
        same = found is None or found == stage or {found, stage} == {"sft", "pretrain"} and not os.path.isfile(
            os.path.join(output_dir, STAGE_FILE))
        if not same:
            raise StageOutputError(
                f"output_dir {output_dir} holds the output of the {found} stage, not {stage}: "
                f"give this stage its own output_dir (nothing was written)")


def mark_output_dir(training_args, stage: str) -> None:
    """Record in output_dir which stage writes it (main process; atomically, since the others may read it)."""
    path = os.path.join(training_args.output_dir, STAGE_FILE)
    if training_args.should_save and output_dir_stage_file(path) != stage:
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(f"{path}.tmp", "w") as f:
            json.dump({"stage": stage}, f)
        os.replace(f"{path}.tmp", path)


def output_dir_stage_file(path: str) -> str | None:
    try:
        with open(path) as f:
            return json.load(f)["stage"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_complete(checkpoint: str) -> bool:
    """Trainer writes trainer_state.json last in a checkpoint (after weights, optimizer, scheduler and RNG
    states): a checkpoint whose trainer_state.json is missing or cut short was interrupted while saving."""
    try:
        with open(os.path.join(checkpoint, "trainer_state.json")) as f:
            json.load(f)
        return True
    except (OSError, ValueError):
        return False


def complete_checkpoints(output_dir: str) -> list[str]:
    """The complete `checkpoint-N` folders of output_dir, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = sorted((int(m.group(1)), name) for name in os.listdir(output_dir) if (m := _CHECKPOINT.match(name)))
    paths = [os.path.join(output_dir, name) for _, name in found]
    return [path for path in paths if os.path.isdir(path) and is_complete(path)]


def broken_file(checkpoint: str) -> str | None:
    """Why a checkpoint's files cannot load (a file cut short by a full disk or a killed copy), or None. Reads
    only headers: a safetensors file must be as long as its header says, a torch.save file (a zip) must end with
    its zip directory, a JSON file must parse."""
    for folder, _, names in os.walk(checkpoint):
        for name in sorted(names):
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, checkpoint)
            try:
                size = os.path.getsize(path)
                with open(path, "rb") as f:
                    if name.endswith(".safetensors"):
                        length = int.from_bytes(f.read(8), "little")
                        header = json.loads(f.read(length)) if 8 + length <= size else None
                        if header is None:
                            return f"{relative} is cut short ({size} bytes, shorter than its own header)"
                        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
                        if 8 + length + end > size:
                            return f"{relative} is cut short ({size} of {8 + length + end} bytes)"
                    elif name.endswith((".pt", ".pth", ".bin")) and f.read(4) == b"PK\x03\x04":
                        if not zipfile.is_zipfile(path):
                            return f"{relative} is cut short ({size} bytes, no zip directory at its end)"
                    elif name.endswith(".json"):
                        json.load(f)
            except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
                return f"{relative} cannot be read ({type(error).__name__}: {error})"
    return None


def asked_checkpoint(training_args, stage: str | None = None) -> str | None:
    """The checkpoint `resume_from_checkpoint` names (None when it is unset, or `true`/`latest`: the newest), after
    checking that it exists, is complete, its files load and (given `stage`) that stage wrote it; else a one-line
    error."""
    asked = training_args.resume_from_checkpoint
    if asked in (None, "") or str(asked).lower() in ("true", "latest", "last"):
        return None
    if not os.path.isdir(asked):
        what = "is a file, not a checkpoint folder" if os.path.exists(asked) else "does not exist"
        found = complete_checkpoints(training_args.output_dir)
        raise ValueError(f"resume_from_checkpoint {asked} {what}"
                         + (f" (output_dir's newest checkpoint is {found[-1]})" if found else "")
                         + "; nothing was trained")
    if not is_complete(asked):
        raise ValueError(f"resume_from_checkpoint {asked} is not a complete checkpoint (no readable "
                         "trainer_state.json: the run that wrote it stopped while saving it); nothing was trained")
    if (broken := broken_file(asked)) is not None:
        raise ValueError(f"resume_from_checkpoint {asked}: {broken}; resume from another checkpoint; nothing was "
                         "trained")
    written_by = output_dir_stage(os.path.dirname(os.path.abspath(asked)))
    if stage is not None and written_by is not None and written_by != stage:
        raise ValueError(f"resume_from_checkpoint {asked} is a checkpoint of the {written_by} stage, not {stage}: "
                         f"resume {stage} from one of its own checkpoints (to start {stage} from that model, give it "
                         "as the model path instead); nothing was trained")
    return asked


def last_checkpoint(training_args) -> str | None:
    """The checkpoint to resume from: `resume_from_checkpoint` if the recipe or command line names one (it must
    exist and load), else the newest complete `checkpoint-N` in output_dir whose files load (None for a fresh
    run). Checkpoints that were being written when the run died are removed first (on the main process), so that
    neither this run nor transformers' rotation ever picks them up; a complete one with a file cut short is renamed
    `broken-checkpoint-N` (kept, never resumed from or rotated) and the one before it is used."""
    output_dir = training_args.output_dir
    asked = asked_checkpoint(training_args)
    if asked is not None:
        logger.info(f"resuming from {asked} (resume_from_checkpoint)")
        return asked
    if not os.path.isdir(output_dir):
        return None
    if training_args.should_save:
        for name in sorted(os.listdir(output_dir)):
            path = os.path.join(output_dir, name)
            if _CHECKPOINT.match(name) and os.path.isdir(path) and not is_complete(path):
                logger.warning(f"removing {path}: the run was stopped while writing it (no complete trainer_state.json)")
                shutil.rmtree(path)
    for checkpoint in reversed(complete_checkpoints(output_dir)):
        if (broken := broken_file(checkpoint)) is None:
            logger.info(f"resuming from {checkpoint}")
            return checkpoint
        kept, number = os.path.join(output_dir, f"broken-{os.path.basename(checkpoint)}"), 1
        while os.path.exists(kept):
            kept, number = os.path.join(output_dir, f"broken-{os.path.basename(checkpoint)}.{number}"), number + 1
        logger.warning(f"not resuming from {checkpoint}: {broken}; it is kept as {kept}")
        if training_args.should_save:
            os.replace(checkpoint, kept)
    return None


def load_data(use: str, script_args, loader=data.load_for):
    """data.load_for (or `loader`, e.g. data.load_extra_tests) on each machine's main process first: the others
    then load its cached maps (data read from a file or the Hub) instead of checking and tokenizing the same
    rows at the same time. If the main process fails (a bad row), it still releases the others, which then meet
    the same error and say so themselves. Returns load_for's (train, test, source), or what `loader` returns."""
    state = PartialState()
    if not state.is_local_main_process:
        state.wait_for_everyone()
    try:
        return loader(use, script_args)
    finally:
        if state.is_local_main_process:
            state.wait_for_everyone()


def check_template_roles(tokenizer, model_path: str, source: str, *splits) -> None:
    """Before the model loads: every conversation turn of the (dataset, split name) pairs must be of a role the
    tokenizer's chat template renders (models.roles_not_rendered), or one line names the first row that is not."""
    from ..models import roles_not_rendered

    not_rendered = roles_not_rendered(tokenizer)
    for dataset, split in splits:
        data.check_roles_rendered(dataset, f"{source} [{split}]", not_rendered, f"the chat template of {model_path}")


def check_finite(value, what: str, step: int) -> None:
    """Stop with a one-line NonFiniteError if `value` (a float or tensor) is NaN or infinite."""
    value = float(value)
    if not math.isfinite(value):
        raise NonFiniteError(f"{what} is {value} at step {step}: training stopped before that update; "
                             f"the checkpoints already in output_dir are kept (lower the learning rate, "
                             f"check the data, or resume from the last checkpoint)")


def gradient_norm(parameters) -> torch.Tensor | None:
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else None


class FiniteGradients(TrainerCallback):
    """Before every optimizer step, the gradient norm must be finite: a NaN/inf loss makes it NaN/inf, and the
    step is refused before it corrupts the weights (transformers' `logging_nan_inf_filter` would only hide the
    loss from the logs). With fp16 loss scaling inf gradients are routine (the scaler skips them): not checked."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if args.fp16 or model is None:
            return
        norm = gradient_norm(model.parameters())
        if norm is not None:
            check_finite(norm, "the gradient norm (a NaN/inf loss)", state.global_step + 1)


class TiedWeightsFilter(logging.Filter):
    """Drops the Trainer's "missing keys in the checkpoint" warning on resume when the keys missing are only tied
    weights (GPT-2's lm_head.weight is wte.weight: safetensors stores it once), which is not a problem."""

    PREFIX = "There were missing keys in the checkpoint model loaded: "

    def __init__(self, model):
        super().__init__()
        self.tied = {f"{name}.{key}".lstrip(".") for name, module in model.named_modules()
                     for key in (getattr(module, "_tied_weights_keys", None) or {})}

    def filter(self, record) -> bool:
        message = record.getMessage()
        if not message.startswith(self.PREFIX):
            return True
        try:
            missing = set(ast.literal_eval(message[len(self.PREFIX):].rstrip(".")))
        except (ValueError, SyntaxError):
            return True
        return not missing <= self.tied


class _Trained(Exception):
    """Raised by NothingLeftToTrain: the checkpoint resumed from is at the last step."""


class NothingLeftToTrain(TrainerCallback):
    """Resumed from a checkpoint at max_steps (a stage rerun after it finished training, e.g. after its evaluation
    failed or a signal stopped it), transformers 5.25 trains one step more than max_steps: stop it before that step
    (the checkpoint's weights are loaded by then). A checkpoint beyond max_steps is refused."""

    def __init__(self, checkpoint: str | None):
        self.checkpoint = checkpoint

    def on_train_begin(self, args, state, control, **kwargs):
        if self.checkpoint is None or state.max_steps <= 0 or state.global_step < state.max_steps:
            return
        if state.global_step > state.max_steps:
            raise ValueError(f"{self.checkpoint} is at step {state.global_step}, beyond this run's {state.max_steps} "
                             "steps: raise max_steps (or total_episodes, num_train_epochs), resume from an earlier "
                             "checkpoint, or use a new output_dir; nothing was trained")
        raise _Trained()


def train(trainer, checkpoint: str | None, stage: str):
    """`trainer.train`, resuming from `checkpoint`, with the finite-gradient check and the stop on a preemption
    signal (pipeline.stages.preemption); output_dir marked as `stage`'s first. The final model is saved as soon as
    training ends, before the evaluation, the card or the push can fail (`save_final`). A signal raises
    `Preempted` once transformers has written the checkpoint of the step in flight."""
    mark_output_dir(trainer.args, stage)
    trainer.add_callback(FiniteGradients())
    stopper = StopOnSignal()
    trainer.add_callback(stopper)
    quiet = TiedWeightsFilter(trainer.model)
    trainer_logger = logging.getLogger("transformers.trainer")
    trainer_logger.addFilter(quiet)
    trainer.add_callback(NothingLeftToTrain(checkpoint))
    try:
        result = trainer.train(resume_from_checkpoint=checkpoint)
    except _Trained:
        preemption.training_ended()
        logger.info(f"{checkpoint} is at the last step ({trainer.state.global_step}): nothing left to train")
        # no step ran: transformers' train_loss (the mean over the steps this process ran) is the logged losses' mean
        losses = [entry["loss"] for entry in trainer.state.log_history if isinstance(entry.get("loss"), (int, float))]
        result = transformers.trainer_utils.TrainOutput(trainer.state.global_step,
                                                        sum(losses) / len(losses) if losses else None, {})
    finally:
        trainer_logger.removeFilter(quiet)
    if stopper.stopped_at is not None:
        trainer.accelerator.wait_for_everyone()
        raise Preempted(preemption.received(), os.path.join(trainer.args.output_dir,
                                                            f"checkpoint-{stopper.stopped_at}"), stopper.stopped_at)
    save_final(trainer, trainer.args)
    if preemption.received():  # after the last step: the model is written, the evaluation is not run
        raise Preempted(preemption.received())
    return result


def save_final(trainer, training_args) -> None:
    """The trained model (+ tokenizer, generation config; LoRA: the adapter in output_dir/adapter and the merged
    model in output_dir) and the log history (losses, rewards, KL per step, for the run report, even when no
    checkpoint was saved)."""
    from ..models import peft_model, save_lora

    lora = peft_model(trainer)
    if lora is not None:
        save_lora(trainer, lora, training_args.output_dir)
    else:
        trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        trainer.state.save_to_json(os.path.join(training_args.output_dir, "trainer_state.json"))


def write_results(output_dir: str, results: dict) -> None:
    """`results.json` in the stage's output folder: what the pipeline runner collects."""
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)


def finish(trainer, training_args, dataset_name: str, metrics: dict, tags: list[str], publication) -> None:
    """After the evaluation (the model is already saved, by `train`): write results, recipe.yaml and the model
    card, then push the output folder if the recipe asked for it (`publication`, from `hub.prepare`; a failed push
    exits with code 3 and keeps everything on disk)."""
    from ..models import parameter_counts

    metrics = {**metrics, **parameter_counts(trainer), "num_processes": trainer.accelerator.num_processes,
               "distributed_type": trainer.accelerator.distributed_type.value}
    if trainer.accelerator.is_main_process:
        write_results(training_args.output_dir, metrics)
        # again, with the evaluation's entries
        trainer.state.save_to_json(os.path.join(training_args.output_dir, "trainer_state.json"))
        publication.write_files(metrics, dataset_name, tags)
    trainer.accelerator.wait_for_everyone()
    if trainer.accelerator.is_main_process:
        publication.push()
