"""The evaluation, generation and chat commands on the checkpoints of a tiny run; how the runner starts a stage."""

import json
import os
import sys

import pytest

from conftest import run_python


def test_eval_reward_against_the_oracle(tiny_run, tmp_path):
    out = tmp_path / "reward.json"
    # --output after the subcommand (before it works too: tests/test_newcomer.py)
    result = run_python("-m", "pipeline", "eval", "reward", tiny_run["outputs"] / "reward", "--output", out)
    printed = _json(result.stdout)
    assert printed == json.loads(out.read_text())
    assert printed["reference"] == "oracle" and printed["pairs"] == 1000
    assert 0 <= printed["accuracy"] <= 1 and "0.5" in printed["score_quantiles"]


def test_eval_compare_a_policy_with_itself(tiny_run):
    sft = tiny_run["outputs"] / "sft"
    result = run_python("-m", "pipeline", "eval", "compare", sft, sft, "--reward_model", tiny_run["outputs"] / "reward",
                        "--max_prompts", "6", "--max_new_tokens", "12")
    printed = _json(result.stdout)
    assert abs(printed["kl_to_b"]) < 1e-5
    assert printed["gold_win_rate_vs_b"] == 0.5 and printed["rm_win_rate_vs_b"] == 0.5


def test_eval_policy_perplexity_and_fewshot(tiny_run):
    ppo, sft = tiny_run["outputs"] / "ppo", tiny_run["outputs"] / "sft"
    policy = _json(run_python("-m", "pipeline", "eval", "policy", ppo, "--reference", sft, "--max_prompts", "4",
                              "--samples_per_prompt", "2", "--max_new_tokens", "12").stdout)
    assert policy["eval_prompts"] == 8 and len(policy["samples"]) == 4
    for key in ("gold_score", "eos_rate", "response_length", "distinct_1", "distinct_2", "kl_to_reference"):
        assert key in policy
    ppl = _json(run_python("-m", "pipeline", "eval", "perplexity", sft, "--max_texts", "50").stdout)
    assert ppl["texts"] == 50 and ppl["perplexity"] > 1
    shots = _json(run_python("-m", "pipeline", "eval", "fewshot", sft, "--shots", "0,1", "--examples", "10").stdout)
    assert set(shots) == {"0_shot", "1_shot", "chance", "majority", "examples"}


def _json(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{"):])


def test_generate_with_each_strategy(tiny_run):
    for strategy in ("greedy", "sample", "beam"):
        result = run_python("-m", "pipeline", "generate", tiny_run["outputs"] / "ppo",
                            "Write a review of The Lost River.", "--strategy", strategy, "--max_new_tokens", "10",
                            "--repetition_penalty", "1.2")
        assert "prompt: Write a review of The Lost River.\nanswer: " in result.stdout


def test_chat_reads_turns_until_quit(tiny_run):
    result = run_python("-m", "pipeline", "chat", tiny_run["outputs"] / "ppo", "--max_new_tokens", "8",
                        input="Write a review of The Lost River.\nAnd another?\n/quit\n")
    assert result.stdout.count("model> ") == 2


def test_eval_of_a_missing_model_is_one_line(tmp_path):
    result = run_python("-m", "pipeline", "eval", "reward", tmp_path / "nope", check=False)
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_call_runs_a_stage_in_a_forked_child_and_returns_its_exit_code(tmp_path):
    from pipeline.cli import call

    marker = tmp_path / "ran"
    never = [sys.executable, "-c", "raise SystemExit(9)"]  # the fallback command, not used on Linux here
    assert call(never, lambda: marker.write_text(str(os.getpid()))) == 0
    assert int(marker.read_text()) != os.getpid()  # it ran, in another process
    assert call(never, lambda: sys.exit(3)) == 3
    assert call(never, lambda: sys.exit("error: a one-line message")) == 1
    assert call(never, lambda: 1 / 0) == 1


def test_call_runs_a_new_process_once_cuda_has_started(monkeypatch):
    """A child forked after CUDA started cannot use it (a GPU recipe's training arguments start it when read)."""
    from pipeline.cli import call

    class Torch:
        class cuda:
            is_initialized = staticmethod(lambda: True)

    monkeypatch.setitem(sys.modules, "torch", Torch)
    assert call([sys.executable, "-c", "raise SystemExit(5)"], lambda: pytest.fail("forked after CUDA")) == 5


def test_start_sends_a_childs_output_to_its_log_and_sets_its_threads(tmp_path):
    from pipeline.cli import start, wait

    def child(name):
        def run():
            import torch

            print(f"{name}: {torch.get_num_threads()} thread(s)")
            print("to stderr", file=sys.stderr)
        return run

    never = [sys.executable, "-c", "raise SystemExit(9)"]
    children = [start(never, child(name), tmp_path / f"{name}.log", threads=1) for name in ("a", "b")]
    assert sorted(code for _, code in wait(children)) == [0, 0]
    for name in ("a", "b"):
        assert (tmp_path / f"{name}.log").read_text() == f"{name}: 1 thread(s)\nto stderr\n"


def test_waves_group_only_stages_that_read_no_output_of_each_other():
    from pipeline.cli import waves

    chain = ["pretrain", "sft", "reward", "ppo", "ppo-oracle"]
    assert waves(chain, 2) == [["pretrain"], ["sft"], ["reward"], ["ppo", "ppo-oracle"]]
    assert waves(chain, 1) == [[stage] for stage in chain]
    every = ["pretrain", "sft", "reward", "ppo", "ppo-oracle", "grpo", "rloo", "dpo"]
    assert waves(every, 2)[3:] == [["ppo", "ppo-oracle"], ["grpo", "rloo"], ["dpo"]]
    assert waves(every, 3)[3:] == [["ppo", "ppo-oracle", "grpo"], ["rloo", "dpo"]]
    assert waves(["reward", "ppo"], 2) == [["reward"], ["ppo"]]  # ppo reads the reward model


def test_jobs_refuses_nonsense_and_a_launcher():
    from pipeline.cli import stage_jobs

    assert stage_jobs(1, None, []) == 1
    with pytest.raises(ValueError, match="--jobs must be 1 or more"):
        stage_jobs(0, None, [])
    with pytest.raises(ValueError, match="with --accelerate_config"):
        stage_jobs(2, "recipes/accelerate/cpu_2proc.yaml", [])
    assert stage_jobs(None, "recipes/accelerate/cpu_2proc.yaml", []) == 1
