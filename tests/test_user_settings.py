"""Settings a user gets wrong against the model, the reward functions, optional packages and the Hub (docs/errors.md,
issue 27): one line naming the field, its value and what to do, exit code 2, nothing written, before anything is
loaded. The stages run in-process through their entry point (`pipeline.stages.run`, what `scripts/<stage>.py` calls)
on micro models of which only config.json exists: every check here reads configs, never weights."""

import logging
from types import SimpleNamespace

import pytest
import yaml
from transformers import GPT2Config, LlamaConfig

from conftest import ROOT
from pipeline import cli, config, hub, rl, stages
from pipeline.models import check_before_loading

TINY = ROOT / "recipes" / "tiny"


def failure(capsys, call) -> str:
    """Run `call`: exit code 2 and exactly one `error:` line, no traceback: that line."""
    with pytest.raises(SystemExit) as stopped:
        call()
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def stage_failure(capsys, tmp_path, stage, *argv, recipe=None) -> str:
    out = tmp_path / "out"
    line = failure(capsys, lambda: stages.run(stage, ["--config", str(recipe or TINY / f"{stage}.yaml"),
                                                      "--output_dir", str(out), *map(str, argv)]))
    assert line.startswith(f"error: {stage}: ") and not out.exists()
    return line


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A GPT-2 policy and reward model of 32 positions and 300 tokens: their config.json alone."""
    base = tmp_path_factory.mktemp("micro")
    for name, architecture in (("policy", "GPT2LMHeadModel"), ("reward", "GPT2ForSequenceClassification")):
        GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=2, n_head=2, num_labels=1,
                   architectures=[architecture]).save_pretrained(base / name)
    return SimpleNamespace(policy=str(base / "policy"), reward=str(base / "reward"))


# ------------------------------------------------------------------------------- lengths beyond the model's context

def _models(stage, micro):
    if stage == "ppo":
        return ["--sft_model_path", micro.policy, "--reward_model_path", micro.reward]
    if stage in ("grpo", "rloo", "dpo"):
        return ["--model_name_or_path", micro.policy, "--reward_model_path", micro.reward]
    return ["--model_name_or_path", micro.policy]


@pytest.mark.parametrize("stage, flags, expected", [
    ("sft", ["--max_length", "64"], "max_length 64 is longer than the 32 positions of model_name_or_path '{policy}' "
                                    "(n_positions 32): set max_length to at most 32"),
    ("reward", ["--max_length", "64"], "max_length 64 is longer than the 32 positions of model_name_or_path"),
    ("dpo", ["--max_length", "64"], "max_length 64 is longer than the 32 positions of model_name_or_path"),
    ("ppo", ["--max_prompt_length", "16", "--response_length", "24"],
     "max_prompt_length 16 + response_length 24 = 40 tokens is longer than the 32 positions of sft_model_path "
     "'{policy}' (n_positions 32): lower them to add up to at most 32"),
    ("grpo", ["--max_prompt_length", "16", "--max_completion_length", "24"],
     "max_prompt_length 16 + max_completion_length 24 = 40 tokens is longer than the 32 positions of "
     "model_name_or_path '{policy}'"),
    ("rloo", ["--max_prompt_length", "24", "--max_completion_length", "16"],
     "max_prompt_length 24 + max_completion_length 16 = 40 tokens is longer than the 32 positions"),
    ("ppo", ["--max_prompt_length", "16", "--response_length", "8", "--ptx_coef", "0.1", "--ptx_dataset_name",
             "embedded:corpus", "--ptx_block_size", "64"],
     "ptx_block_size 64 is longer than the 32 positions of sft_model_path '{policy}' (n_positions 32)"),
])
def test_lengths_beyond_the_models_context_are_refused_before_loading(capsys, tmp_path, micro, stage, flags, expected):
    line = stage_failure(capsys, tmp_path, stage, *_models(stage, micro), *flags)
    assert expected.format(policy=micro.policy) in line


def test_pretrain_positions_fewer_than_its_block_are_refused(capsys, tmp_path):
    line = stage_failure(capsys, tmp_path, "pretrain", "--n_positions", "16")
    assert ("--n_positions is 16, fewer than max_length 128 (the pretrain stage's block: packed rows of max_length "
            "tokens): set n_positions to at least 128 or max_length to at most 16") in line


def test_rotary_positions_beyond_the_trained_context_are_a_warning(tmp_path, caplog):
    """Rotary positions have no table to index past: a longer sequence runs, untrained beyond
    max_position_embeddings. Said once, not refused; within it, nothing is said."""
    LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=32,
                architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path / "llama")
    model_args = SimpleNamespace(model_name_or_path=str(tmp_path / "llama"))
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        check_before_loading("sft", SimpleNamespace(), SimpleNamespace(max_length=64), model_args)
        check_before_loading("sft", SimpleNamespace(), SimpleNamespace(max_length=32), model_args)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and warnings[0].startswith(
        f"max_length 64 is longer than the 32 positions model_name_or_path '{tmp_path / 'llama'}' "
        "(max_position_embeddings 32) was trained on: its rotary positions run on")


@pytest.mark.parametrize("stage, architecture", [("sft", "OpenAIGPTLMHeadModel"),
                                                 ("reward", "OpenAIGPTForSequenceClassification")])
def test_gradient_checkpointing_on_a_model_that_cannot_is_refused_naming_the_field(capsys, tmp_path, stage,
                                                                                   architecture):
    from transformers import OpenAIGPTConfig

    OpenAIGPTConfig(vocab_size=300, n_positions=128, n_embd=32, n_layer=1, n_head=2,
                    architectures=["OpenAIGPTLMHeadModel"]).save_pretrained(tmp_path / "gpt1")
    line = stage_failure(capsys, tmp_path, stage, "--model_name_or_path", tmp_path / "gpt1",
                         "--gradient_checkpointing", "true")
    assert (f"gradient_checkpointing is true, but {architecture} (model_name_or_path '{tmp_path / 'gpt1'}') does not "
            "support it: set gradient_checkpointing: false") in line


# ------------------------------------------------------------------------------------------------ token ids

def test_a_stop_token_id_outside_the_vocabulary_is_refused_before_loading(capsys, tmp_path, micro):
    recipe = yaml.safe_load((TINY / "ppo.yaml").read_text())
    recipe.pop("stop_token")
    recipe.update(max_prompt_length=16, response_length=8)
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    for value in ("99999", "-1"):
        line = stage_failure(capsys, tmp_path, "ppo", *_models("ppo", micro), f"--stop_token_id={value}",
                             recipe=path)
        assert (f"stop_token_id {value} is not a token of the vocabulary of sft_model_path '{micro.policy}' (ids 0 to "
                "299): set a token id of that range, or stop_token: eos") in line
    line = stage_failure(capsys, tmp_path, "ppo", *_models("ppo", micro), "--stop_token_id", "3")  # the recipe's eos
    assert "--stop_token_id is set beside stop_token: eos: set one of them" in line


@pytest.mark.parametrize("stage, field", [("reward", "pad_token"), ("sft", "eos_token")])
def test_a_pad_or_eos_token_that_the_tokenizer_lacks_is_refused_before_loading(capsys, tmp_path, stage, field):
    """TRL's fields (SFT, reward, DPO): TRL itself would say so after the data and the model are loaded."""
    from pipeline.models import train_tokenizer

    train_tokenizer(["a good film", "a bad film", "the film was fine"] * 20, 300).save_pretrained(tmp_path / "m")
    GPT2Config(vocab_size=300, n_positions=128, n_embd=32, n_layer=2, n_head=2,
               architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path / "m")
    line = stage_failure(capsys, tmp_path, stage, "--model_name_or_path", tmp_path / "m", f"--{field}", "<|nope|>")
    assert (f"{field} '<|nope|>' is not a token of the tokenizer of model_name_or_path '{tmp_path / 'm'}' (its special "
            f"tokens: '<|endoftext|>', '<|pad|>'): name one of its tokens, or leave {field} out") in line


# ------------------------------------------------------------------------------------- steps and renamed fields

@pytest.mark.parametrize("stage, flags, expected", [
    ("sft", ["--max_steps=-5"], "--max_steps must be at least 1 (or -1, unset: train num_train_epochs), got -5"),
    ("reward", ["--max_steps", "0"], "--max_steps must be at least 1 (or -1, unset: train num_train_epochs), got 0"),
    ("sft", ["--save_steps", "0"], "--save_steps must be greater than 0 (a number of steps, or below 1 a fraction of "
                                   "the run), got 0; set save_strategy: \"no\" to save no checkpoints"),
    ("dpo", ["--logging_steps", "0"], "--logging_steps must be greater than 0"),
    ("sft", ["--eval_steps", "50"], "--eval_steps is 50 but eval_strategy is \"no\": nothing would be evaluated "
                                    "during training; set eval_strategy: steps (or leave eval_steps out)"),
    ("sft", ["--torch_dtype", "bfloat16"], "Some specified arguments are not used by the HfArgumentParser: "
                                           "['--torch_dtype', 'bfloat16'] (for --torch_dtype use --dtype)"),
    ("ppo", ["--max_new_tokens", "20"], "(for --max_new_tokens use --response_length)"),
])
def test_step_settings_that_mean_something_else_and_renamed_fields(capsys, tmp_path, stage, flags, expected):
    assert expected in stage_failure(capsys, tmp_path, stage, *flags)


def test_bf16_without_a_gpu_names_the_recipe_and_use_cpu(capsys, tmp_path, monkeypatch):
    """transformers' own line, "Your setup doesn't support bf16/gpu. You need to assign use_cpu ...", names no file."""
    import transformers.utils

    for name in ("is_torch_bf16_gpu_available", "is_torch_cuda_available", "is_torch_xla_available"):
        monkeypatch.setattr(transformers.utils, name, lambda: False)
    recipe = yaml.safe_load((TINY / "sft.yaml").read_text())
    recipe.update(bf16=True, use_cpu=False)  # as a GPU recipe (recipes/gpt2-hh) has them
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert (f"recipe '{path}': 'bf16' is true, but this machine has no GPU with bfloat16: set use_cpu: true to train "
            "on the CPU (bfloat16 there runs through autocast; bf16: false for float32)") in stage_failure(
        capsys, tmp_path, "sft", recipe=path)
    recipe.pop("bf16")  # TRL's configs turn it on when the recipe leaves it out
    path.write_text(yaml.safe_dump(recipe))
    assert "bf16 (TRL's default when the recipe leaves it out) is true, but" in stage_failure(
        capsys, tmp_path, "sft", recipe=path)
    assert config.parse("sft", ["--config", str(path), "--use_cpu", "true"])[1].bf16  # what the line says to do


def test_a_renamed_key_in_a_recipe_names_the_field_not_a_look_alike(capsys, tmp_path):
    recipe = yaml.safe_load((TINY / "sft.yaml").read_text())
    recipe["torch_dtype"] = "bfloat16"  # difflib's closest known field would be torch_compile
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert f"recipe '{path}': unknown key 'torch_dtype' (the field is called 'dtype')" in stage_failure(
        capsys, tmp_path, "sft", recipe=path)


# ------------------------------------------------------------------------------------ optional integrations

@pytest.mark.parametrize("stage, flags, missing, expected", [
    ("sft", ["--report_to", "wandb"], "wandb",
     "--report_to wandb needs the wandb package, which is not installed: pip install wandb (or set report_to: none)"),
    ("ppo", [], "tensorboard", "recipe '{recipe}': 'report_to' tensorboard needs the tensorboard package"),
    ("reward", ["--report_to", "mlflow"], "mlflow", "pip install mlflow"),
    ("grpo", ["--report_to", "trackio"], "trackio", "pip install trackio"),
    ("sft", ["--deepspeed", "ds.json"], "deepspeed", "--deepspeed ds.json needs the deepspeed package, which is not "
                                                     "installed: pip install deepspeed"),
    ("dpo", ["--use_peft", "true"], "peft", "--use_peft (LoRA) needs the peft package, which is not installed: "
                                            "pip install peft"),
])
def test_an_integration_that_is_not_installed_is_named_with_what_to_install(capsys, tmp_path, monkeypatch, stage,
                                                                           flags, missing, expected):
    real = config.installed
    monkeypatch.setattr(config, "installed", lambda module: module.split(".")[0] not in (missing, "tensorboardX")
                        and real(module))
    line = stage_failure(capsys, tmp_path, stage, *flags)
    assert expected.format(recipe=TINY / f"{stage}.yaml") in line


def test_flash_attention_without_a_gpu_or_its_package_is_named(capsys, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = stage_failure(capsys, tmp_path, "sft", "--attn_implementation", "flash_attention_2")
    assert ("--attn_implementation flash_attention_2 needs a CUDA GPU, which this machine does not have: use "
            "attn_implementation: sdpa (or eager)") in line
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = config.installed
    monkeypatch.setattr(config, "installed", lambda module: module not in ("flash_attn", "kernels") and real(module))
    line = stage_failure(capsys, tmp_path, "sft", "--attn_implementation", "flash_attention_2")
    assert ("--attn_implementation flash_attention_2 needs the flash-attn package, which is not installed: pip install "
            "flash-attn --no-build-isolation (or use attn_implementation: sdpa)") in line


def test_4bit_loading_without_a_gpu_or_bitsandbytes_is_refused_when_the_recipe_is_parsed(capsys, tmp_path,
                                                                                         monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = stage_failure(capsys, tmp_path, "sft", "--use_peft", "true", "--load_in_4bit", "true")
    assert ("--load_in_4bit: 4-bit loading needs a CUDA GPU and bitsandbytes; this machine has no CUDA GPU (leave "
            "load_in_4bit out)") in line
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = config.installed
    monkeypatch.setattr(config, "installed", lambda module: module != "bitsandbytes" and real(module))
    line = stage_failure(capsys, tmp_path, "sft", "--use_peft", "true", "--load_in_8bit", "true")
    assert ("--load_in_8bit: 8-bit loading needs the bitsandbytes package, which is not installed: pip install "
            "bitsandbytes") in line


# ----------------------------------------------------------------------------------------------------- the Hub

@pytest.mark.parametrize("flags, expected", [
    (["--hub_model_id", "my model"], "hub_model_id 'my model' is not a valid Hub repo id: it has a space; an id "
                                     "takes only ASCII letters, digits, '-', '_' and '.' (e.g. my-name/tiny-ppo); "
                                     "nothing was trained or pushed"),
    (["--hub_model_id", "me/tiny/ppo"], "hub_model_id 'me/tiny/ppo' is not a valid Hub repo id: it has 2 slashes; "
                                        "an id is 'name' or 'namespace/name'"),
    (["--hub_model_id", "me/-ppo"], "'-ppo' starts or ends with '-' or '.'"),
    (["--hub_model_id", "me/" + "x" * 100], "is 100 characters long, more than 96"),
])
def test_an_invalid_hub_repo_id_is_refused_naming_why_before_training(capsys, tmp_path, micro, flags, expected):
    """hub.prepare, at the top of every stage's main (before the data and the models)."""
    assert expected in stage_failure(capsys, tmp_path, "sft", *_models("sft", micro), "--max_length", "32",
                                     "--push_to_hub", "true", *flags)


def test_an_output_folder_name_that_cannot_be_a_repo_id_is_named(capsys, tmp_path, micro):
    """Without hub_model_id the repo is named after the output folder (the Trainer's default)."""
    out = tmp_path / "my run"
    line = failure(capsys, lambda: stages.run("sft", ["--config", str(TINY / "sft.yaml"), "--output_dir", str(out),
                                                      *_models("sft", micro), "--max_length", "32",
                                                      "--push_to_hub", "true"]))
    assert (f"the output folder's name (the repo id when hub_model_id is not set; output_dir {out}) 'my run' is not "
            "a valid Hub repo id: it has a space") in line
    assert not out.exists()


def test_push_command_with_an_invalid_repo_id_says_so_instead_of_retry(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    line = failure(capsys, lambda: cli.main(["push", str(tmp_path), "--repo_id", "my model"]))
    assert "--repo_id 'my model' is not a valid Hub repo id: it has a space" in line and "retry" not in line
    assert hub.repo_id_problem("me/tiny-ppo") is None


# ------------------------------------------------------------------------------------------- reward functions

BROKEN_MODULES = {
    "rf_syntax": "def reward(prompts, completions, **kwargs):\n    return [1.0 for c in completions\n",
    "rf_name": "import math\n\nSCALE = undefined_scale * 2\n",
    "rf_raises": "WEIGHTS = {}\nDEFAULT = WEIGHTS['sentiment']\n",
    "rf_dependency": "import no_such_package_xyz\n",
}


@pytest.mark.parametrize("module, expected", [
    ("rf_syntax", r"^reward function 'rf_syntax:reward': importing rf_syntax failed: SyntaxError: "
                  r".*\(\S*rf_syntax\.py, line 2\)$"),
    ("rf_name", r"^reward function 'rf_name:reward': importing rf_name failed: NameError: name 'undefined_scale' is "
                r"not defined \(\S*rf_name\.py, line 3\)$"),
    ("rf_raises", r"^reward function 'rf_raises:reward': importing rf_raises failed: KeyError: 'sentiment' "
                  r"\(\S*rf_raises\.py, line 2\)$"),
    ("rf_dependency", r"^reward function 'rf_dependency:reward': importing rf_dependency failed: ModuleNotFoundError: "
                      r"No module named 'no_such_package_xyz' \(\S*rf_dependency\.py, line 1\)$"),
])
def test_a_reward_module_that_fails_to_import_is_named_with_its_file_and_line(tmp_path, monkeypatch, module,
                                                                               expected):
    (tmp_path / f"{module}.py").write_text(BROKEN_MODULES[module])
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=expected):
        rl.load_function(f"{module}:reward")


def test_a_stage_names_a_broken_reward_module_before_loading_any_model(capsys, tmp_path, monkeypatch, micro):
    (tmp_path / "rf_stage.py").write_text("def reward(prompts, completions, **kwargs)\n    return [0.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    line = stage_failure(capsys, tmp_path, "ppo", *_models("ppo", micro), "--max_prompt_length", "16",
                         "--response_length", "8", "--reward_functions", "rf_stage:reward")
    assert "reward function 'rf_stage:reward': importing rf_stage failed: SyntaxError: " in line  # micro has no weights


RETURNS = '''
def a_dict(prompts, completions, **kwargs):
    return {"score": [1.0] * len(completions)}

def strings(prompts, completions, **kwargs):
    return ["1.0"] * len(completions)

def huge(prompts, completions, **kwargs):
    return [1e30] * len(completions)

def fine(prompts, completions, **kwargs):
    return [-1e6, 3.0][:len(completions)]

def no_return(prompts, completions, **kwargs):
    scores = [1.0] * len(completions)
'''


@pytest.mark.parametrize("function, expected", [
    ("a_dict", r"^reward function rf_returns:a_dict returned a dict, \{'score': \[1\.0, 1\.0\]\} on a trial call "
               r"before training \(2 prompts of the dataset\): expected a list of numbers, one per completion$"),
    ("strings", r"^reward function rf_returns:strings returned \['1\.0', '1\.0'\]\.\.\.: expected a number per "
                r"completion \(on a trial call"),
    ("no_return", r"^reward function rf_returns:no_return returned a NoneType, None on a trial call before training "
                  r"\(2 prompts of the dataset\): expected a list of numbers, one per completion$"),
    ("huge", r"^reward function rf_returns:huge returned 1e\+30 on a trial call before training \(2 prompts of the "
             r"dataset\): rewards beyond \+-1e\+06 overflow the value and policy losses \(a NaN/inf loss a few steps "
             r"later\); scale it to a few units \(e\.g\. -10 to 10\); nothing was trained$"),
])
def test_a_reward_function_returning_a_dict_strings_or_absurd_values_is_named(tmp_path, monkeypatch, function,
                                                                               expected):
    from datasets import Dataset

    (tmp_path / "rf_returns.py").write_text(RETURNS)
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = Dataset.from_list([{"prompt": "Write a review of Dust."}, {"prompt": "Review The Lost River."}])
    with pytest.raises(rl.RewardFunctionError, match=expected):
        rl.trial_call(rl.load_reward_functions([f"rf_returns:{function}"]), tokenizer=None, prompts=prompts)
    rl.trial_call(rl.load_reward_functions(["rf_returns:fine"]), tokenizer=None, prompts=prompts)  # at the bound
    _, checked, _ = rl.load_reward_functions(["rf_returns:huge"])[0]
    with pytest.raises(rl.RewardFunctionError, match=r"returned 1e\+30 at update 3: .*training stopped before that "
                                                     r"update; the checkpoints already in output_dir are kept$"):
        checked(prompts=["p"], completions=["c"], step=3)
