"""RLHF works, as a measured fact: the demo's chain (recipes/tiny, unchanged but for output paths: pretrain,
SFT, reward model, PPO, and PPO on the oracle itself as the ceiling) judged by the gold oracle. Every figure is
the oracle's judgement of sampled answers to held-out prompts (pipeline.embedded); the thresholds are the
targets of issue 14. This is the slowest test (the whole demo, about five minutes on 2 cores). GRPO's, RLOO's
and DPO's learning figures come from `make compare` (bench/results/comparison.md, 3 seeds each);
tests/test_stage3.py runs them on tiny settings."""

import json

from conftest import run_python, write_recipes

DEMO = ("pretrain", "sft", "reward", "ppo", "ppo-oracle")


def test_demo_learns_what_the_oracle_prefers(tmp_path):
    recipes = write_recipes(tmp_path / "recipes", tmp_path / "outputs", overrides={stage: {} for stage in DEMO})
    run_python("-m", "pipeline", "run", recipes, "--skip_eval", timeout=2400)  # the default chain: make demo's
    results = json.loads((tmp_path / "outputs" / "results.json").read_text())
    assert set(DEMO) <= set(results)
    # The reward model learned from noisy labels agrees with the noise-free oracle on held-out pairs, and on
    # pairs where only the film's title differs.
    assert results["reward"]["eval_accuracy"] >= 0.90
    assert results["reward"]["eval_title_only_accuracy"] >= 0.90
    # PPO, which only saw the learned reward model, answers about the film that was asked, positively, without
    # repeating itself, and beats the SFT policy on almost every prompt.
    ppo = results["ppo"]
    assert ppo["gold_score_ppo"] >= 2.5
    assert ppo["gold_win_rate_vs_sft"] >= 0.95
    assert ppo["title_only_rate_ppo"] >= 0.90
    assert ppo["repeat_rate_ppo"] <= 0.05
    assert ppo["rm_score_ppo"] > ppo["rm_score_sft"]
    assert 0 < ppo["kl_to_sft"] < 50
    # The SFT policy can name the asked film (the base model learned to copy it), though not always; it seldom
    # repeats itself, and PPO stays under issue 14's 5%.
    assert 0.3 < ppo["title_only_rate_sft"] < ppo["title_only_rate_ppo"]
    assert ppo["repeat_rate_sft"] <= 0.1
    # PPO on the oracle itself: the ceiling the learned reward model is measured against.
    assert results["ppo-oracle"]["gold_score_ppo"] >= 3.0
