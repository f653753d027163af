"""Every stage on tiny settings, chained by the runner; checkpoints load in plain transformers."""

import json
import shutil

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from conftest import run_python

REQUIRED = {
    "reward": ["eval_accuracy"],
    "ppo": ["gold_score_sft", "gold_score_ppo", "gold_win_rate_vs_sft", "kl_to_sft", "rm_score_sft", "rm_score_ppo"],
}


def test_runner_runs_every_stage_and_collects_results(tiny_run):
    results = json.loads((tiny_run["outputs"] / "results.json").read_text())
    for stage in ("pretrain", "sft", "reward", "ppo", "grpo", "rloo", "dpo"):
        assert results[stage]["wall_seconds"] > 0
    for stage, keys in REQUIRED.items():
        for key in keys:
            assert isinstance(results[stage][key], float), (stage, key)
    assert 0 <= results["reward"]["eval_accuracy"] <= 1
    assert 0 <= results["ppo"]["gold_win_rate_vs_sft"] <= 1
    assert "gold_win_rate_vs_sft" in tiny_run["log"]  # the summary table is printed
    evaluation = results["eval"]
    assert evaluation["reward_model"]["reference"] == "oracle"
    assert set(evaluation["perplexity"]) == {"pretrain", "sft", "ppo", "grpo", "rloo", "dpo"}
    assert set(evaluation["few_shot_sentiment"]["sft"]) == {"0_shot", "1_shot", "2_shot", "chance", "majority",
                                                           "examples"}
    for stage in ("pretrain", "sft", "reward", "ppo"):  # TensorBoard by default
        assert list((tiny_run["outputs"] / stage / "runs").glob("*/events.out.tfevents.*")), stage
    report = tiny_run["outputs"] / "report"
    assert (report / "ppo_training.png").exists()
    markdown = (report / "report.md").read_text()
    assert "perplexity.ppo" in markdown and "| ppo | gold_win_rate_vs_sft |" in markdown


def test_stage3_algorithms_run_two_at_a_time_on_the_cpu(tiny_run):
    """The session's tiny run, on a CPU with 2 or more threads: the stage-3 algorithms (they read only pretrain,
    sft and reward) ran in pairs, each one's output in a log of its own and in the runner's output after it."""
    import torch

    if torch.get_num_threads() < 2:
        pytest.skip("one CPU thread: the runner runs one stage at a time")
    results = json.loads((tiny_run["outputs"] / "results.json").read_text())
    pairs = {"ppo": "grpo", "grpo": "ppo", "rloo": "dpo", "dpo": "rloo"}
    for stage, other in pairs.items():
        assert results[stage]["side_by_side_with"] == other
        log = tiny_run["outputs"] / "logs" / f"{stage}.log"
        assert f"gold_score_{stage}" in log.read_text()  # its final results, printed by the stage
        assert f"=== {stage}: ended after" in tiny_run["log"]
    for stage in ("pretrain", "sft", "reward"):
        assert "side_by_side_with" not in results[stage]
    assert "=== ppo and grpo: side by side" in tiny_run["log"]
    assert "| ppo | side_by_side_with | grpo |" in (tiny_run["outputs"] / "report" / "report.md").read_text()


def test_a_failed_stage_beside_another_keeps_the_others_results(tiny_run, tmp_path):
    """grpo fails (a reward function that does not exist) while ppo runs beside it: ppo's results and state are
    written, and the error names grpo and how to rerun from it."""
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    for stage in ("pretrain", "sft", "reward", "ppo", "grpo"):
        recipe = yaml.safe_load((tiny_run["recipes"] / f"{stage}.yaml").read_text())
        if stage in ("ppo", "grpo"):
            recipe["output_dir"] = str(tmp_path / stage)
        if stage == "grpo":
            recipe["reward_functions"] = ["pipeline.embedded:no_such_function"]
        (recipes / f"{stage}.yaml").write_text(yaml.safe_dump(recipe))
    results = tmp_path / "results.json"
    result = run_python("-m", "pipeline", "run", recipes, "--stages", "ppo,grpo", "--results", results, "--jobs", "2",
                        "--skip_eval", check=False)
    assert result.returncode != 0
    assert "stage grpo failed" in result.stderr and "--stages grpo" in result.stderr
    assert "no_such_function" in result.stdout  # grpo's own error, in its output
    written = json.loads(results.read_text())
    assert "grpo" not in written and written["ppo"]["gold_score_ppo"] is not None
    assert written["ppo"]["side_by_side_with"] == "grpo"
    state = json.loads(results.with_name("pipeline_state.json").read_text())
    assert "ppo" in state and "grpo" not in state


@pytest.mark.parametrize("stage", ["pretrain", "sft", "ppo", "grpo", "rloo", "dpo"])
def test_policy_checkpoints_load_in_plain_transformers(tiny_run, stage):
    path = tiny_run["outputs"] / stage
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    # the embedded model's GELU is PyTorch's fused tanh GELU, which GPT-2's "gelu_new" is to rounding
    assert model.config.activation_function == "gelu_pytorch_tanh"
    assert tokenizer.chat_template
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Write a review of The Lost River."}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    assert (path / "README.md").exists()  # the model card


@pytest.mark.parametrize("sub", ["reward", "ppo/value_model"])
def test_reward_and_value_models_load_with_pad_token_id(tiny_run, sub):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_run["outputs"] / sub)
    tokenizer = AutoTokenizer.from_pretrained(tiny_run["outputs"] / sub.split("/")[0])
    assert model.config.num_labels == 1
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_every_stage_reads_the_previous_stage_output(tiny_run):
    recipes = tiny_run["recipes"]
    outputs = tiny_run["outputs"]
    assert yaml.safe_load((recipes / "sft.yaml").read_text())["model_name_or_path"] == str(outputs / "pretrain")
    assert yaml.safe_load((recipes / "reward.yaml").read_text())["model_name_or_path"] == str(outputs / "sft")
    ppo = yaml.safe_load((recipes / "ppo.yaml").read_text())
    assert (ppo["sft_model_path"], ppo["reward_model_path"]) == (str(outputs / "sft"), str(outputs / "reward"))


def test_ppo_refuses_a_reward_model_with_another_tokenizer(tiny_run, tmp_path):
    reward = tmp_path / "reward"
    shutil.copytree(tiny_run["outputs"] / "reward", reward)
    config = json.loads((reward / "tokenizer_config.json").read_text())
    (reward / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (reward / "tokenizer_config.json").write_text(json.dumps(config))
    result = run_python("scripts/ppo.py", "--config", tiny_run["recipes"] / "ppo.yaml", "--reward_model_path", reward,
                        "--output_dir", tmp_path / "ppo", check=False)
    assert result.returncode == 2
    assert "reward tokenizer differs from the policy tokenizer in its chat template" in result.stderr
    assert not (tmp_path / "ppo").exists()


def test_missing_model_path_fails_in_one_line_and_keeps_earlier_results(tiny_run, tmp_path):
    recipes = tmp_path / "recipes"
    shutil.copytree(tiny_run["recipes"], recipes)
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"sft": {"eval_loss": 1.0}}))
    result = run_python("-m", "pipeline", "run", recipes, "--stages", "reward", "--results", results,
                        "--", "--model_name_or_path", str(tmp_path / "missing"), check=False)
    assert result.returncode == 2
    assert "missing' does not exist" in result.stderr and "Traceback" not in result.stderr
    assert "--stages reward" in result.stderr  # how to rerun
    assert json.loads(results.read_text()) == {"sft": {"eval_loss": 1.0}}


def test_runner_checks_every_recipe_before_training(tmp_path, tiny_run):
    recipes = tmp_path / "recipes"
    shutil.copytree(tiny_run["recipes"], recipes)
    ppo = yaml.safe_load((recipes / "ppo.yaml").read_text())
    ppo["kl_coeff"] = 0.1
    (recipes / "ppo.yaml").write_text(yaml.safe_dump(ppo))
    result = run_python("-m", "pipeline", "run", recipes, check=False)
    assert result.returncode == 2 and "kl_coeff" in result.stderr
    assert "=== [1/4]" not in result.stdout  # nothing ran


def test_ls_and_cp(tmp_path):
    listing = run_python("-m", "pipeline", "ls").stdout
    assert "tiny" in listing and "gpt2-hh" in listing
    run_python("-m", "pipeline", "cp", "tiny", tmp_path / "mine")
    assert (tmp_path / "mine" / "ppo.yaml").exists()
    again = run_python("-m", "pipeline", "cp", "tiny", tmp_path / "mine", check=False)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_rerun_skips_finished_stages_and_reruns_a_changed_one(tmp_path):
    from conftest import write_recipes

    recipes = write_recipes(tmp_path / "recipes", tmp_path / "outputs")
    outputs = tmp_path / "outputs"
    first = run_python("-m", "pipeline", "run", recipes, "--stages", "pretrain,sft", "--skip_eval").stdout
    assert first.count("run: not run yet") == 2
    again = run_python("-m", "pipeline", "run", recipes, "--stages", "pretrain,sft", "--skip_eval").stdout
    assert again.count("skip: finished with this recipe") == 2
    assert "train_runtime" not in again  # nothing trained
    # a flag that only changes what is shown does not rerun anything
    quiet = run_python("-m", "pipeline", "run", recipes, "--stages", "pretrain,sft", "--skip_eval",
                       "--", "--report_to", "none").stdout
    assert quiet.count("skip: ") == 2
    sft = yaml.safe_load((recipes / "sft.yaml").read_text())
    sft["learning_rate"] = sft["learning_rate"] / 2
    (recipes / "sft.yaml").write_text(yaml.safe_dump(sft))
    changed = run_python("-m", "pipeline", "run", recipes, "--stages", "pretrain,sft", "--skip_eval").stdout
    assert "pretrain" in changed and changed.count("skip: ") == 1
    assert "run: its recipe changed (learning_rate); the previous output was moved to" in changed
    moved = list(outputs.glob("sft.replaced-*"))
    assert len(moved) == 1 and (moved[0] / "model.safetensors").exists()
    assert (outputs / "sft" / "model.safetensors").exists()
    forced = run_python("-m", "pipeline", "run", recipes, "--stages", "pretrain", "--skip_eval", "--force").stdout
    assert "run: forced" in forced


def test_an_upgrade_that_adds_fields_at_their_defaults_does_not_rerun_a_stage(tmp_path):
    """A newer pipeline, TRL or transformers adds config fields: a finished stage whose recorded recipe lacks them,
    and whose other fields are unchanged, is still finished; a new field set to another value, or a changed one,
    reruns it, named. A run recorded before the state kept recipes is compared with the recipe.yaml it saved."""
    from pipeline import cli
    from pipeline.config import parse

    parsed = parse("sft", ["--config", "recipes/tiny/sft.yaml", "--output_dir", str(tmp_path / "sft")])
    recipe, defaults = cli.recipe_of(parsed), cli.defaults_of(parsed)
    older = {k: v for k, v in recipe.items() if k not in ("overlong_rows", "packed_batch_layout")}  # at defaults
    assert recipe["overlong_rows"] == defaults["overlong_rows"] and "packed_batch_layout" in defaults
    fingerprints = {"sft": cli.fingerprint(parsed)}

    def plan(recorded, new=recipe):
        output = tmp_path / "sft"
        output.mkdir(exist_ok=True)
        (output / "results.json").write_text("{}")
        done = {"fingerprint": "an older one", "upstream": {}, **({"recipe": recorded} if recorded else {})}
        return cli.plan_stage("sft", fingerprints, {"sft": done}, str(output), force=False, recipe=new,
                              defaults=defaults)

    assert plan(older)[0] == "skip"
    assert cli.recipe_changes(older, {**recipe, "overlong_rows": "drop"}, defaults) == ["overlong_rows"]
    action, why = plan(older, {**recipe, "learning_rate": 1e-5})
    assert action == "run" and why.startswith("its recipe changed (learning_rate); the previous output was moved")
    assert cli.recipe_changes({**older, "a_field_dropped_since": 1}, recipe, defaults) == []
    import yaml

    (tmp_path / "sft").mkdir(exist_ok=True)
    (tmp_path / "sft" / "recipe.yaml").write_text(yaml.safe_dump(older))  # no recipe in the state: the file's
    assert plan(None)[0] == "skip"
    (tmp_path / "sft" / "recipe.yaml").unlink()
    action, why = plan(None)
    assert action == "run" and why.startswith("its recipe changed; the previous output was moved")


def test_reward_stage_with_every_pair_too_long_says_so(tiny_run, tmp_path):
    result = run_python("scripts/reward.py", "--config", tiny_run["recipes"] / "reward.yaml", "--max_length", "8",
                        "--output_dir", tmp_path / "reward", check=False)
    assert result.returncode == 2
    assert "every training pair is longer than max_length=8 tokens" in result.stderr
