"""Recipes parse through TRL's TrlParser: YAML fields, CLI overrides, unknown keys and wrong types."""

from pathlib import Path

import pytest
import yaml

from pipeline.config import STAGES, parse
from trl import DPOConfig, GRPOConfig, RewardConfig, RLOOConfig, SFTConfig

from pipeline.trainers.ppo import PPOConfig

from conftest import ROOT, run_python

TINY = ROOT / "recipes" / "tiny"
GPT2_HH = ROOT / "recipes" / "gpt2-hh"


@pytest.mark.parametrize("stage", STAGES)
def test_tiny_recipes_parse_into_trainer_configs(stage):
    script_args, training_args, model_args = parse(stage, ["--config", str(TINY / f"{stage}.yaml")])
    expected = {"pretrain": SFTConfig, "sft": SFTConfig, "reward": RewardConfig, "ppo": PPOConfig,
                "grpo": GRPOConfig, "rloo": RLOOConfig, "dpo": DPOConfig}[stage]
    assert type(training_args) is expected
    assert script_args.dataset_name.startswith("embedded:")
    assert training_args.output_dir == f"outputs/tiny/{stage}"
    assert training_args.use_cpu and not training_args.bf16


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo", "grpo", "rloo", "dpo"])
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
    if stage in ("grpo", "rloo", "dpo"):  # from the SFT policy; the reward model trained against (DPO: eval only)
        assert model_args.model_name_or_path == "outputs/gpt2-hh/sft"
        assert script_args.reward_model_path == "outputs/gpt2-hh/reward"


@pytest.mark.parametrize("stage", ["grpo", "rloo", "dpo"])
@pytest.mark.parametrize("folder", ["tiny", "gpt2-hh", "qwen3-ultrafeedback"])
def test_stage3_lora_recipes_are_the_full_recipes_with_lora(folder, stage):
    full = yaml.safe_load((ROOT / "recipes" / folder / f"{stage}.yaml").read_text())
    lora = yaml.safe_load((ROOT / "recipes" / folder / f"{stage}-lora.yaml").read_text())
    assert lora["use_peft"] is True and lora["lora_target_modules"] == "all-linear"  # fits every architecture
    assert lora["output_dir"] == full["output_dir"].replace(folder, f"{folder}-lora")
    assert lora["model_name_or_path"] == full["model_name_or_path"].replace(folder, f"{folder}-lora")
    same = set(full) - {"output_dir", "model_name_or_path", "reward_model_path", "learning_rate"}
    assert {k: lora[k] for k in same} == {k: full[k] for k in same}


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


def test_recipe_that_is_not_a_mapping_is_named(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("- learning_rate: 1.0e-4\n")
    with pytest.raises(ValueError, match="must be a YAML mapping of field: value"):
        parse("sft", ["--config", str(path)])


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
    with pytest.raises(ValueError, match="^argument --num_train_epochs/--num-train-epochs: invalid float value: 'many'$"):
        parse("sft", ["--config", str(TINY / "sft.yaml"), "--num_train_epochs", "many"])


@pytest.mark.parametrize("stage, key, value, expected", [
    ("sft", "learning_rate", "fast", "'learning_rate' must be a number, got 'fast'"),
    ("sft", "num_train_epochs", [1], "'num_train_epochs' must be a number, got [1]"),
    ("reward", "per_device_train_batch_size", 2.5, "'per_device_train_batch_size' must be an integer, got 2.5"),
    ("sft", "max_steps", "ten", "'max_steps' must be an integer, got 'ten'"),
    ("sft", "use_cpu", "maybe", "'use_cpu' must be true or false, got 'maybe'"),
    ("sft", "learning_rate", None, "'learning_rate' must be a number, got null"),
    ("reward", "invalid_rows", "skip", "'invalid_rows' must be one of 'error', 'drop', got 'skip'"),
    ("sft", "overlong_rows", "cut", "'overlong_rows' must be one of 'truncate', 'drop', got 'cut'"),
    ("ppo", "eval_strategy", False, "'eval_strategy' must be one of 'no', 'steps', 'epoch', got false (YAML reads "
                                    "unquoted yes/no/on/off as booleans: quote it)"),
    ("pretrain", "n_layer", "two", "'n_layer' must be an integer, got 'two'"),
    ("ppo", "max_prompt_length", {"tokens": 64}, "'max_prompt_length' must be an integer, got {'tokens': 64}"),
])
def test_wrong_value_type_in_a_recipe_names_the_key_and_the_type(tmp_path, stage, key, value, expected):
    recipe = yaml.safe_load((TINY / f"{stage}.yaml").read_text())
    recipe[key] = value
    path = tmp_path / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError) as error:
        parse(stage, ["--config", str(path)])
    assert str(error.value) == f"recipe '{path}': {expected}"


def test_values_that_argparse_converts_are_accepted(tmp_path):
    recipe = yaml.safe_load((TINY / "sft.yaml").read_text())
    recipe.update(learning_rate="1e-4", max_steps="5", use_cpu="true", max_length=None, report_to=["tensorboard"])
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(recipe))
    _, training_args, _ = parse("sft", ["--config", str(path)])
    assert (training_args.learning_rate, training_args.max_steps, training_args.max_length) == (1e-4, 5, None)


def test_stage_script_reports_a_wrong_type_in_one_line(tmp_path):
    recipe = yaml.safe_load((TINY / "sft.yaml").read_text())
    recipe["learning_rate"] = "fast"
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = run_python("scripts/sft.py", "--config", path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"error: sft: recipe '{path}': 'learning_rate' must be a number, got 'fast' "
                                     "(PIPELINE_DEBUG=1 shows the traceback)")
    flag = run_python("scripts/sft.py", "--config", TINY / "sft.yaml", "--num_train_epochs", "many", check=False)
    assert flag.returncode == 2 and len(flag.stderr.strip().splitlines()) == 1
    assert "--num_train_epochs/--num-train-epochs: invalid float value: 'many'" in flag.stderr


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
