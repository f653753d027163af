"""KL control, reward functions and PPO-ptx (pipeline/rl.py and the PPO stage)."""

import json
import os

import pytest
import torch
from trl import ModelConfig

from conftest import ROOT, run_python
from pipeline import rl
from pipeline.models import load_scalar_head_model, load_tokenizer


def test_fixed_kl_controller_keeps_the_coefficient():
    controller = rl.FixedKLController(0.05)
    assert [controller.update(kl, 64) for kl in (0.1, 100.0, 3.0)] == [0.05, 0.05, 0.05]


def test_adaptive_kl_controller_moves_the_coefficient_toward_the_target():
    controller = rl.AdaptiveKLController(0.1, target=6.0, horizon=1000)
    ups = [controller.update(12.0, 100) for _ in range(3)]  # KL above target: coefficient grows
    assert ups[0] == pytest.approx(0.1 * 1.02) and ups == sorted(ups)  # error clipped at +0.2
    downs = [controller.update(3.0, 100) for _ in range(3)]  # below: shrinks (error -0.5 clipped to -0.2)
    assert downs[0] == pytest.approx(ups[-1] * 0.98) and downs == sorted(downs, reverse=True)
    assert controller.update(6.0, 100) == pytest.approx(downs[-1])  # at the target: unchanged

    # a policy whose KL falls as the penalty rises (KL = 1 / coef): the loop settles at the target
    controller = rl.AdaptiveKLController(0.02, target=6.0, horizon=500)
    kls = []
    for _ in range(400):
        kl = 1.0 / controller.value
        kls.append(kl)
        controller.update(kl, 64)
    assert abs(kls[0] - 6.0) > 40 and abs(kls[-1] - 6.0) < 0.1


def test_adaptive_kl_controller_refuses_a_bad_target():
    with pytest.raises(ValueError, match="kl_target > 0"):
        rl.AdaptiveKLController(0.1, target=0.0, horizon=100)


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "expected 'module:function'"),
    ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    ("pipeline.embedded:no_such_function", "has no function 'no_such_function'"),
])
def test_reward_function_names_are_checked(spec, message):
    with pytest.raises(ValueError, match=message):
        rl.load_function(spec)


def test_reward_model_score_is_read_at_the_last_response_token_whatever_the_padding(tiny_run):
    """rollout.sequence_scores (PPO's reward) on left-padded prompts + right-padded responses equals the reward
    model's own score of each row alone, unpadded; and the score of a row depends on its last real token."""
    from pipeline.rollout import query_mask, sequence_scores

    path = tiny_run["outputs"] / "reward"
    tokenizer = load_tokenizer(str(path), padding_side="left")
    model = load_scalar_head_model(str(path), tokenizer, ModelConfig()).eval()
    texts = [("Write a review of The Lost River.", " It was great."), ("Hi", " Bad")]
    prompts = tokenizer([p for p, _ in texts], padding=True, return_tensors="pt")["input_ids"]
    responses = tokenizer([r for _, r in texts], padding=True, padding_side="right", return_tensors="pt")["input_ids"]
    assert (prompts == tokenizer.pad_token_id).any() and (responses == tokenizer.pad_token_id).any()  # both padded
    rows = torch.cat([prompts, responses], 1)
    pad = tokenizer.pad_token_id
    mask = torch.cat([query_mask(prompts, pad), responses != pad], 1)
    with torch.no_grad():
        scores = sequence_scores(model, rows, mask, prompts.shape[1])
        alone = [model(**tokenizer(p + r, return_tensors="pt")).logits[0, 0].item() for p, r in texts]
        shorter = sequence_scores(model, rows[:, :-1], mask[:, :-1], prompts.shape[1])
    assert scores.tolist() == pytest.approx(alone, abs=1e-4)
    assert shorter[1].item() == pytest.approx(scores[1].item(), abs=1e-4)  # row 1 ended earlier: padding cut
    assert shorter[0].item() != pytest.approx(scores[0].item(), abs=1e-4)  # row 0 lost its last token


def test_reward_functions_are_loaded_with_their_weights():
    functions = rl.load_reward_functions(["reward_fns:constant", "reward_fns:length"], [2.0, 0.5])
    assert [(name, weight) for name, _, weight in functions] == [("constant", 2.0), ("length", 0.5)]
    assert functions[1][1](prompts=["p"], completions=["abc"]) == [3.0]
    assert [w for _, _, w in rl.load_reward_functions(["reward_fns:constant"])] == [1.0]
    with pytest.raises(ValueError, match="has 1 values for 2 reward functions"):
        rl.load_reward_functions(["reward_fns:constant", "reward_fns:length"], [1.0])


@pytest.mark.parametrize("spec, message", [
    ("reward_fns:bad_signature", r"^reward function reward_fns:bad_signature must accept the keyword arguments "
                                 r"prompts= and completions= .*its signature is \(texts\)$"),
    ("reward_fns:raises", r"^reward function reward_fns:raises raised ZeroDivisionError: float division by zero on a "
                          r"trial call before training \(2 prompts of the dataset\) \(tests/reward_fns.py, line \d+\); "
                          r"nothing was trained$"),
    ("reward_fns:wrong_count", r"^reward function reward_fns:wrong_count returned 1 values for 2 completions on a "
                               r"trial call"),
    ("reward_fns:not_numbers", r"^reward function reward_fns:not_numbers returned \['good', 'good'\]\.\.\.: "
                               r"expected a number per completion \(on a trial call"),
    ("reward_fns:not_a_number", r"^reward function reward_fns:not_a_number returned nan on a trial call"),
])
def test_a_reward_function_that_fails_is_named_before_training(spec, message, monkeypatch):
    """The signature when the recipe's functions are loaded, then one trial call on 2 prompts of the dataset
    (rl.trial_call, before the PPO/GRPO/RLOO stage loads its models): each failure is one line naming the
    function as the recipe does (module:function) and what it did."""
    from datasets import Dataset

    from pipeline.stages.common import NonFiniteError

    monkeypatch.chdir(ROOT)
    prompts = Dataset.from_list([{"prompt": "Write a review of The Lost River."}, {"prompt": "Review Dust."}])
    with pytest.raises((rl.RewardFunctionError, NonFiniteError), match=message):
        rl.trial_call(rl.load_reward_functions([spec]), tokenizer=None, prompts=prompts)
    rl.trial_call(rl.load_reward_functions(["reward_fns:constant"]), tokenizer=None, prompts=prompts)  # a good one


def test_a_reward_function_that_raises_during_training_names_the_update():
    (_, function, _), = rl.load_reward_functions(["reward_fns:raises"])
    with pytest.raises(rl.RewardFunctionError, match=r"raised ZeroDivisionError: float division by zero at update 7 .*"
                                                     r"training stopped before that update"):
        function(prompts=["p"], completions=["c"], step=7)


def ppo(tiny_run, output_dir, *extra, check=True):
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return run_python("scripts/ppo.py", "--config", tiny_run["recipes"] / "ppo.yaml", "--output_dir", output_dir,
                      "--report_to", "none", "--logging_steps", "1", *extra, check=check, env=env)


def steps(output_dir) -> list[dict]:
    """The log of every optimizer step (logging_steps 1)."""
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [row for row in history if "loss/policy_avg" in row]


def updates(output_dir) -> list[dict]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [row for row in history if "objective/scores" in row]


def test_reward_function_values_reach_ppo_scores_and_adaptive_kl_is_logged(tiny_run, tmp_path):
    ppo(tiny_run, tmp_path / "ppo", "--reward_functions", "reward_fns:constant", "--reward_model_weight", "0",
        "--missing_eos_penalty", "0", "--kl_control", "adaptive", "--kl_target", "0.001", "--kl_horizon", "100",
        "--kl_coef", "0.05")
    rows = updates(tmp_path / "ppo")
    assert len(rows) == 4
    for row in rows:
        assert row["objective/scores"] == pytest.approx(2.5)  # the function alone is the score
        assert row["rewards/constant"] == pytest.approx(2.5)
        assert row["objective/rlhf_reward"] == pytest.approx(2.5 + row["objective/non_score_reward"])
    coefs = [row["objective/kl_coef"] for row in rows]
    assert coefs[0] == pytest.approx(0.05)  # the given kl_coef first
    for before, after, row in zip(coefs, coefs[1:], rows):  # each update's KL moves the next coefficient
        error = min(max(row["objective/kl"] / 0.001 - 1, -0.2), 0.2)
        assert after == pytest.approx(before * (1 + error * 16 / 100))  # 16 episodes per update
    # both ways in one run: the first rollout comes from the reference itself (KL 0, below the target: the penalty
    # falls); once the policy has moved, some update's KL is above the tiny target and the penalty rises
    assert rows[0]["objective/kl"] < 0.001 and coefs[1] < coefs[0]
    assert any(after > before for before, after in zip(coefs, coefs[1:]))
    recipe = (tmp_path / "ppo" / "recipe.yaml").read_text()
    assert "kl_coef: 0.05" in recipe  # the recipe written out is the one given, not the controller's last value


def test_ptx_is_off_at_zero_and_changes_the_policy_update_when_on(tiny_run, tmp_path):
    ppo(tiny_run, tmp_path / "plain")
    ppo(tiny_run, tmp_path / "zero", "--ptx_coef", "0", "--ptx_dataset_name", "embedded:corpus")
    ppo(tiny_run, tmp_path / "ptx", "--ptx_coef", "1.0", "--ptx_dataset_name", "embedded:corpus",
        "--ptx_block_size", "32")
    plain, zero, ptx = (steps(tmp_path / name) for name in ("plain", "zero", "ptx"))
    keys = ("loss/policy_avg", "loss/value_avg")
    assert [[r[k] for k in keys] for r in zero] == [[r[k] for k in keys] for r in plain]  # no ptx at 0
    assert all("loss/ptx_avg" not in r for r in zero)
    assert all(r["loss/ptx_avg"] > 0 for r in ptx)
    assert updates(tmp_path / "ptx")[0]["objective/scores"] == updates(tmp_path / "plain")[0]["objective/scores"]
    # the first optimizer step sees the same rollouts and weights; from the second on, ptx has moved the policy
    assert ptx[0]["loss/policy_avg"] == plain[0]["loss/policy_avg"]
    assert ptx[1]["loss/policy_avg"] != plain[1]["loss/policy_avg"]
    assert ptx[-1]["loss/ptx_avg"] < ptx[0]["loss/ptx_avg"] * 1.5  # the LM loss is held, not blown up


def test_ptx_without_a_dataset_is_a_one_line_error(tiny_run, tmp_path):
    result = ppo(tiny_run, tmp_path / "ppo", "--ptx_coef", "0.5", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ppo: ptx_coef > 0 needs ptx_dataset_name")


def test_nan_reward_stops_ppo_naming_the_function_and_the_step(tiny_run, tmp_path):
    result = ppo(tiny_run, tmp_path / "ppo", "--reward_functions", "reward_fns:nan_after_trial", check=False)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ppo: reward function reward_fns:nan_after_trial returned nan at step 1: training "
                           "stopped"), line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "ppo" / "model.safetensors").exists()
