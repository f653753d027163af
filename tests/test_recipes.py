"""Recipes parse through TRL's TrlParser: YAML fields, CLI overrides, unknown keys and wrong types."""

from pathlib import Path

import pytest
import yaml

from pipeline.config import STAGES, parse
from trl import RewardConfig, SFTConfig
from trl.experimental.ppo import PPOConfig

from conftest import ROOT, run_python

TINY = ROOT / "recipes" / "tiny"
GPT2_HH = ROOT / "recipes" / "gpt2-hh"


@pytest.mark.parametrize("stage", STAGES)
def test_tiny_recipes_parse_into_trainer_configs(stage):
    script_args, training_args, model_args = parse(stage, ["--config", str(TINY / f"{stage}.yaml")])
    expected = {"pretrain": SFTConfig, "sft": SFTConfig, "reward": RewardConfig, "ppo": PPOConfig}[stage]
    assert type(training_args) is expected
    assert script_args.dataset_name.startswith("embedded:")
    assert training_args.output_dir == f"outputs/tiny/{stage}"
    assert training_args.use_cpu and not training_args.bf16


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo"])
def test_gpt2_hh_recipes_parse_and_name_real_hub_ids(stage):
    # bf16 needs a GPU: on this CPU machine it is switched off from the command line, as a user would.
    script_args, training_args, model_args = parse(stage, ["--config", str(GPT2_HH / f"{stage}.yaml"),
                                                           "--bf16", "false"])
    assert script_args.dataset_name == "Anthropic/hh-rlhf"
    assert yaml.safe_load((GPT2_HH / f"{stage}.yaml").read_text())["bf16"] is True
    if stage == "sft":
        assert model_args.model_name_or_path == "openai-community/gpt2"
    if stage == "ppo":
        assert training_args.sft_model_path == "outputs/gpt2-hh/sft"
        assert training_args.reward_model_path == "outputs/gpt2-hh/reward"


def test_command_line_overrides_the_yaml():
    recipe = yaml.safe_load((TINY / "sft.yaml").read_text())
    assert recipe["learning_rate"] != 1.0e-5
    _, training_args, model_args = parse("sft", ["--config", str(TINY / "sft.yaml"), "--learning_rate", "1e-5",
                                                 "--model_name_or_path", "elsewhere"])
    assert training_args.learning_rate == 1e-5
    assert model_args.model_name_or_path == "elsewhere"
    assert training_args.per_device_train_batch_size == recipe["per_device_train_batch_size"]


def test_unknown_yaml_key_is_an_error_naming_it(tmp_path):
    recipe = yaml.safe_load((TINY / "sft.yaml").read_text())
    recipe["lerning_rate"] = 1e-4
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match="unknown key 'lerning_rate' \\(did you mean 'learning_rate'\\?\\)"):
        parse("sft", ["--config", str(path)])


def test_missing_recipe_is_named():
    with pytest.raises(FileNotFoundError, match="recipe 'recipes/tiny/nope.yaml' does not exist"):
        parse("sft", ["--config", "recipes/tiny/nope.yaml"])


def test_unknown_command_line_flag_is_an_error_naming_it():
    with pytest.raises(ValueError, match="--lerning_rate"):
        parse("sft", ["--config", str(TINY / "sft.yaml"), "--lerning_rate", "1e-4"])


def test_stage_script_reports_a_typo_in_one_line(tmp_path):
    recipe = yaml.safe_load((TINY / "reward.yaml").read_text())
    recipe["num_train_epoch"] = 1
    path = tmp_path / "reward.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = run_python("scripts/reward.py", "--config", path, check=False)
    assert result.returncode == 2
    assert "num_train_epoch" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_wrong_value_type_is_rejected():
    with pytest.raises(SystemExit):
        parse("sft", ["--config", str(TINY / "sft.yaml"), "--num_train_epochs", "many"])


@pytest.mark.parametrize("name", ["single_gpu", "multi_gpu", "zero2", "zero3", "fsdp", "cpu_2proc"])
def test_accelerate_configs_are_valid(name):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(ROOT / "recipes" / "accelerate" / f"{name}.yaml"))
    expected = {"single_gpu": "NO", "multi_gpu": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED",
                "fsdp": "FSDP", "cpu_2proc": "MULTI_GPU"}[name]
    assert str(config.distributed_type).split(".")[-1] == expected
    if name.startswith("zero"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
    if name == "cpu_2proc":
        assert config.num_processes == 2
