"""Publishing a stage to the Hugging Face Hub: the resolved recipe, the model card, and one push at the end.

`push_to_hub: true` in TrainingArguments makes the Trainer create the repo when it is built and push on every
save, so a Hub outage would stop training. The stages take the request out of the training arguments
instead (`prepare`, before the trainer is built), train, save the model and results, write `recipe.yaml`
and the model card (`Publication.write_files`), and only then push the whole output folder once
(`Publication.push`). A failed push leaves the folder as it is, prints one line naming the cause and the
command that retries it, and exits with code 3.

`push_folder` pushes any output folder; `push_command` is what `python -m pipeline push` calls.
The token (`hub_token`, or `HF_TOKEN`, which huggingface_hub reads itself) is never written anywhere.
"""

import dataclasses
import enum
import fnmatch
import logging
import math
import os
import re
import shlex
import sys
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path, PurePath

import yaml

from . import data
from .names import PUSH_FAILED  # the exit code of a stage whose training succeeded but whose push did not

RECIPE_FILE = "recipe.yaml"
CARD_FILE = "README.md"
# Not pushed: intermediate checkpoints, tensorboard logs, the pickled TrainingArguments, VCS/cache folders,
# the stage file.
EXCLUDED_DIRS = ("checkpoint-*", "runs", ".git", ".cache", "__pycache__")
EXCLUDED_FILES = ("training_args.bin", "pipeline_stage.json",  # the second: which stage wrote the folder, local
                  ".pipeline.lock")  # held by the run writing the folder (pipeline.stages.lock)
# Credential fields are never written to recipe.yaml (eos_token, pad_token, stop_token are settings, not secrets).
SECRET_FIELD = re.compile(r"(^|_)(hub|hf|auth|access|api)_token$|secret|password|api_key|credential")
COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")

logger = logging.getLogger("pipeline")

STAGE_INFO = {  # what the stage is, how it was trained, the Hub pipeline tag of its model
    "pretrain": ("pretraining", "a byte-level BPE tokenizer and a GPT-2 trained from scratch with the causal "
                 "language-modelling objective (TRL `SFTTrainer` on plain text)", "text-generation"),
    "sft": ("supervised fine-tuning", "TRL `SFTTrainer` on demonstrations", "text-generation"),
    "reward": ("reward model", "TRL `RewardTrainer` on preference pairs: a sequence classifier with one "
               "output, the scalar reward, trained so that the chosen answer scores above the rejected one",
               "text-classification"),
    "ppo": ("PPO", "the pipeline's `PPOTrainer` (TRL 1.12's PPO on transformers' Trainer): the policy is optimised "
            "against the frozen reward model with a KL penalty to the SFT policy; the value model it trained is in `value_model/`",
            "text-generation"),
    "grpo": ("GRPO", "TRL `GRPOTrainer` (group relative policy optimization): several answers per prompt, each "
             "answer's advantage its reward against the others' of the same prompt, no value model; rewarded by "
             "the frozen reward model (and any reward functions), from the SFT policy", "text-generation"),
    "rloo": ("RLOO", "TRL `RLOOTrainer` (REINFORCE leave-one-out): several answers per prompt, each answer's "
             "baseline the mean reward of the others, no value model; rewarded by the frozen reward model (and "
             "any reward functions) with a KL penalty to the SFT policy", "text-generation"),
    "dpo": ("DPO", "TRL `DPOTrainer` (direct preference optimization) on the preference pairs, from the SFT policy, "
            "which is also the reference: no reward model and no sampling during training", "text-generation"),
}
HYPERPARAMETERS = {  # the recipe fields shown in the card, in order (those unset are left out)
    "common": ["learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio", "num_train_epochs",
               "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "optim",
               "weight_decay", "max_grad_norm", "bf16", "fp16", "seed"],
    "pretrain": ["max_length", "vocab_size", "n_layer", "n_head", "n_embd", "n_positions", "dropout"],
    "sft": ["max_length", "completion_only_loss", "packing"],
    "reward": ["max_length", "center_rewards_coefficient"],
    "ppo": ["total_episodes", "num_ppo_epochs", "num_mini_batches", "local_rollout_forward_batch_size",
            "response_length", "max_prompt_length", "temperature", "stop_token", "missing_eos_penalty",
            "kl_coef", "kl_estimator", "cliprange", "cliprange_value", "vf_coef", "gamma", "lam",
            "whiten_rewards"],
    "grpo": ["num_generations", "max_completion_length", "max_prompt_length", "temperature", "beta",
             "num_iterations", "epsilon", "loss_type", "scale_rewards", "reward_weights"],
    "rloo": ["num_generations", "max_completion_length", "max_prompt_length", "temperature", "beta",
             "num_iterations", "epsilon", "normalize_advantages", "reward_weights"],
    "dpo": ["max_length", "beta", "loss_type", "label_smoothing"],
    "peft": ["lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"],
}
NOT_RESULTS = ("epoch", "num_processes", "parameters", "total_flos", "eval_prompts")
NOT_RESULT_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second", "_num_tokens")


# --------------------------------------------------------------------------- the push request

@dataclasses.dataclass
class PushRequest:
    repo_id: str
    token: str | None = dataclasses.field(default=None, repr=False)
    private: bool | None = None
    revision: str | None = None


REPO_ID_CHARACTERS = re.compile(r"[A-Za-z0-9._/-]")


def repo_id_problem(repo_id: str) -> str | None:
    """Why `repo_id` cannot name a Hub repo (huggingface_hub's `validate_repo_id`, in words), or None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        return None
    except HFValidationError as error:
        fallback = " ".join(str(error).split())
    if not repo_id:
        return "it is empty"
    slashes = repo_id.count("/")
    if slashes > 1:
        return f"it has {slashes} slashes; an id is 'name' or 'namespace/name' (a user or organisation, one slash)"
    bad = sorted({c for c in repo_id if not REPO_ID_CHARACTERS.fullmatch(c) or not c.isascii()})
    if bad:
        shown = ", ".join("a space" if c == " " else repr(c) for c in bad)
        return f"it has {shown}; an id takes only ASCII letters, digits, '-', '_' and '.'"
    if "--" in repo_id or ".." in repo_id:
        return "it has '--' or '..'"
    for part in repo_id.split("/"):
        if not part:
            return "its namespace or name is empty"
        if part[0] in "-." or part[-1] in "-.":
            return f"'{part}' starts or ends with '-' or '.'"
        if len(part) > 96:
            return f"'{part[:20]}...' is {len(part)} characters long, more than 96"
    if repo_id.endswith(".git"):
        return "it ends with .git"
    return fallback


def check_repo_id(repo_id: str, field: str = "hub_model_id") -> None:
    """A one-line ValueError, naming `field`, when `repo_id` is not a valid Hub repo id: before anything trains."""
    problem = repo_id_problem(repo_id)
    if problem:
        raise ValueError(f"{field} '{repo_id}' is not a valid Hub repo id: {problem} (e.g. my-name/tiny-ppo); "
                         "nothing was trained or pushed")


def take_push_request(training_args) -> PushRequest | None:
    """Take `push_to_hub` (and the token) out of the training arguments, before the trainer is built.

    The Trainer then neither creates the repo nor pushes on save, and `hub_token` is cleared so that it is
    never saved (training_args.bin, checkpoints, logs). Returns what to push at the end, or None.
    """
    token, training_args.hub_token = training_args.hub_token, None
    if not training_args.push_to_hub:
        return None
    training_args.push_to_hub = False
    # Without hub_model_id, like the Trainer: the output folder's name, in the token owner's namespace.
    repo_id = training_args.hub_model_id or Path(training_args.output_dir).absolute().name
    # a malformed id fails now (exit 2), not after training
    check_repo_id(repo_id, "hub_model_id" if training_args.hub_model_id else
                  f"the output folder's name (the repo id when hub_model_id is not set; output_dir "
                  f"{training_args.output_dir})")
    return PushRequest(repo_id, token or None, training_args.hub_private_repo, training_args.hub_revision)


# --------------------------------------------------------------------------- the resolved recipe

def _plain(value):
    """A YAML-safe copy of a config value (enums as their value, config objects as dicts)."""
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if hasattr(value, "to_dict"):
        return _plain(value.to_dict())
    return str(value)


def resolved_recipe(*parsed, secrets: tuple[str, ...] = ()) -> dict:
    """Every init field of the parsed dataclasses as one flat mapping, usable again with `--config`.

    Credential fields (hub_token, ...) are left out, and so is any field whose value holds one of `secrets`.
    """
    recipe = {}
    for args in parsed:
        for field in dataclasses.fields(args):
            if field.init and not SECRET_FIELD.search(field.name):
                recipe[field.name] = _plain(getattr(args, field.name))
    secrets = tuple(s for s in secrets if s)
    return {key: value for key, value in recipe.items()
            if not any(s in yaml.safe_dump(value) for s in secrets)}


def write_recipe(output_dir: str, recipe: dict, stage: str) -> str:
    path = os.path.join(output_dir, RECIPE_FILE)
    with open(path, "w") as f:
        f.write(f"# The resolved recipe of this {stage} run: every field of the script, training and model\n"
                f"# arguments (credentials left out). Rerun with: python scripts/{stage}.py --config {RECIPE_FILE}\n")
        yaml.safe_dump(recipe, f, sort_keys=False, allow_unicode=True)
    return path


# --------------------------------------------------------------------------- the model card

def _is_local(name: str) -> bool:
    return os.path.exists(name) or os.path.splitext(name)[1] in data.LOCAL_BUILDERS or name.startswith((".", "/", "~"))


def hub_id_of_model(path: str | None) -> str | None:
    """The Hub id of a model reference: a Hub id as is; a local output folder of this pipeline that was
    pushed, the repo its recipe.yaml names; any other local folder, None (it is not on the Hub)."""
    if not path:
        return None
    if not _is_local(path):
        return path
    recipe_file = os.path.join(path, RECIPE_FILE)
    if os.path.isfile(recipe_file):
        try:
            with open(recipe_file) as f:
                recipe = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError):
            return None
        if recipe.get("push_to_hub") and recipe.get("hub_model_id"):
            return recipe["hub_model_id"]
    return None


def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:  # numpy / torch scalars
            value = value.item()
        except AttributeError:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
    return value if math.isfinite(value) else None


def card_results(metrics: dict) -> dict:
    """The numeric, finite results of a stage, without bookkeeping (runtimes, throughput, counts)."""
    results = {}
    for key, value in sorted(metrics.items()):
        number = _number(value)
        if number is None or key in NOT_RESULTS or key.endswith(NOT_RESULT_SUFFIXES):
            continue
        results[key] = number
    return results


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"`{value}`" if isinstance(value, str) else str(value)


def model_card(stage: str, recipe: dict, metrics: dict, dataset_name: str, tags: list[str],
               model_id: str, revision: str | None = None):
    """The stage's model card (huggingface_hub.ModelCard): YAML metadata with model-index, base_model,
    datasets, tags; a body with the stage, base model, data, hyperparameters, results and how to load it."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    title, how, pipeline_tag = STAGE_INFO[stage]
    task_name = "Reward modeling" if stage == "reward" else "Text generation"
    base_path = recipe.get("sft_model_path") if stage == "ppo" else recipe.get("model_name_or_path")
    base_path = None if stage == "pretrain" else base_path
    base_model = hub_id_of_model(base_path)
    embedded = dataset_name.startswith(data.EMBEDDED_PREFIX)
    hub_dataset = None if embedded or _is_local(dataset_name) else dataset_name
    model_name = model_id.rstrip("/").split("/")[-1]

    results = card_results(metrics)
    eval_results = [
        EvalResult(task_type=pipeline_tag, task_name=task_name, dataset_type=dataset_name,
                   dataset_name=dataset_name + (" (generated by rlhf-pipeline)" if embedded else ""),
                   dataset_config=recipe.get("dataset_config"),
                   dataset_split=recipe.get("dataset_train_split" if key.startswith("train_") else "dataset_test_split"),
                   metric_type=key, metric_value=value)
        for key, value in results.items()
    ]
    card_tags = list(dict.fromkeys([*tags, "trl", "rlhf-pipeline", stage]
                                   + (["peft", "lora"] if recipe.get("use_peft") else [])))
    card_data = ModelCardData(
        base_model=base_model, datasets=[hub_dataset] if hub_dataset else None, library_name="transformers",
        pipeline_tag=pipeline_tag, tags=card_tags, model_name=model_name, eval_results=eval_results or None,
    )

    lines = [f"# {model_name}", "",
             f"Stage **{stage}** ({title}) of an RLHF pipeline (pretrain → SFT → reward model → PPO), trained "
             f"with [TRL](https://github.com/huggingface/trl) by rlhf-pipeline: {how}.", ""]
    if stage == "pretrain":
        lines.append("- **Base model**: none, trained from scratch.")
    elif base_model:
        lines.append(f"- **Base model**: `{base_model}`" + (f" (the local folder `{base_path}`)" if base_path != base_model else ""))
    else:
        lines.append(f"- **Base model**: the local checkpoint `{base_path}` (not on the Hub).")
    reward_path = recipe.get("reward_model_path")
    if stage in ("ppo", "grpo", "rloo", "dpo") and reward_path:
        reward_id = hub_id_of_model(reward_path)
        role = {"ppo": "frozen; the value model starts from it", "dpo": "not trained against: it scores the "
                "evaluation only"}.get(stage, "frozen")
        lines.append(f"- **Reward model** ({role}): "
                     + (f"`{reward_id}`" if reward_id else f"the local checkpoint `{reward_path}` (not on the Hub)"))
    if recipe.get("reward_functions"):
        lines.append(f"- **Reward functions**: {', '.join(f'`{f}`' for f in recipe['reward_functions'])}")
    if embedded:
        lines.append(f"- **Dataset**: `{dataset_name}`, generated by the project itself (rlhf-pipeline's embedded "
                     f"movie-review world with a gold oracle, `embedded_seed` {recipe.get('embedded_seed')}); it is "
                     "not a Hub dataset.")
    elif hub_dataset:
        lines.append(f"- **Dataset**: `{dataset_name}`" + (f" (config `{recipe['dataset_config']}`)"
                                                         if recipe.get("dataset_config") else ""))
    else:
        lines.append(f"- **Dataset**: the local data `{dataset_name}` (not on the Hub).")

    lines += ["", "## Training hyperparameters", "", "| hyperparameter | value |", "|---|---|"]
    keys = [k for k in HYPERPARAMETERS["common"] if not (stage == "ppo" and k in ("num_train_epochs", "max_steps"))]
    keys += HYPERPARAMETERS[stage] + (HYPERPARAMETERS["peft"] if recipe.get("use_peft") else [])
    for key in keys:
        value = recipe.get(key)
        if value is None or (key == "max_steps" and value <= 0) or (key == "warmup_ratio" and not value):
            continue
        if key == "num_train_epochs" and (recipe.get("max_steps") or 0) > 0:
            continue  # max_steps wins
        lines.append(f"| {key} | {_fmt(value)} |")
    processes = _number(metrics.get("num_processes")) or 1
    per_device, accumulation = recipe.get("per_device_train_batch_size"), recipe.get("gradient_accumulation_steps")
    if per_device and accumulation:
        lines.append(f"| effective batch size ({processes} process{'es' if processes > 1 else ''}) | "
                     f"{per_device * accumulation * processes} |")
    if _number(metrics.get("parameters")):
        lines.append(f"| parameters | {metrics['parameters']:,} |")
    lines += ["", f"Every setting is in `{RECIPE_FILE}`: `python scripts/{stage}.py --config {RECIPE_FILE}` "
              "reruns the stage (set `output_dir` and the input paths first)."]

    lines += ["", "## Results", ""]
    if results:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in results.items()]
        if stage in ("ppo", "grpo", "rloo", "dpo") and embedded:
            lines += ["", f"`gold_*`: the embedded task's oracle (the simulated human) judging the {title} and SFT "
                      "policies' answers to held-out prompts, and each term of its score; `rm_*`: the same through "
                      "the learned reward model; `kl_to_sft`: summed per-token log-ratio to the SFT policy."]
    else:
        lines.append("No evaluation was run (no test split).")
    lines.append("")
    lines.append("All metrics are in `results.json`, the log of every step in `trainer_state.json`.")

    rev = f', revision="{revision}"' if revision else ""
    question, answer = (("Write a review of The Lost River.", "The Lost River is a moving drama.") if embedded
                        else ("What is reinforcement learning from human feedback?",
                              "Fine-tuning a model against a reward model trained on human preferences."))
    lines += ["", "## How to load it", "", "```python"]
    if stage == "reward":
        lines += ["from transformers import AutoModelForSequenceClassification, AutoTokenizer", "",
                  f'tokenizer = AutoTokenizer.from_pretrained("{model_id}"{rev})',
                  f'model = AutoModelForSequenceClassification.from_pretrained("{model_id}"{rev})',
                  f'conversation = [{{"role": "user", "content": "{question}"}},',
                  f'                {{"role": "assistant", "content": "{answer}"}}]',
                  'inputs = tokenizer.apply_chat_template(conversation, return_tensors="pt", return_dict=True)',
                  "reward = model(**inputs).logits[0, 0].item()"]
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'tokenizer = AutoTokenizer.from_pretrained("{model_id}"{rev})',
                  f'model = AutoModelForCausalLM.from_pretrained("{model_id}"{rev})',
                  f'messages = [{{"role": "user", "content": "{question}"}}]',
                  "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, "
                  'return_tensors="pt", return_dict=True)',
                  "output = model.generate(**inputs, max_new_tokens=48)",
                  'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))']
        if stage == "ppo":
            lines += ["", "# the value model PPO trained (a 1-label sequence classifier), in the value_model/ subfolder",
                      "from transformers import AutoModelForSequenceClassification", "",
                      f'value_model = AutoModelForSequenceClassification.from_pretrained("{model_id}"{rev}, '
                      'subfolder="value_model")']
    lines += ["```", ""]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines))


# --------------------------------------------------------------------------- pushing

def files_to_push(output_dir: str) -> list[str]:
    """The files of an output folder that are pushed (relative POSIX paths): everything but checkpoint-*/,
    runs/ and training_args.bin."""
    root = Path(output_dir)
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not any(fnmatch.fnmatch(d, p) for p in EXCLUDED_DIRS))
        for name in sorted(files):
            if name not in EXCLUDED_FILES:
                found.append((Path(folder) / name).relative_to(root).as_posix())
    return found


def push_folder(output_dir: str, repo_id: str, token: str | None = None, private: bool | None = None,
                revision: str | None = None, endpoint: str | None = None) -> str:
    """Push a stage's output folder (see `files_to_push`) to the model repo `repo_id` in one commit; PPO's
    value_model/ goes to the repo's value_model/ subfolder. Creates the repo (and the `revision` branch) if
    needed. The token defaults to HF_TOKEN or the saved login; the endpoint to HF_ENDPOINT.
    Returns the commit URL. Reads the folder only."""
    from huggingface_hub import CommitOperationAdd, HfApi

    if not os.path.isdir(output_dir):
        raise FileNotFoundError(f"'{output_dir}' is not a folder")
    paths = files_to_push(output_dir)
    if not paths:
        raise ValueError(f"'{output_dir}' has no files to push")
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision and revision != "main" and not COMMIT_SHA.fullmatch(revision):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=os.path.join(output_dir, path))
                  for path in paths]
    info = api.create_commit(repo_id, operations, revision=revision,
                             commit_message=f"Upload {Path(output_dir).absolute().name} with rlhf-pipeline")
    return info.commit_url


def retry_command(output_dir: str, repo_id: str, revision: str | None = None, private: bool | None = None) -> str:
    command = f"python -m pipeline push {shlex.quote(str(output_dir))} --repo_id {shlex.quote(repo_id)}"
    if revision:
        command += f" --revision {shlex.quote(revision)}"
    return command + (" --private" if private else "")


def describe_failure(error: BaseException, endpoint: str, secrets: tuple[str, ...] = ()) -> str:
    """One line: the HTTP status and the server's message, or why the Hub could not be reached."""
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    if status:
        detail = getattr(error, "server_message", None) or ""
        cause = f"{status} {getattr(response, 'reason_phrase', '') or ''}".strip() + (f": {detail}" if detail else "")
    elif type(error).__module__.split(".")[0].startswith(("httpx", "httpcore")) or isinstance(error, ConnectionError):
        cause = f"cannot reach {endpoint}: {error or type(error).__name__}"
    else:
        cause = f"{type(error).__name__}: {error}"
    cause = " ".join(str(cause).split())
    for secret in secrets:
        if secret:
            cause = cause.replace(secret, "***")
    return cause if len(cause) <= 300 else cause[:297] + "..."


def _debug() -> bool:
    return os.environ.get("PIPELINE_DEBUG", "") not in ("", "0")


@contextmanager
def _quiet_push():
    """No huggingface_hub retry logs, warnings or (off a terminal) progress bars on stderr during a push:
    a failure must be one line. Warnings are returned to be shown after a success."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from huggingface_hub.utils import logging as hub_logging

    hub_logger = hub_logging.get_logger("huggingface_hub")
    level = hub_logger.level
    bars_off = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            hub_logger.setLevel(logging.ERROR)
            bars_off = not sys.stderr.isatty() and not are_progress_bars_disabled()
            if bars_off:
                disable_progress_bars()
            yield caught
        finally:
            hub_logger.setLevel(level)
            if bars_off:
                enable_progress_bars()


def push_and_report(output_dir: str, repo_id: str, token: str | None = None, private: bool | None = None,
                    revision: str | None = None) -> int:
    """`push_folder`, then one line on stdout (the commit) or on stderr (the cause and the retry command).
    Returns 0 or PUSH_FAILED; never raises for a Hub failure and never prints the token."""
    from huggingface_hub import constants

    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    secrets = (token or "",) + tuple(os.environ.get(name, "") for name in TOKEN_ENV)
    try:
        with _quiet_push() as caught:
            url = push_folder(output_dir, repo_id, token=token, private=private, revision=revision)
    except Exception as error:  # noqa: BLE001 - any failure of the push is reported the same way
        if _debug():
            trace = "".join(traceback.format_exception(error))
            for secret in secrets:
                trace = trace.replace(secret, "***") if secret else trace
            print(trace, file=sys.stderr, end="")
        cause = describe_failure(error, endpoint, secrets)
        status = getattr(getattr(error, "response", None), "status_code", None)
        retry = "check the token (HF_TOKEN or `hf auth login`) and retry" if status in (401, 403) else "retry"
        print(f"error: push of {output_dir} to {repo_id} failed ({cause}); the checkpoint is intact, "
              f"{retry} with: {retry_command(output_dir, repo_id, revision, private)}", file=sys.stderr, flush=True)
        return PUSH_FAILED
    for warning in caught:
        logger.warning(f"hub: {' '.join(str(warning.message).split())}")
    print(f"pushed {output_dir} to {repo_id}: {url}", flush=True)
    return 0


def push_command(output_dir: str, repo_id: str, revision: str | None = None, private: bool | None = None) -> int:
    """`python -m pipeline push OUTPUT_DIR --repo_id ID [--revision R] [--private]`: push a stage's output
    folder (the token from HF_TOKEN or the saved login). Returns the exit code: 0, 2 (no such folder) or 3
    (the push failed; one line on stderr says why and how to retry)."""
    if not os.path.isdir(output_dir):
        print(f"error: '{output_dir}' is not a folder (the output_dir of a stage that has run)", file=sys.stderr)
        return 2
    if not files_to_push(output_dir):
        print(f"error: '{output_dir}' has no files to push", file=sys.stderr)
        return 2
    if problem := repo_id_problem(repo_id):  # not a Hub failure: retrying the same id would fail the same way
        print(f"error: --repo_id '{repo_id}' is not a valid Hub repo id: {problem} (e.g. my-name/tiny-ppo)",
              file=sys.stderr)
        return 2
    return push_and_report(output_dir, repo_id, private=private, revision=revision)


# --------------------------------------------------------------------------- what the stages call

@dataclasses.dataclass
class Publication:
    """A stage's publication: made by `prepare` before the trainer, used by `stages.common.finish`."""

    stage: str
    output_dir: str
    recipe: dict
    request: PushRequest | None

    @property
    def model_id(self) -> str:
        return self.request.repo_id if self.request else self.output_dir

    def write_files(self, metrics: dict, dataset_name: str, tags: list[str]) -> None:
        """recipe.yaml and the model card (README.md) in the output folder (main process only)."""
        write_recipe(self.output_dir, self.recipe, self.stage)
        card = model_card(self.stage, self.recipe, metrics, dataset_name, tags, self.model_id,
                          self.request.revision if self.request else None)
        card.save(os.path.join(self.output_dir, CARD_FILE))

    def push(self) -> None:
        """Push the output folder if the recipe asked for it; on failure exit with PUSH_FAILED (main process only)."""
        if self.request is None:
            return
        request = self.request
        code = push_and_report(self.output_dir, request.repo_id, request.token, request.private, request.revision)
        if code:
            sys.exit(code)


def prepare(stage: str, script_args, training_args, model_args) -> Publication:
    """Call before building the trainer: snapshot the resolved recipe and take the push request out of
    `training_args` (push_to_hub -> False, hub_token -> None)."""
    token = training_args.hub_token
    recipe = resolved_recipe(script_args, training_args, model_args, secrets=(token or "",))
    request = take_push_request(training_args)
    return Publication(stage, training_args.output_dir, recipe, request)
