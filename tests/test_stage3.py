"""GRPO, RLOO and DPO beside PPO: each a stage of the runner (tiny_run runs them after the chain, from the same SFT
policy and reward model), evaluated against the SFT policy under the same keys as PPO, with the gold score in its
parts; bad inputs (a DPO dataset without pairs, a GRPO recipe without a reward, a reward function that misbehaves)
answered in one line, nothing written; and `python -m pipeline compare`."""

import json
import math

import pytest
import yaml

from conftest import ROOT, run_python
from pipeline import compare, embedded
from pipeline.embedded import world

STAGE3 = ("ppo", "grpo", "rloo", "dpo")
TERMS = [f"gold_{t}" for t in world.GOLD_TERMS]


def results_of(tiny_run, stage):
    return json.loads((tiny_run["outputs"] / stage / "results.json").read_text())


@pytest.mark.parametrize("stage", STAGE3)
def test_every_stage3_algorithm_is_evaluated_against_sft_under_the_same_keys(tiny_run, stage):
    results = results_of(tiny_run, stage)
    for name in (stage, "sft"):
        for key in ("gold_score", "rm_score", "eos_rate", "response_length", "distinct_1", "title_only_rate", *TERMS):
            assert isinstance(results[f"{key}_{name}"], float), (stage, key, name)
        # the parts add up to the whole, for every policy
        assert sum(results[f"{t}_{name}"] for t in TERMS) == pytest.approx(results[f"gold_score_{name}"])
        assert 0 <= results[f"title_only_rate_{name}"] <= 1
    for key in ("gold_win_rate_vs_sft", "rm_win_rate_vs_sft"):
        assert 0 <= results[key] <= 1
    assert math.isfinite(results["kl_to_sft"])
    assert results["eval_prompts"] == 8
    assert results["samples"] and set(results["samples"][0]) == {"prompt", stage, "sft"}
    # the runner collected it, and the report shows its terms and samples
    run = json.loads((tiny_run["outputs"] / "results.json").read_text())
    assert run[stage]["gold_score_" + stage] == results["gold_score_" + stage]
    report = (tiny_run["outputs"] / "report" / "report.md").read_text()
    assert f"| {stage} | gold_win_rate_vs_sft |" in report and f"## Samples: SFT and {stage.upper()}" in report
    assert "## The gold score in its parts" in report and "| asked_title |" in report


def test_the_sft_side_is_the_same_policy_on_the_same_prompts_for_every_algorithm(tiny_run):
    """The same SFT policy, prompts and seed: the SFT figures agree across algorithms, so their results compare."""
    sft = {stage: results_of(tiny_run, stage)["gold_score_sft"] for stage in STAGE3}
    assert len(set(sft.values())) == 1, sft


@pytest.mark.parametrize("stage,trainer", [("grpo", "GRPOTrainer"), ("rloo", "RLOOTrainer"), ("dpo", "DPOTrainer")])
def test_stage3_card_recipe_and_stage_file(tiny_run, stage, trainer):
    out = tiny_run["outputs"] / stage
    card = (out / "README.md").read_text()
    assert f"Stage **{stage}**" in card and f"TRL `{trainer}`" in card
    assert str(tiny_run["outputs"] / "reward") in card  # the reward model it trained against (DPO: scored with)
    assert "| learning_rate |" in card and "gold_win_rate_vs_sft" in card
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["model_name_or_path"] == str(tiny_run["outputs"] / "sft")
    assert json.loads((out / "pipeline_stage.json").read_text()) == {"stage": stage}
    if stage != "dpo":  # TRL's reward_weights, built from the pipeline's weights (reward model first)
        assert recipe["reward_weights"] == [1.0]


def test_gold_terms_sum_to_the_gold_score():
    ask = "Write a review of The Lost River."
    for answer in ("", "The Lost River is a wonderful drama. I loved it.", "The Iron Crown is dull. It is dull. It is dull",
                   "The Lost River is not boring. The Wild Harbor is very moving."):
        terms = embedded.gold_terms(ask, answer)
        assert set(terms) == set(world.GOLD_TERMS)
        assert sum(terms.values()) == embedded.gold_score(ask, answer)
    # 4 sentences of -1 (capped at -3), the wrong title, "It is dull." twice (one repeat), no final stop
    terms = embedded.gold_terms(ask, "The Iron Crown is dull. It is dull. It is dull. It is dull")
    assert terms == {"sentiment": -3.0, "asked_title": -1.0, "other_titles": -1.0, "repeated_sentences": -1.0,
                     "unfinished": -1.0, "rambling": 0.0, "empty": 0.0}
    assert embedded.gold_terms(ask, "  ") == {**dict.fromkeys(world.GOLD_TERMS, 0.0), "empty": -2.0}
    means = embedded.ORACLE.term_means([ask, ask], ["The Lost River is superb.", "The Lost River and The Iron Crown."])
    assert means["title_only_rate"] == 0.5 and means["gold_other_titles"] == -0.5


# ------------------------------------------------------------------------------------------------ bad inputs

def stage_run(tiny_run, stage, output_dir, *flags, recipe=None):
    return run_python(f"scripts/{stage}.py", "--config", recipe or tiny_run["recipes"] / f"{stage}.yaml",
                      "--output_dir", output_dir, "--report_to", "none", *flags, check=False)


def one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_dpo_on_a_dataset_without_pairs_fails_in_one_line(tiny_run, tmp_path):
    out = tmp_path / "dpo"
    result = stage_run(tiny_run, "dpo", out, "--dataset_name", "embedded:prompt")
    one_line_error(result, "error: dpo:", "embedded:prompt", "'chosen'+'rejected'")
    assert not out.exists() or not any(out.iterdir())


def test_grpo_without_a_reward_fails_in_one_line_before_loading(tiny_run, tmp_path):
    recipe = yaml.safe_load((tiny_run["recipes"] / "grpo.yaml").read_text())
    del recipe["reward_model_path"]
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "grpo"
    result = stage_run(tiny_run, "grpo", out, recipe=path)
    one_line_error(result, "grpo has no reward", "reward_model_path", "reward_functions")
    assert not out.exists() or not any(out.iterdir())


def test_rloo_with_reward_weights_set_directly_is_refused(tiny_run, tmp_path):
    result = stage_run(tiny_run, "rloo", tmp_path / "rloo", "--reward_weights", "2.0")
    one_line_error(result, "reward_model_weight and reward_function_weights, not reward_weights")


@pytest.mark.parametrize("function,expected", [
    ("reward_fns:wrong_count", "reward function reward_fns:wrong_count returned 1 values for 2 completions on a trial "
                               "call before training"),
    ("reward_fns:raises_after_trial", "reward function reward_fns:raises_after_trial raised KeyError: 'sentiment' at "
                                      "update 1 (tests/reward_fns.py, line"),
])
def test_a_reward_function_that_misbehaves_is_named(tiny_run, tmp_path, function, expected):
    import os

    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    result = run_python("scripts/grpo.py", "--config", tiny_run["recipes"] / "grpo.yaml", "--output_dir",
                        tmp_path / "grpo", "--report_to", "none", "--reward_functions", function, check=False, env=env)
    one_line_error(result, expected)


def test_grpo_rewarded_by_a_function_alone_trains_and_is_still_scored_by_the_reward_model(tiny_run, tmp_path):
    out = tmp_path / "grpo"
    result = stage_run(tiny_run, "grpo", out, "--reward_functions", "pipeline.embedded:gold_reward",
                       "--reward_model_weight", "0", "--max_steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert "rm_score_grpo" in results  # the reward model scores the evaluation though training ignored it
    assert yaml.safe_load((out / "recipe.yaml").read_text())["reward_weights"] == [1.0]  # the function alone
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert any("rewards/gold_reward/mean" in row for row in history)


# ------------------------------------------------------------------------------------------------ compare

def test_compare_summarises_seeds_and_writes_the_table_and_plots(tiny_run, tmp_path):
    """Two algorithms x two seeds on tiny settings: a row per run, mean and spread per algorithm, the markdown
    table with the gold terms and the budget, and both plots."""
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    for name in ("pretrain", "sft", "reward", "grpo", "dpo"):
        (recipes / f"{name}.yaml").write_text((tiny_run["recipes"] / f"{name}.yaml").read_text())
    markdown = tmp_path / "comparison.md"
    result = run_python("-m", "pipeline", "compare", "--recipes", recipes, "--seeds", "1,2", "--algorithms",
                        "grpo,dpo", "--output_dir", tmp_path / "runs", "--markdown", markdown, "--plots_dir",
                        tmp_path / "plots", "--", "--max_steps", "2")
    # the chain is reused as it is, not retrained (the overrides after -- are for the algorithms' runs)
    assert result.stdout.count("skip: finished with this recipe") == 3, result.stdout[-3000:]
    data = json.loads(markdown.with_suffix(".json").read_text())
    assert [(r["algorithm"], r["seed"]) for r in data["runs"]] == [("grpo", 1), ("grpo", 2), ("dpo", 1), ("dpo", 2)]
    for row in data["runs"]:
        assert row["wall_seconds"] > 0 and row["peak_rss_mb"] > 100 and row["train_seconds"] > 0
        assert row["units"] == (2 * 8 // 2 if row["algorithm"] == "grpo" else 2 * 8)  # 2 steps x 8 (/2 passes)
        assert row["unit"] == ("episodes" if row["algorithm"] == "grpo" else "pairs")
        assert sum(row[t] for t in TERMS) == pytest.approx(row["gold_score"])
    for algorithm in ("grpo", "dpo"):
        runs = [r["gold_score"] for r in data["runs"] if r["algorithm"] == algorithm]
        figure = data["summary"][algorithm]["gold_score"]
        assert figure["n"] == 2 and figure["min"] == min(runs) and figure["max"] == max(runs)
        assert figure["mean"] == pytest.approx(sum(runs) / 2)
    text = markdown.read_text()
    assert "| gold score |" in text and "| asked_title |" in text and "## Budget" in text
    assert "GRPO (`" in text and "DPO (`" in text
    for plot in ("gold_vs_kl.png", "gold_vs_time.png"):
        assert (tmp_path / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{plot}" in text

    # a second call reruns nothing and writes the same rows
    again = run_python("-m", "pipeline", "compare", "--recipes", recipes, "--seeds", "1,2", "--algorithms",
                       "grpo,dpo", "--output_dir", tmp_path / "runs", "--markdown", markdown, "--plots_dir",
                       tmp_path / "plots", "--note", "Measured on a shared machine.", "--", "--max_steps", "2")
    assert "=== compare: grpo, seed" not in again.stdout
    assert "Measured on a shared machine. Seeds 1, 2" in markdown.read_text()
    assert json.loads(markdown.with_suffix(".json").read_text())["runs"] == data["runs"]
    assert f"its runs took {sum(r['wall_seconds'] for r in data['runs']) / 60:.0f} min in all" in markdown.read_text()

    # a recipe changed since: its runs are moved aside and run again, the others kept
    grpo = yaml.safe_load((recipes / "grpo.yaml").read_text())
    (recipes / "grpo.yaml").write_text(yaml.safe_dump({**grpo, "beta": grpo.get("beta", 0.0) + 0.05}))
    changed = run_python("-m", "pipeline", "compare", "--recipes", recipes, "--seeds", "1", "--algorithms",
                         "grpo,dpo", "--output_dir", tmp_path / "runs", "--markdown", markdown, "--plots_dir",
                         tmp_path / "plots", "--", "--max_steps", "2")
    assert "=== compare: grpo, seed 1" in changed.stdout and "=== compare: dpo" not in changed.stdout
    assert "ran from another recipe, SFT policy or reward model: moved to" in changed.stdout
    aside = sorted(p.name for p in (tmp_path / "runs" / "grpo").glob("seed-1.replaced-*"))
    assert len(aside) == 2 and aside[1] == aside[0] + ".inputs.json"  # the old run and what it ran from
    rerun = json.loads(markdown.with_suffix(".json").read_text())["runs"]
    assert rerun[1] == data["runs"][2]  # dpo, seed 1: the same run, not rerun


def test_compare_refuses_an_unknown_algorithm_and_a_missing_recipe(tmp_path):
    result = run_python("-m", "pipeline", "compare", "--algorithms", "ppo,trpo", check=False)
    assert result.returncode == 2 and "unknown algorithm(s) ['trpo']" in result.stderr
    result = run_python("-m", "pipeline", "compare", "--recipes", tmp_path, "--algorithms", "dpo", check=False)
    assert result.returncode == 2 and "dpo.yaml" in result.stderr


def test_summarise_takes_mean_and_spread_over_seeds():
    rows = [{"algorithm": "ppo", "seed": 1, "gold_score": 1.0, "unit": "episodes"},
            {"algorithm": "ppo", "seed": 2, "gold_score": 2.0, "unit": "episodes"},
            {"algorithm": "dpo", "seed": 1, "gold_score": -1.0}]
    summary = compare.summarise(rows)
    assert summary["ppo"]["gold_score"] == {"mean": 1.5, "min": 1.0, "max": 2.0, "n": 2}
    assert summary["dpo"]["gold_score"]["n"] == 1 and "seed" not in summary["ppo"]
    assert compare._cell(summary["ppo"]["gold_score"]) == "1.50 (1.00 to 2.00)"
    assert compare._cell(summary["dpo"]["gold_score"]) == "-1.00"


def test_grpo_and_rloo_score_through_a_tokenizer_that_keeps_the_end_of_a_long_text(tiny_run):
    """TRL's GRPO/RLOO re-tokenize prompt + answer for the reward model without truncation; the pipeline's reward
    tokenizer cuts from the left to the reward model's positions, so the answer's end is what it scores."""
    from transformers import AutoTokenizer

    from pipeline.stages.group import left_truncating

    tokenizer = AutoTokenizer.from_pretrained(tiny_run["outputs"] / "reward")
    text = " ".join(f"The film number {i} was superb." for i in range(60)) + " The end."
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    cut = left_truncating(tokenizer, 32)
    batch = cut(text=[text, "Short."], return_tensors="pt", padding=True, padding_side="right",
                add_special_tokens=False)
    assert len(whole) > 32 and batch["input_ids"].shape == (2, 32)
    assert batch["input_ids"][0].tolist() == whole[-32:]
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == whole  # the original is left as it was
