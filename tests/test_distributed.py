"""A stage under `accelerate launch` with 2 CPU processes (DDP over gloo) matches 1 process at the same
global batch: same loss and same weights within float tolerance (all-reduce changes summation order).
(Pretrain is the SFT stage's code path: SFTTrainer. PPO cannot match 1 process sample for sample: each process
samples its rollouts from its own seed, as TRL does; it is checked to run, to resume, and to match itself.)"""

import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from conftest import ROOT, run_python

# Absolute, on losses; weights are compared at 1e-4. (Accuracy is not compared: a pair whose two rewards
# differ by float noise can flip.)
TOLERANCE = 1e-3


def test_reward_stage_two_processes_match_one(tiny_run, tmp_path):
    common = ["--config", tiny_run["recipes"] / "reward.yaml", "--max_steps", "6", "--learning_rate", "1e-3",
              "--save_strategy", "no", "--per_device_eval_batch_size", "50"]
    run_python("scripts/reward.py", *common, "--per_device_train_batch_size", "8", "--output_dir", tmp_path / "one")
    two = run_python("-m", "accelerate.commands.launch", "--config_file", ROOT / "recipes/accelerate/cpu_2proc.yaml",
                     "scripts/reward.py", *common, "--per_device_train_batch_size", "4",
                     "--output_dir", tmp_path / "two")
    one_results = json.loads((tmp_path / "one" / "results.json").read_text())
    two_results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert (one_results["num_processes"], two_results["num_processes"]) == (1, 2)
    assert abs(one_results["train_loss"] - two_results["train_loss"]) < TOLERANCE
    assert abs(one_results["eval_loss"] - two_results["eval_loss"]) < TOLERANCE
    one = AutoModelForSequenceClassification.from_pretrained(tmp_path / "one").state_dict()
    two = AutoModelForSequenceClassification.from_pretrained(tmp_path / "two").state_dict()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_run["outputs"] / "reward").state_dict()
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-4
    assert any(not torch.equal(one[k], base[k]) for k in one)  # it trained


def test_runner_launches_every_stage_with_accelerate(tiny_run, tmp_path):
    """The whole tiny chain and the other stage-3 algorithms through `python -m pipeline run --stages all
    --accelerate_config cpu_2proc.yaml`: every stage, the evaluations against the SFT policy included, runs in 2
    processes and writes its results once."""
    from conftest import write_recipes

    recipes = write_recipes(tmp_path / "recipes", tmp_path / "outputs")
    run_python("-m", "pipeline", "run", recipes, "--stages", "all",
               "--accelerate_config", ROOT / "recipes/accelerate/cpu_2proc.yaml", "--skip_eval")
    results = json.loads((tmp_path / "outputs" / "results.json").read_text())
    for stage in ("pretrain", "sft", "reward", "ppo", "grpo", "rloo", "dpo"):
        assert (results[stage]["num_processes"], results[stage]["distributed_type"]) == (2, "MULTI_CPU"), stage
    for stage in ("ppo", "grpo", "rloo", "dpo"):
        assert results[stage]["eval_prompts"] == 8 and 0 <= results[stage]["gold_win_rate_vs_sft"] <= 1, stage


@pytest.mark.parametrize("stage", ["pretrain", "sft", "sft-packed"])
def test_causal_lm_stages_two_processes_match_one(tiny_run, tmp_path, stage):
    """sft-packed: bfd packing in the pipeline's rows layout (a global batch of 4 packed rows)."""
    script, packed = stage.split("-")[0], stage.endswith("packed")
    common = ["--config", tiny_run["recipes"] / f"{script}.yaml", "--max_steps", "6", "--learning_rate", "1e-3",
              "--save_strategy", "no", "--report_to", "none",
              *(["--packing", "true", "--packing_strategy", "bfd"] if packed else [])]
    batch = 4 if packed else 8
    run_python(f"scripts/{script}.py", *common, "--per_device_train_batch_size", batch,
               "--output_dir", tmp_path / "one")
    run_python("-m", "accelerate.commands.launch", "--config_file", ROOT / "recipes/accelerate/cpu_2proc.yaml",
               f"scripts/{script}.py", *common, "--per_device_train_batch_size", batch // 2,
               "--output_dir", tmp_path / "two")
    one_results = json.loads((tmp_path / "one" / "results.json").read_text())
    two_results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert (one_results["num_processes"], two_results["num_processes"]) == (1, 2)
    assert abs(one_results["train_loss"] - two_results["train_loss"]) < TOLERANCE
    if packed:  # the real tokens of every packed row, counted across both processes
        tokens = [[h["num_tokens"] for h in json.loads((tmp_path / run / "trainer_state.json").read_text())[
            "log_history"] if "num_tokens" in h] for run in ("one", "two")]
        assert tokens[0] == tokens[1] and tokens[0][-1] > 0
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "one").state_dict()
    two = AutoModelForCausalLM.from_pretrained(tmp_path / "two").state_dict()
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-4


def test_ppo_under_two_processes_resumes_after_sigkill(tiny_run, tmp_path):
    """PPO (the stage whose resume is ours, not transformers') in 2 processes, the launcher's process group
    killed after a checkpoint, relaunched: it resumes and ends exactly where an uninterrupted 2-process run
    ends (each process restores its own RNG state: rng_state_<rank>.pth)."""
    import random

    from test_resume import STAGES, command, kill_after_a_checkpoint, logged, saved_steps

    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "recipes/accelerate/cpu_2proc.yaml")]
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    run_python(*launcher[1:], *command(tiny_run, "ppo", uninterrupted))
    kill_after_a_checkpoint(command(tiny_run, "ppo", interrupted), interrupted, random.Random(0), launcher=launcher)
    saved = saved_steps(interrupted)
    assert saved and (interrupted / f"checkpoint-{saved[-1]}" / "rng_state_1.pth").exists()
    resumed = run_python(*launcher[1:], *command(tiny_run, "ppo", interrupted))
    assert f"resuming from {interrupted / f'checkpoint-{saved[-1]}'}" in resumed.stdout + resumed.stderr
    keys = STAGES["ppo"][1]
    expected, got = logged(uninterrupted, keys), logged(interrupted, keys)
    assert list(got) == list(expected)
    for step, values in expected.items():
        for key, value in values.items():
            assert got[step][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, key)
    assert json.loads((interrupted / "results.json").read_text())["num_processes"] == 2


def test_ppo_with_lora_under_two_processes(tiny_run, tmp_path):
    """LoRA PPO has no reference copy: TRL computes the reference through `self.model.policy` with the adapter
    disabled, which a DDP wrapper would hide."""
    run_python("-m", "accelerate.commands.launch", "--config_file", ROOT / "recipes/accelerate/cpu_2proc.yaml",
               "scripts/ppo.py", "--config", tiny_run["recipes"] / "ppo.yaml", "--use_peft", "true",
               "--total_episodes", "32", "--report_to", "none",
               "--output_dir", tmp_path / "ppo")
    results = json.loads((tmp_path / "ppo" / "results.json").read_text())
    assert results["num_processes"] == 2 and results["policy_trainable_parameters"] < results["policy_total_parameters"]
    assert (tmp_path / "ppo" / "adapter" / "adapter_config.json").exists()


def test_bad_row_under_two_processes_stops_every_process_with_one_line(tiny_run, tmp_path):
    """The main process checks the data first; when it stops on a bad row it still releases the other
    process, which meets the same row and stops too: no process is left waiting at the barrier."""
    data_file = tmp_path / "bad.jsonl"
    rows = [{"prompt": "Write a review.", "completion": " Fine."}] * 5 + [{"prompt": "Write a review.",
                                                                           "completion": ""}]
    data_file.write_text("\n".join(json.dumps(row) for row in rows))
    result = run_python("-m", "accelerate.commands.launch", "--config_file", ROOT / "recipes/accelerate/cpu_2proc.yaml",
                        "scripts/sft.py", "--config", tiny_run["recipes"] / "sft.yaml", "--dataset_name", data_file,
                        "--output_dir", tmp_path / "sft", check=False, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: sft:")]
    assert errors and all(f"{data_file} [train]: row 5: 'completion' is empty" in line for line in errors)
