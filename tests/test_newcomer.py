"""A new user's mistakes (docs/errors.md, rows 54 on): each gets one line naming the cause, exit code 2 (130 after
Ctrl-C), and nothing already written is touched. The stages and the command line are called in-process through
their entry points (`pipeline.stages.run`, `pipeline.cli.main`: what `scripts/<stage>.py` and `python -m pipeline`
call), so that each case costs a fraction of a second; the checks all happen before a model is loaded."""

import hashlib
import json

import pytest
import yaml

from conftest import ROOT
from pipeline import cli, stages

TINY = ROOT / "recipes" / "tiny"


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def failure(capsys, call, code=2) -> str:
    """Run `call`; it must exit with `code` printing exactly one `error:` line and no traceback: that line."""
    with pytest.raises(SystemExit) as stopped:
        call()
    assert stopped.value.code == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def stage_failure(capsys, stage, tmp_path, *argv, recipe=None) -> str:
    """A stage run into a new output_dir: the one line; the output_dir was not created."""
    out = tmp_path / "out"
    line = failure(capsys, lambda: stages.run(stage, ["--config", str(recipe or TINY / f"{stage}.yaml"),
                                                      "--output_dir", str(out), *map(str, argv)]))
    assert line.startswith(f"error: {stage}: ")
    assert not out.exists()
    return line


# ------------------------------------------------------------------------------------- recipes YAML cannot read

@pytest.mark.parametrize("text, expected", [
    ("learning_rate: [1e-4\nseed: 1\n", "is not valid YAML: expected ',' or ']', but got ':' at line 2, column 5"),
    ("learning_rate: 1e-4\n\tseed: 1\n", "is not valid YAML: found character '\\t' that cannot start any token at "
                                         "line 2, column 1"),
    ("learning_rate: 1e-4\nseed: 1\nlearning_rate: 2e-4\n", "'learning_rate' is set twice (lines 1 and 3): keep one"),
])
def test_a_recipe_that_yaml_cannot_read_is_named_with_its_line(capsys, tmp_path, text, expected):
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(text)
    line = stage_failure(capsys, "sft", tmp_path, recipe=recipe)
    assert f"recipe '{recipe}'" in line and expected in line
    assert recipe.read_text() == text


def test_the_runner_names_a_broken_recipe_before_any_stage_runs(capsys, tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    for stage in ("pretrain", "sft"):
        recipe = yaml.safe_load((TINY / f"{stage}.yaml").read_text())
        recipe["output_dir"] = str(tmp_path / "outputs" / stage)
        (folder / f"{stage}.yaml").write_text(yaml.safe_dump(recipe))
    (folder / "sft.yaml").write_text((folder / "sft.yaml").read_text() + "lr_scheduler_kwargs: {min_lr: 1e-5\n")
    line = failure(capsys, lambda: cli.main(["run", str(folder)]))
    assert f"recipe '{folder / 'sft.yaml'}' is not valid YAML" in line
    assert not (tmp_path / "outputs").exists()  # the pretrain stage, first in line, did not run


def test_the_runner_names_the_stage_a_flag_after_the_double_dash_does_not_fit(capsys, tmp_path):
    line = failure(capsys, lambda: cli.main(["run", str(TINY), "--stages", "ppo", "--results", str(tmp_path / "r.json"),
                                             "--", "--total_episodes", "64"]))
    assert line.startswith("error: pretrain stage: Some specified arguments are not used by the HfArgumentParser: "
                           "['--total_episodes', '64'] (flags after `--` go to every stage with a recipe in")
    assert not (tmp_path / "r.json").exists()


# ----------------------------------------------------------------------------- settings that train nothing or nonsense

@pytest.mark.parametrize("stage, flags, expected", [
    ("ppo", ["--total_episodes", "0"], "--total_episodes must be at least 1, got 0"),
    ("ppo", ["--response_length", "0"], "--response_length must be at least 1, got 0"),  # not TRL's max_new_tokens
    ("ppo", ["--num_mini_batches", "0"], "--num_mini_batches must be at least 1, got 0"),
    ("ppo", ["--temperature", "0"], "--temperature must be greater than 0, got 0 (it divides the logits"),
    ("ppo", ["--learning_rate=-1e-4"], "--learning_rate must be greater than 0, got -0.0001"),
    ("ppo", ["--learning_rate", "-1e-4"], "argument --learning_rate/--learning-rate: expected one argument (a negative "
                                          "value is read as a flag: write --learning_rate=-1e-4)"),
    ("ppo", ["--gamma", "1.5"], "--gamma must be between 0 and 1, got 1.5"),
    ("ppo", ["--kl_coef", "-0.1"], "--kl_coef must be at least 0, got -0.1"),
    ("grpo", ["--num_generations", "1"], "--num_generations must be at least 2, got 1 (the group's baseline"),
    ("sft", ["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be at least 1, got 0"),
    ("sft", ["--num_train_epochs", "0"], "--num_train_epochs is 0 and max_steps is not set: this would train nothing"),
    ("reward", ["--max_length", "0"], "--max_length must be at least 1, got 0"),
    ("dpo", ["--beta", "-0.1"], "--beta must be at least 0, got -0.1"),
    ("pretrain", ["--n_head", "3"], "recipe '{recipe}': 'n_embd' (128) must be a multiple of n_head (3)"),
])
def test_settings_that_train_nothing_or_nonsense_are_refused_naming_the_field(capsys, tmp_path, stage, flags,
                                                                              expected):
    line = stage_failure(capsys, stage, tmp_path, *flags)
    assert expected.format(recipe=TINY / f"{stage}.yaml") in line


def test_a_nonsense_value_in_the_recipe_names_the_recipe_and_its_field(capsys, tmp_path):
    recipe = yaml.safe_load((TINY / "ppo.yaml").read_text())
    recipe["response_length"] = 0
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert f"recipe '{path}': 'response_length' must be at least 1, got 0" in stage_failure(
        capsys, "ppo", tmp_path, recipe=path)


# ------------------------------------------------------------------------------------------ misleading messages

def test_a_stage_without_config_says_what_to_pass(capsys):
    line = failure(capsys, lambda: stages.run("sft", []))
    assert line.startswith("error: sft: no recipe given: --config RECIPE.yaml is needed, e.g. --config "
                           "recipes/tiny/sft.yaml")
    assert "bf16" not in line


def test_stage_help_is_short_and_starts_with_config(capsys):
    with pytest.raises(SystemExit) as stopped:
        stages.run("ppo", ["--help"])
    assert stopped.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: ") and "--config RECIPE.yaml" in text.splitlines()[0]
    assert len(text.splitlines()) < 60
    assert "--reward_functions" in text and "--help_all" in text  # the pipeline's fields, and where the rest are
    with pytest.raises(SystemExit):
        stages.run("ppo", ["--help_all"])
    assert len(capsys.readouterr().out.splitlines()) > 300  # every field of PPOConfig and ModelConfig


def test_debug_is_accepted_by_the_command_line_and_shows_the_traceback(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_DEBUG", "0")  # restored after the test: --debug sets it for the stages it runs
    assert "does not exist" in failure(capsys, lambda: cli.main(["run", str(tmp_path / "nope")]))
    with pytest.raises(FileNotFoundError, match="does not exist"):  # --debug: the exception itself, not one line
        cli.main(["run", str(tmp_path / "nope"), "--debug"])


@pytest.mark.parametrize("argv", [["eval", "--output", "F", "reward", "M"], ["eval", "reward", "M", "--output", "F"],
                                  ["eval", "policy", "M", "--output", "F", "--max_prompts", "2"]])
def test_eval_output_goes_before_or_after_the_subcommand(argv):
    assert cli.build_parser().parse_args(argv).output == "F"


def test_ctrl_c_in_a_stage_exits_130_in_one_line(capsys, tmp_path, monkeypatch):
    from pipeline.stages import pretrain

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "main", interrupted)
    line = failure(capsys, lambda: stages.run("pretrain", ["--config", str(TINY / "pretrain.yaml"), "--output_dir",
                                                           str(tmp_path / "out")]), code=130)
    assert line.startswith(f"error: pretrain: interrupted (Ctrl-C); the checkpoints already in {tmp_path / 'out'} are "
                           "kept and the same command resumes from the last one")


# -------------------------------------------------------------------------------- a model of the wrong kind

@pytest.mark.parametrize("stage, field, source, expected", [
    ("ppo", "reward_model_path", "sft", "is a causal language model (GPT2LMHeadModel), not a reward model: its score "
                                        "head would be random; point it at the reward stage's output_dir"),
    ("ppo", "sft_model_path", "reward", "is a reward model (GPT2ForSequenceClassification), not a causal language "
                                        "model: point it at a policy"),
    ("grpo", "reward_model_path", "sft", "is a causal language model (GPT2LMHeadModel), not a reward model"),
    ("dpo", "model_name_or_path", "reward", "is a reward model (GPT2ForSequenceClassification), not a causal "
                                            "language model"),
    ("sft", "model_name_or_path", ".", "holds no model (no config.json or adapter_config.json)"),
])
def test_a_stage_refuses_a_model_of_the_wrong_kind_for_its_role(capsys, tmp_path, tiny_run, stage, field, source,
                                                                expected):
    path = (tiny_run["outputs"] / source).resolve()
    before = snapshot(path) if source != "." else None
    line = stage_failure(capsys, stage, tmp_path, f"--{field}", path, recipe=tiny_run["recipes"] / f"{stage}.yaml")
    assert f"{field} '{path}' {expected}" in line
    if before is not None:
        assert snapshot(path) == before


@pytest.mark.parametrize("argv, expected", [
    (["eval", "reward", "{sft}"], "MODEL '{sft}' is a causal language model (GPT2LMHeadModel), not a reward model"),
    (["eval", "perplexity", "{reward}"], "MODEL '{reward}' is a reward model (GPT2ForSequenceClassification), not a "
                                         "causal language model"),
    (["eval", "policy", "{sft}", "--reward_model", "{sft}", "--max_prompts", "2"],
     "--reward_model '{sft}' is a causal language model"),
    (["chat", "{reward}"], "MODEL '{reward}' is a reward model"),
    (["generate", "{bert}", "Hello"], "MODEL '{bert}' is another kind of model (BertForMaskedLM), not a causal "
                                      "language model"),
])
def test_commands_refuse_a_model_of_the_wrong_kind(capsys, tmp_path, tiny_run, argv, expected):
    from transformers import BertConfig

    bert = tmp_path / "bert"
    BertConfig(architectures=["BertForMaskedLM"]).save_pretrained(bert)
    paths = {"sft": tiny_run["outputs"] / "sft", "reward": tiny_run["outputs"] / "reward", "bert": bert}
    line = failure(capsys, lambda: cli.main([a.format(**paths) for a in argv]))
    assert expected.format(**paths) in line


def test_a_model_kind_is_read_from_the_config_alone(tmp_path):
    from transformers import GPT2Config

    from pipeline.models import CAUSAL_LM, model_kind

    GPT2Config().save_pretrained(tmp_path / "random-gpt2")  # a bare config, as for a random GPT2Config(): no weights
    assert model_kind(str(tmp_path / "random-gpt2"))[0] == CAUSAL_LM
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"task_type": "SEQ_CLS"}))
    assert model_kind(str(tmp_path / "adapter")) == ("scalar-head", "a LoRA adapter (SEQ_CLS)")


# ------------------------------------------------------------------------------------------------- noise

def test_resume_does_not_warn_about_tied_weights_but_does_about_others():
    import logging

    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.stages.common import TiedWeightsFilter

    quiet = TiedWeightsFilter(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)))

    def record(message):
        return logging.LogRecord("transformers.trainer", logging.WARNING, __file__, 1, message, None, None)

    assert not quiet.filter(record(f"{quiet.PREFIX}['lm_head.weight']."))  # tied to wte: nothing is missing
    assert quiet.filter(record(f"{quiet.PREFIX}['lm_head.weight', 'transformer.h.0.attn.c_attn.weight']."))
    assert quiet.filter(record("There were unexpected keys in the checkpoint model loaded: ['x']."))


def test_a_routine_run_prints_no_warnings_that_are_not_the_users_to_fix(tiny_run):
    """Every stage and the evaluation, through the runner (the session's tiny run): no deprecation warnings of the
    libraries underneath, no DeepSpeed accelerator notice."""
    noise = [line for line in tiny_run["log"].splitlines()
             if any(word in line for word in ("FutureWarning", "DeprecationWarning", "UserWarning", "is deprecated",
                                              "Setting accelerator to CPU", "There were missing keys"))]
    assert not noise, "\n".join(sorted(set(noise)))
