"""A stage under `accelerate launch` with 2 CPU processes (DDP over gloo) matches 1 process at the same
global batch: same loss and same weights within float tolerance (all-reduce changes summation order)."""

import json

import torch
from transformers import AutoModelForSequenceClassification

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
    """The whole tiny chain through `python -m pipeline run --accelerate_config cpu_2proc.yaml`: every
    stage, PPO and its evaluation included, runs in 2 processes and writes its results once."""
    from conftest import write_recipes

    recipes = write_recipes(tmp_path / "recipes", tmp_path / "outputs")
    run_python("-m", "pipeline", "run", recipes, "--accelerate_config", ROOT / "recipes/accelerate/cpu_2proc.yaml",
               "--skip_eval")
    results = json.loads((tmp_path / "outputs" / "results.json").read_text())
    for stage in ("pretrain", "sft", "reward", "ppo"):
        assert results[stage]["num_processes"] == 2, stage
    assert 0 <= results["ppo"]["gold_win_rate_vs_sft"] <= 1
