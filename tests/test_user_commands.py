"""The commands (`python -m pipeline run | eval | generate | chat | merge ...`) given what a user gets wrong
(docs/errors.md, rows 111 to 124): one `error:` line naming the flag or path, the value and what to do, exit code 2,
nothing written; and a run that says only what is true (the rerun hint, stale figures). The command line is called
in-process (`pipeline.cli.main`) on micro GPT-2 models built here; every check happens before a model's weights
are loaded, except the context check, which needs the model's prompts."""

import json
import os
import shlex
import subprocess
import time

import pytest
import torch
import yaml
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

from conftest import TINY_OVERRIDES, write_recipes
from pipeline import cli
from pipeline.models import fit_to_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Policy and reward model on tokenizer a; a policy and reward model on another tokenizer b (128 positions)."""
    out = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    for name, text in (("a", "Write a review of The Lost River. It felt superb and moving."),
                       ("b", "Completely other words: zebra quartz fjord glyph vexing.")):
        tokenizer = train_tokenizer([text] * 40, vocab_size=300 if name == "a" else 280)
        shape = dict(vocab_size=len(tokenizer), n_layer=1, n_embd=16, n_head=2, n_positions=128,
                     bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        reward = GPT2ForSequenceClassification(GPT2Config(num_labels=1, **shape))
        reward.config.pad_token_id = tokenizer.pad_token_id
        for kind, model in (("policy", GPT2LMHeadModel(GPT2Config(**shape))), ("reward", reward)):
            fit_to_tokenizer(model, tokenizer).save_pretrained(out / f"{kind}_{name}")
            tokenizer.save_pretrained(out / f"{kind}_{name}")
    return {"policy_a": out / "policy_a", "reward_a": out / "reward_a", "policy_b": out / "policy_b",
            "reward_b": out / "reward_b"}


def failure(capsys, argv, code=2) -> str:
    """`python -m pipeline ARGV` must exit with `code` printing exactly one `error:` line, no traceback (beside
    the progress bars of what was loaded first)."""
    with pytest.raises(SystemExit) as stopped:
        cli.main([str(a) for a in argv])
    assert stopped.value.code == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------ models that do not fit

@pytest.mark.parametrize("argv, field, other", [
    (["policy", "{policy_a}", "--reward_model", "{reward_b}"], "--reward_model", "reward_b"),
    (["policy", "{policy_a}", "--reference", "{policy_b}"], "--reference", "policy_b"),
    (["compare", "{policy_a}", "{policy_b}", "--reward_model", "{reward_a}"], "OTHER", "policy_b"),
    (["compare", "{policy_a}", "{policy_a}", "--reward_model", "{reward_b}"], "--reward_model", "reward_b"),
])
def test_eval_refuses_a_model_with_another_tokenizer_naming_both(capsys, tmp_path, models, argv, field, other):
    output = tmp_path / "eval.json"
    line = failure(capsys, ["eval", "--output", output, *[a.format(**models) for a in argv], "--max_prompts", "2",
                            "--max_new_tokens", "4"])
    assert (f"{field} '{models[other]}' has another tokenizer than MODEL '{models['policy_a']}' (its vocabulary "
            "differs)") in line
    assert not output.exists()


def test_eval_refuses_lengths_beyond_an_absolute_position_context(capsys, tmp_path, models):
    output = tmp_path / "eval.json"
    line = failure(capsys, ["eval", "--output", output, "policy", models["policy_a"], "--max_prompts", "2",
                            "--max_new_tokens", "120"])
    assert (f"--max_new_tokens 120 does not fit MODEL '{models['policy_a']}': the longest prompt (58 tokens) and 120 "
            "new tokens need 178 positions, and the model has 128 (absolute position embeddings); use "
            "--max_new_tokens 70 or less") in line
    assert not output.exists()


# -------------------------------------------------------------------------------------- settings out of range

@pytest.mark.parametrize("argv, expected", [
    (["generate", "{policy_a}", "Hi", "--top_p", "1.5"], "--top_p must be greater than 0 and at most 1 (1: no "
                                                         "top-p filter), got 1.5"),
    (["chat", "{policy_a}", "--top_p", "0"], "--top_p must be greater than 0 and at most 1"),
    (["generate", "{policy_a}", "Hi", "--top_k", "-1"], "--top_k must be at least 0 (0: no top-k filter), got -1"),
    (["chat", "{policy_a}", "--temperature", "0"], "--temperature must be greater than 0, got 0.0"),
    (["generate", "{policy_a}", "Hi", "--repetition_penalty", "0"], "--repetition_penalty must be greater than 0 "
                                                                    "(1: no penalty), got 0.0"),
    (["generate", "{policy_a}", "Hi", "--strategy", "beam", "--num_beams", "0"], "--num_beams must be at least 1, "
                                                                                 "got 0"),
    (["generate", "{policy_a}", "Hi", "--num_beams", "3"], "--num_beams 3 applies to --strategy beam only, and this "
                                                           "is --strategy sample, which would ignore it"),
    (["generate", "{policy_a}", "Hi", "--strategy", "beam", "--top_p", "0.9"], "--top_p 0.9 applies to --strategy "
                                                                               "sample only"),
    (["chat", "{policy_a}", "--strategy", "greedy", "--temperature", "0.5"], "--temperature 0.5 applies to "
                                                                             "--strategy sample only"),
    (["generate", "{policy_a}", "Hi", "--max_new_tokens", "0"], "--max_new_tokens must be at least 1, got 0"),
    (["generate", "{policy_a}", "Hi", "--dtype", "float17"], "--dtype float17 is not a torch dtype: use auto"),
    (["merge", "{policy_a}", "{out}", "--dtype", "float17"], "--dtype float17 is not a torch dtype"),
    (["eval", "perplexity", "{policy_a}", "--max_texts", "0"], "--max_texts must be at least 1, got 0"),
    (["eval", "fewshot", "{policy_a}", "--shots", "0,one"], "--shots must be comma-separated integers"),
    (["eval", "policy", "{policy_a}", "--samples_per_prompt", "0"], "--samples_per_prompt must be at least 1, got 0"),
    (["eval", "policy", "{policy_a}", "--max_prompts", "0"], "--max_prompts must be at least 1, got 0"),
    (["eval", "compare", "{policy_a}", "{policy_a}", "--max_new_tokens", "0"], "--max_new_tokens must be at least 1"),
    (["eval", "policy", "{policy_a}", "--temperature", "0"], "--temperature must be greater than 0, got 0.0"),
    (["eval", "policy", "{policy_a}", "--dtype", "float17"], "--dtype float17 is not a torch dtype"),
])
def test_settings_out_of_range_are_refused_naming_flag_value_and_range(capsys, tmp_path, models, argv, expected):
    out = tmp_path / "out"
    line = failure(capsys, [a.format(out=out, **models) for a in argv])
    assert expected in line
    assert not out.exists()


# ------------------------------------------------------------------------------------- paths of the wrong kind

@pytest.mark.parametrize("argv, expected", [
    (["run", "recipes/tiny/sft.yaml"], "'recipes/tiny/sft.yaml' is a recipe file; run takes the recipe folder "
                                       "('recipes/tiny'); to run this one recipe alone: python scripts/sft.py "
                                       "--config recipes/tiny/sft.yaml"),
    (["run", "recipes/tiny/ppo-oracle.yaml"], "python scripts/ppo.py --config recipes/tiny/ppo-oracle.yaml"),
    (["eval", "suite", "recipes/tiny/sft-lora.yaml"], "is a recipe file; eval suite takes the recipe folder"),
    (["compare", "--recipes", "README.md"], "'README.md' is a file; compare --recipes takes a recipe folder"),
    (["run", "recipes/tiny", "--accelerate_config", "recipes/accelerate"], "--accelerate_config 'recipes/accelerate' "
                                                                           "is a folder; --accelerate_config takes a "
                                                                           "file"),
    (["run", "recipes/tiny", "--results", "{tmp}"], "--results '{tmp}' is a folder; --results takes a file"),
    (["eval", "--output", "{tmp}", "perplexity", "{policy_a}"], "--output '{tmp}' is a folder; --output takes a file"),
    (["generate", "{policy_a}/config.json", "Hi"], "MODEL '{policy_a}/config.json' is a file; a model is the folder "
                                                   "that holds it (e.g. '{policy_a}', a stage's output_dir)"),
    (["eval", "policy", "{policy_a}", "--reward_model", "{reward_a}/model.safetensors"],
     "--reward_model '{reward_a}/model.safetensors' is a file"),
    (["merge", "{policy_a}/config.json", "{tmp}/merged"], "ADAPTER_DIR '{policy_a}/config.json' is a file"),
    (["merge", "{policy_a}", "{policy_a}/config.json"], "OUTPUT_DIR '{policy_a}/config.json' is a file"),
    (["push", "{policy_a}/config.json", "--repo_id", "me/model"], "OUTPUT_DIR '{policy_a}/config.json' is a file"),
])
def test_a_path_of_the_wrong_kind_is_named_as_such(capsys, tmp_path, models, argv, expected):
    before = sorted(tmp_path.iterdir())
    line = failure(capsys, [a.format(tmp=tmp_path, **models) for a in argv])
    assert expected.format(tmp=tmp_path, **models) in line
    assert sorted(tmp_path.iterdir()) == before


# ------------------------------------------------------------------------------------------------ the runner

def test_a_stage_named_in_stages_without_a_recipe_is_refused_before_anything_runs(capsys, tmp_path):
    recipes = write_recipes(tmp_path / "mine", tmp_path / "outputs", {s: TINY_OVERRIDES[s] for s in ("pretrain",
                                                                                                    "ppo")})
    line = failure(capsys, ["run", recipes, "--stages", "pretrain,sft,ppo,dpo"])
    assert line == (f"error: --stages names sft, dpo, but '{recipes}' has no sft.yaml or dpo.yaml (it has: "
                    "ppo.yaml, pretrain.yaml); add the recipe (e.g. from recipes/tiny) or leave sft, dpo out of "
                    "--stages; nothing was run")
    line = failure(capsys, ["run", recipes, "--stages", "ppo", "--lora"])
    assert f"--stages names ppo, but '{recipes}' has no ppo-lora.yaml" in line
    assert not (tmp_path / "outputs").exists()


def test_the_rerun_hint_repeats_every_option_given(capsys, tmp_path):
    recipes = write_recipes(tmp_path / "my recipes", tmp_path / "outputs", {"pretrain": TINY_OVERRIDES["pretrain"]})
    recipe = yaml.safe_load((recipes / "pretrain.yaml").read_text())
    (recipes / "pretrain.yaml").write_text(yaml.safe_dump({**recipe, "dataset_name": str(tmp_path / "none.jsonl")}))
    argv = ["run", str(recipes), "--stages", "pretrain", "--results", str(tmp_path / "my results.json"), "--skip_eval",
            "--force", "--jobs", "1", "--", "--seed", "3"]
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    assert stopped.value.code == 2
    hint = capsys.readouterr().err.strip().splitlines()[-1].strip()
    assert shlex.split(hint) == ["python", "-m", "pipeline", *argv]  # the same command, quoted for the shell


def test_figures_older_than_a_stage_rerun_upstream_are_marked_stale(capsys, tmp_path, monkeypatch):
    """`cp -r recipes/tiny mine`, then `run mine --stages sft`: the reward and PPO figures of the earlier run stay in
    results.json, and the summary and the report must say that they describe models of the old SFT policy; the
    command they give reruns them. The stages are faked (each writes its model and results), the runner is real."""
    outputs = tmp_path / "outputs"
    recipes = write_recipes(tmp_path / "mine", outputs, {s: TINY_OVERRIDES[s] for s in ("sft", "reward", "ppo")})
    figures = {"sft": {"eval_perplexity": 9.0}, "reward": {"eval_accuracy": 0.8},
               "ppo": {"gold_score_ppo": 1.5, "samples": [{"prompt": "Review Dust.", "sft": "Dull.", "ppo": "Grand."}]}}

    def fake_stage(command, in_process=None, log=None, threads=None):
        stage = os.path.basename(command[command.index("--config") + 1]).removesuffix(".yaml")
        (outputs / stage).mkdir(parents=True, exist_ok=True)
        (outputs / stage / "config.json").write_text("{}")
        (outputs / stage / "results.json").write_text(json.dumps(figures[stage]))
        return cli.Child(process=subprocess.Popen(["true"]))

    monkeypatch.setattr(cli, "start", fake_stage)
    monkeypatch.setattr(cli, "_stage_in_process", lambda *args: None)
    cli.run(str(recipes), ["sft", "reward", "ppo"], evaluate=False, jobs=1)  # the earlier run of the whole chain
    earlier = time.time() - 3600
    for stage in figures:
        for name in ("config.json", "results.json"):
            os.utime(outputs / stage / name, (earlier, earlier))
    capsys.readouterr()
    figures["sft"] = {"eval_perplexity": 7.0}
    results = cli.run(str(recipes), ["sft"], evaluate=False, jobs=1, force=True)  # same recipe: only --force reruns
    out = capsys.readouterr().out
    assert "sft.eval_perplexity   7.000\n" in out and "reward.eval_accuracy  0.800 (stale)" in out
    assert "ppo.gold_score_ppo    1.500 (stale)" in out
    assert set(results["stale"]) == {"reward", "ppo"}
    assert (f"(stale) ppo: its figures are from a run of {time.strftime('%Y-%m-%d %H:%M', time.localtime(earlier))}"
            in out)
    assert f"before its sft_model_path {outputs / 'sft'} was written again (" in out
    assert f"rerun it: python -m pipeline run {recipes} --stages reward,ppo" in out
    report = (outputs / "report" / "report.md").read_text()
    assert "| reward | eval_accuracy | 0.800 (stale) |" in report and "| sft | eval_perplexity | 7.000 |" in report
    assert "- reward: its figures are from a run of" in report and "model_name_or_path" in report
    assert "## Samples: SFT and PPO (stale)" in report  # the answers too, in the report and the summary
    assert "  ppo: Grand.\n  (stale: ppo's answers are from before a stage it reads was run again)" in out
    # the command given reruns them (their recipes and the fingerprints before them are unchanged), and then no
    # mark is left behind
    results = cli.run(str(recipes), ["reward", "ppo"], evaluate=False, jobs=1)
    out = capsys.readouterr().out
    assert out.count("run: a model it reads was written after it finished") == 2
    assert "stale" not in results and "(stale)" not in out + (outputs / "report" / "report.md").read_text()


# ------------------------------------------------------------------------------------------ a new user's tries

def test_eval_suite_with_no_model_or_no_recipe_says_so(capsys, tmp_path):
    recipes = write_recipes(tmp_path / "mine", tmp_path / "outputs", {"sft": TINY_OVERRIDES["sft"]})
    line = failure(capsys, ["eval", "--output", tmp_path / "eval.json", "suite", recipes])
    assert line == (f"error: no model of '{recipes}' exists yet (none in {tmp_path / 'outputs' / 'sft'}): run "
                    f"`python -m pipeline run {recipes}` first")
    (tmp_path / "empty").mkdir()
    line = failure(capsys, ["eval", "suite", tmp_path / "empty"])
    assert f"no stage recipe in '{tmp_path / 'empty'}'" in line
    assert not (tmp_path / "eval.json").exists() and not (tmp_path / "outputs").exists()


def test_a_model_that_is_neither_a_local_folder_nor_on_the_hub_is_named(capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as without a connection, without waiting for one
    for argv, field in ((["generate", "nobody/no-such-model", "Hi"], "MODEL"),
                        (["eval", "policy", "nobody/no-such-model"], "MODEL")):
        line = failure(capsys, argv)
        assert line.startswith(f"error: {field} 'nobody/no-such-model' is not a local folder, and as a Hub id it "
                               "could not be loaded (")
        assert line.endswith("check the path (a stage's output_dir) or the Hub id and the connection")


def test_an_output_dir_after_the_double_dash_that_every_stage_would_share_is_refused(capsys, tmp_path):
    recipes = write_recipes(tmp_path / "mine", tmp_path / "outputs", {s: TINY_OVERRIDES[s] for s in ("pretrain",
                                                                                                    "sft")})
    line = failure(capsys, ["run", recipes, "--", "--output_dir", tmp_path / "mine-out"])
    assert line == (f"error: stages pretrain and sft would both write to {tmp_path / 'mine-out'} (flags after `--` go "
                    "to every stage: set output_dir in each stage's recipe instead); nothing was run")
    assert not (tmp_path / "mine-out").exists() and not (tmp_path / "outputs").exists()
