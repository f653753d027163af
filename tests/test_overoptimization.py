"""Reward hacking you can see: the biased raters, the oracle's rambling term, the alarms (pipeline/monitor.py), the
over-optimisation curve and keep_best, the reward ensemble and the length-penalty defence."""

import json
import random

import pytest
import torch
import yaml

from conftest import ROOT, run_python
from pipeline import rl
from pipeline.embedded import build, generate, world
from pipeline.monitor import Alarms, Monitor, pearson
from test_rl import ppo, updates


def _pairs(**bias):
    train, _ = generate._prompts(0)
    return generate._rows("preference", train, 1500, random.Random(7), noisy=True, **bias)


def _longer_chosen(rows) -> float:
    return sum(generate.words(r["chosen"][-1]["content"]) > generate.words(r["rejected"][-1]["content"])
               for r in rows) / len(rows)


def test_biased_raters_prefer_longer_and_repeated_answers_and_leave_the_held_out_pairs_alone():
    fair, long_biased, repeat_biased = _pairs(), _pairs(length_bias=0.3), _pairs(repeat_bias=3.0)
    assert _longer_chosen(long_biased) > _longer_chosen(fair) + 0.1

    def repeated_chosen(rows):
        differ = [r for r in rows if generate.repeats(r["chosen"][-1]["content"])
                  != generate.repeats(r["rejected"][-1]["content"])]
        return sum(generate.repeats(r["chosen"][-1]["content"]) > generate.repeats(r["rejected"][-1]["content"])
                   for r in differ) / len(differ)
    assert repeated_chosen(fair) < 0.4 < 0.6 < repeated_chosen(repeat_biased)
    # held-out pairs stay ordered by the oracle; other kinds ignore the bias; a negative bias is refused
    assert build("preference", 0, ("test",), length_bias=0.3)["test"][:50] == build("preference", 0, ("test",))["test"][:50]
    assert build("prompt", 0, length_bias=0.3)["train"][:5] == build("prompt", 0)["train"][:5]
    with pytest.raises(ValueError, match="embedded_length_bias must be >= 0"):
        build("preference", 0, length_bias=-1)


def test_the_oracle_penalises_rambling_beyond_five_distinct_sentences_and_no_default_review():
    prompt = "Write a review of The Wild River."
    five = "The Wild River is a superb drama. It felt delightful. I loved it. The music was brilliant. Go and see it."
    six = five + " The cast was charming."
    assert world.gold_terms(prompt, five)["rambling"] == 0
    assert world.gold_terms(prompt, six)["rambling"] == -0.5
    assert world.gold_score(prompt, six) == world.gold_score(prompt, five) - 0.5  # sentiment is capped already
    assert world.gold_terms(prompt, five + " I loved it.")["rambling"] == 0  # a repeat costs its own point only
    # no review of the default world is long enough to ramble
    rng = random.Random(0)
    assert all(world.gold_terms("", world.review("The Wild River", rng))["rambling"] == 0 for _ in range(2000))


def test_alarms_fire_after_patience_and_stay_quiet_below_their_thresholds():
    alarms = Alarms(patience=3)
    quiet = alarms.observe(1, torch.arange(8.0) + 6, torch.arange(8.0).flip(0), torch.randn(3, 8))
    assert quiet["alarm/length_drift"] == 1.0 and quiet["alarm/reward_length_correlation"] == pytest.approx(-1.0)
    assert quiet["alarm/ensemble_disagreement"] == pytest.approx(1.0)
    for step in (2, 3):  # twice as long, the reward tracks length: two batches are not yet an alarm
        lengths = torch.arange(8.0) + 17
        alarms.observe(step, lengths, lengths * 2)
    assert alarms.fired == {}
    alarms.observe(4, torch.arange(8.0) + 17, torch.arange(8.0))
    assert alarms.fired == {"length_drift": 4, "reward_length_correlation": 4}
    calm = Alarms()
    for step in range(1, 20):
        calm.observe(step, torch.full((8,), 10.0) + torch.randn(8), torch.randn(8))
    assert calm.fired == {}
    restored = Alarms()
    restored.load_state_dict(json.loads(json.dumps(alarms.state_dict())))
    assert restored.results()["alarms"] == ["length_drift", "reward_length_correlation"]
    assert restored.baseline["sft_length"] == 9.5
    assert pearson(torch.arange(5.0), torch.arange(5.0)) == pytest.approx(1.0)
    # every answer of one length (all cut at the limit): no correlation to log, and no None for the loggers
    same = Alarms().observe(1, torch.full((8,), 96.0), torch.randn(8))
    assert "alarm/reward_length_correlation" not in same and same["alarm/length_drift"] == 1.0


def test_monitor_keeps_the_curve_peak_and_puts_the_best_policy_back(tmp_path):
    policy = torch.nn.Linear(2, 1)
    figures = iter([{"gold_score": 0.0, "rm_score": 0.0, "kl_to_sft": 0.0},
                    {"gold_score": 3.0, "rm_score": 2.0, "heldout_rm_score": 1.5, "kl_to_sft": 2.0},
                    {"gold_score": 2.0, "rm_score": 3.0, "heldout_rm_score": 1.0, "kl_to_sft": 4.0}])
    monitor = Monitor(str(tmp_path), curve_steps=5, evaluate=lambda: next(figures), policy=lambda: policy,
                      keep_best=True)
    monitor.add_point(0)
    with torch.no_grad():
        policy.weight.fill_(1.0)
    monitor.add_point(5)  # the best held-out reward: its weights are kept
    with torch.no_grad():
        policy.weight.fill_(2.0)
    monitor.add_point(10)
    monitor.restore_best()
    assert torch.equal(policy.weight, torch.ones_like(policy.weight))
    results = monitor.results()
    assert (results["gold_score_peak"], results["gold_score_peak_step"], results["best_step"]) == (3.0, 5, 5)
    assert [p["step"] for p in results["curve"]] == [0, 5, 10]
    (tmp_path / "checkpoint-10").mkdir()
    monitor.write(str(tmp_path / "checkpoint-10"))
    resumed = Monitor(str(tmp_path), curve_steps=5, keep_best=True)
    resumed.resume(str(tmp_path / "checkpoint-10"))
    assert resumed.results() == results
    with pytest.raises(ValueError, match="keep_best needs curve_steps"):
        Monitor(str(tmp_path), keep_best=True)


def test_the_length_penalty_defence_is_a_reward_function():
    [(name, function, weight)] = rl.load_reward_functions(["pipeline.rl:answer_words"], [-0.1])
    assert weight == -0.1
    assert function(prompts=["a", "b"], completions=["one two three", ""]) == [3.0, 0.0]


BIASED = ROOT / "recipes" / "tiny-biased"


@pytest.fixture(scope="module")
def biased_runs(tiny_run, tmp_path_factory):
    """The shipped recipes/tiny-biased reward recipe (its biased raters and its ensemble of 3) and every PPO recipe
    of the folder (undefended, each defence, the oracle ceiling), each with only the model swapped for the tiny
    run's and the budget cut to a few steps."""
    base = tmp_path_factory.mktemp("biased")
    sft = tiny_run["outputs"] / "sft"
    run_python("scripts/reward.py", "--config", BIASED / "reward.yaml", "--model_name_or_path", sft, "--output_dir",
               base / "reward", "--max_steps", "6", "--max_length", "64", "--report_to", "none", "--disable_tqdm",
               "true")
    logs = {}
    for recipe in sorted(BIASED.glob("ppo*.yaml")):
        result = run_python("scripts/ppo.py", "--config", recipe, "--sft_model_path", sft, "--reward_model_path",
                            base / "reward", "--output_dir", base / recipe.stem, "--total_episodes", "64",
                            "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2",
                            "--response_length", "16", "--curve_steps", "2", "--save_steps", "2", "--logging_steps",
                            "1", "--eval_max_prompts", "8", "--eval_samples_per_prompt", "1", "--report_to", "none",
                            "--disable_tqdm", "true")
        logs[recipe.stem] = result.stdout + result.stderr
    return {"base": base, "logs": logs}


def _results(biased_runs, name: str) -> dict:
    return json.loads((biased_runs["base"] / name / "results.json").read_text())


def test_the_biased_reward_recipe_trains_an_ensemble(biased_runs):
    reward = biased_runs["base"] / "reward"
    assert sorted(p.name for p in (reward / "ensemble").iterdir()) == ["member-1", "member-2"]
    results = _results(biased_runs, "reward")
    assert 0 <= results["ensemble_member_2_eval_accuracy"] <= 1 and results["ensemble_size"] == 3


def test_every_biased_ppo_recipe_writes_its_curve_and_alarms(biased_runs):
    for name in ("ppo", "ppo-kl", "ppo-length", "ppo-ensemble", "ppo-best", "ppo-oracle", "ppo-kl-ensemble"):
        results = _results(biased_runs, name)
        assert (biased_runs["base"] / name / "model.safetensors").is_file(), name  # saved as test_shipped_recipes checks
        assert [p["step"] for p in results["curve"]] == [0, 2, 4, 6, 8], name  # 4 updates of 2 steps
        assert {"gold_score", "kl_to_sft", "response_length"} <= set(results["curve"][1]), name
        assert results["curve"][0]["kl_to_sft"] == 0, name
        assert results["gold_score_peak"] == max(p["gold_score"] for p in results["curve"]), name
        assert isinstance(results["alarms"], list), name
        for key in ("gold_score_ppo", "rm_score_ppo", "response_length_ppo", "response_length_sft"):
            assert isinstance(results[key], float), (name, key)
    monitored = _results(biased_runs, "ppo")
    assert "heldout_rm_score" in monitored["curve"][1]  # the two members it is not trained against
    rows = updates(biased_runs["base"] / "ppo")
    assert all("alarm/ensemble_disagreement" in row and "alarm/length_drift" in row for row in rows)
    assert rows[0]["alarm/ensemble_disagreement"] == pytest.approx(1.0)  # the first rollouts are the baseline
    saved = json.loads((biased_runs["base"] / "ppo" / "checkpoint-8" / "monitor.json").read_text())  # the last kept
    assert saved["alarms"]["baseline"]["sft_length"] > 0 and [p["step"] for p in saved["curve"]] == [0, 2, 4, 6, 8]


def test_each_defence_changes_what_it_says(biased_runs):
    base = biased_runs["base"]
    assert all("objective/ensemble_std" in row for row in updates(base / "ppo-ensemble"))
    assert all("objective/ensemble_std" in row for row in updates(base / "ppo-kl-ensemble"))
    assert all("objective/ensemble_std" not in row for row in updates(base / "ppo"))
    assert all(row["rewards/answer_words"] > 0 for row in updates(base / "ppo-length"))
    assert _results(biased_runs, "ppo-best")["best_step"] in (0, 2, 4, 6, 8)
    assert "keep_best: the policy of step" in biased_runs["logs"]["ppo-best"]
    for name in ("ppo-kl", "ppo-kl-ensemble"):  # the recipe's coefficient throughout
        kl = [row["objective/kl_coef"] for row in updates(base / name)]
        assert kl == pytest.approx([yaml.safe_load((BIASED / f"{name}.yaml").read_text())["kl_coef"]] * len(kl))
        assert kl[0] > 0, name
    assert [row["objective/kl_coef"] for row in updates(base / "ppo")] == [0.0] * len(kl)
    oracle = updates(base / "ppo-oracle")
    assert all("rewards/gold_reward" in row for row in oracle)


def test_alarms_warn_in_one_line_and_ensemble_settings_are_checked(tiny_run, tmp_path):
    result = ppo(tiny_run, tmp_path / "drift", "--alarm_length_drift", "0.01")
    assert "length_drift" in json.loads((tmp_path / "drift" / "results.json").read_text())["alarms"]
    assert "alarm length_drift at step" in result.stdout + result.stderr
    refused = ppo(tiny_run, tmp_path / "refused", "--reward_ensemble", "mean", check=False)
    assert refused.returncode == 2
    assert "reward_ensemble needs the reward model's ensemble" in refused.stderr.strip().splitlines()[-1]
    no_curve = ppo(tiny_run, tmp_path / "no_curve", "--keep_best", "true", check=False)
    assert no_curve.returncode == 2 and "keep_best needs curve_steps" in no_curve.stderr.strip().splitlines()[-1]


def test_grpo_logs_the_alarms_and_the_curve(tiny_run, tmp_path):
    out = tmp_path / "grpo"
    run_python("scripts/grpo.py", "--config", tiny_run["recipes"] / "grpo.yaml", "--output_dir", out,
               "--report_to", "none", "--curve_steps", "2")
    results = json.loads((out / "results.json").read_text())
    assert [p["step"] for p in results["curve"]] == [0, 2, 4] and isinstance(results["alarms"], list)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert any("alarm/length_drift" in row and "alarm/reward_length_correlation" in row for row in history)
    assert (out / "checkpoint-4" / "monitor.json").is_file()  # the last checkpoint kept
