"""RLHF works, as a measured fact: the demo's recipes (recipes/tiny, unchanged but for output paths), judged
by the gold oracle, and GRPO from the same SFT policy and reward model. This is the slowest test (the whole demo
and one more stage, about nine minutes on 2 cores). RLOO's and DPO's figures (DPO's recipe takes longer: 2 epochs
over the pairs) come from `make compare` (COMPARISON.md, 3 seeds each), to keep CI under an hour."""

import json

from conftest import run_python, write_recipes


def test_demo_recipes_learn_what_the_oracle_prefers(tmp_path):
    recipes = write_recipes(tmp_path / "recipes", tmp_path / "outputs",
                            overrides={stage: {} for stage in ("pretrain", "sft", "reward", "ppo", "grpo")})
    run_python("-m", "pipeline", "run", recipes, "--stages", "pretrain,sft,reward,ppo,grpo", timeout=2400)
    results = json.loads((tmp_path / "outputs" / "results.json").read_text())
    # The reward model learned from noisy labels agrees with the noise-free oracle on held-out pairs.
    assert results["reward"]["eval_accuracy"] >= 0.85
    # PPO, which only saw the learned reward model, pleases the oracle more than the SFT policy does.
    ppo = results["ppo"]
    assert ppo["gold_score_ppo"] > ppo["gold_score_sft"] + 0.5
    assert ppo["gold_win_rate_vs_sft"] >= 0.8
    assert ppo["rm_score_ppo"] > ppo["rm_score_sft"]
    assert 0 < ppo["kl_to_sft"] < 50
    # GRPO, against the same reward model, beats the SFT policy too
    for stage in ("grpo",):
        assert results[stage]["gold_win_rate_vs_sft"] >= 0.7, stage
        assert results[stage][f"gold_score_{stage}"] > results[stage]["gold_score_sft"], stage
        assert 0 < results[stage]["kl_to_sft"] < 50, stage
