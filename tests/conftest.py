import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

# Tiny settings: every stage runs a handful of steps, so the whole chain takes about two minutes on 2 cores.
TINY_OVERRIDES = {
    "pretrain": {"vocab_size": 400, "n_layer": 1, "n_embd": 32, "n_head": 2, "max_steps": 15, "max_length": 64,
                 "per_device_eval_batch_size": 64, "logging_steps": 2},
    "sft": {"max_steps": 10, "max_length": 64, "logging_steps": 2},
    "reward": {"max_steps": 10, "max_length": 64, "logging_steps": 2},
    "ppo": {"total_episodes": 64, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2,
            "response_length": 16, "eval_max_prompts": 8, "eval_samples_per_prompt": 1},
    # 4 optimizer steps of 8 answers (2 prompts x 4), each generation used twice
    **{stage: {"max_steps": 4, "num_generations": 4, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
               "num_iterations": 2, "max_completion_length": 16, "save_steps": 2, "logging_steps": 1,
               "eval_max_prompts": 8, "eval_samples_per_prompt": 1} for stage in ("grpo", "rloo")},
    "dpo": {"max_steps": 6, "max_length": 64, "per_device_train_batch_size": 8, "save_steps": 3, "logging_steps": 2,
            "eval_max_new_tokens": 16, "eval_max_prompts": 8, "eval_samples_per_prompt": 1},
}


def write_recipes(dest: Path, outputs: Path, overrides: dict = TINY_OVERRIDES) -> Path:
    """recipes/tiny rewritten with small settings and every path under `outputs`."""
    dest.mkdir(parents=True, exist_ok=True)
    for stage, changes in overrides.items():
        recipe = yaml.safe_load((ROOT / "recipes" / "tiny" / f"{stage}.yaml").read_text())
        recipe.update(changes, disable_tqdm=True, output_dir=str(outputs / stage))
        for key in ("model_name_or_path", "sft_model_path", "reward_model_path"):
            if key in recipe:
                recipe[key] = str(outputs / Path(recipe[key]).name)
        (dest / f"{stage}.yaml").write_text(yaml.safe_dump(recipe))
    return dest


def run_python(*args, check=True, timeout=900, **kwargs) -> subprocess.CompletedProcess:
    """`python ARGS` from the repository root; past `timeout`, its whole process group is killed (a hung launcher's
    workers too, which would otherwise stay behind and slow every later test) and the test fails."""
    given = kwargs.pop("input", None)
    kwargs.setdefault("cwd", ROOT)
    with subprocess.Popen([sys.executable, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.PIPE if given is not None else None, text=True, start_new_session=True,
                          **kwargs) as process:
        try:
            stdout, stderr = process.communicate(given, timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            raise AssertionError(f"timed out after {timeout} s: python {' '.join(map(str, args))}\n"
                                 f"{stdout[-3000:]}\n{stderr[-5000:]}") from None
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """Every stage through the runner (pretrain -> sft -> reward -> ppo, then grpo, rloo and dpo from the same
    SFT policy and reward model), on tiny settings."""
    base = tmp_path_factory.mktemp("tiny")
    recipes = write_recipes(base / "recipes", base / "outputs")
    result = run_python("-m", "pipeline", "run", recipes, "--stages", "all")
    return {"outputs": base / "outputs", "recipes": recipes, "log": result.stdout + result.stderr}
