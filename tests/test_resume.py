"""Every stage survives SIGKILL and preemption: killed at a random moment after a checkpoint, or sent SIGTERM,
SIGUSR1 or Ctrl-C (which write a checkpoint at the end of the step in flight), started again with the same
command, it resumes from its last complete checkpoint and ends where an uninterrupted run ends."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import ROOT, run_python

SAVE_STEPS = 3
# per stage: overrides giving enough steps after the first checkpoints for a kill to land mid-run (and a
# loss logged at every step: a logged loss is the mean since the last log, which a resume restarts), and the
# logged values compared with the uninterrupted run's at every step
STAGES = {
    "pretrain": ({"max_steps": 60, "logging_steps": 1}, ["loss"]),
    "sft": ({"max_steps": 60, "logging_steps": 1}, ["loss"]),
    "reward": ({"max_steps": 60, "logging_steps": 1}, ["loss"]),
    # PPO with everything that has state of its own: adaptive KL coefficient, ptx batches
    "ppo": ({"total_episodes": 192, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 4,
             "logging_steps": 1, "kl_control": "adaptive", "kl_target": 0.5, "kl_horizon": 200, "ptx_coef": 0.5,
             "ptx_dataset_name": "embedded:corpus", "ptx_block_size": 32},
            ["objective/scores", "objective/kl", "objective/kl_coef", "loss/policy_avg", "loss/value_avg",
             "loss/ptx_avg"]),
    # TRL's GRPO and RLOO: a fresh generation batch every optimizer step (a checkpoint never splits one)
    **{stage: ({"max_steps": 24, "num_generations": 4, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                "num_iterations": 1, "logging_steps": 1}, ["loss", "reward", "kl"]) for stage in ("grpo", "rloo")},
    "dpo": ({"max_steps": 40, "logging_steps": 1}, ["loss", "rewards/margins"]),
}
# how each stage's run is interrupted: SIGKILL (a dead machine), or a preemption signal; PPO both, mid-update
INTERRUPTIONS = {"pretrain": ["KILL"], "sft": ["TERM"], "reward": ["USR1"], "ppo": ["KILL", "TERM"], "grpo": ["TERM"],
                 "rloo": ["KILL"], "dpo": ["INT"]}
TOLERANCE = 1e-4  # relative; CPU runs resume bit-exactly in practice, this leaves room for kernel reordering


def command(tiny_run, stage, output_dir, extra=()):
    overrides, _ = STAGES[stage]
    args = [f"scripts/{stage}.py", "--config", str(tiny_run["recipes"] / f"{stage}.yaml"), "--output_dir",
            str(output_dir), "--save_strategy", "steps", "--save_steps", str(SAVE_STEPS), "--report_to", "none"]
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    return args + list(extra)


def complete(checkpoint: Path) -> bool:
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def saved_steps(output_dir: Path, at_least: int = 0) -> list[int]:
    """Steps of the complete checkpoints (older ones are rotated away: save_total_limit)."""
    steps = sorted(int(p.name.split("-")[1]) for p in output_dir.glob("checkpoint-*") if complete(p))
    return [s for s in steps if s >= at_least]


def kill_after_a_checkpoint(args, output_dir: Path, rng: random.Random, launcher=(), env=None) -> int:
    """Start the stage, wait for a randomly chosen early checkpoint to be complete, wait a random extra moment
    (so the kill lands anywhere: mid-step, mid-save), SIGKILL every process of the run. Returns that step."""
    target = rng.choice([SAVE_STEPS, 2 * SAVE_STEPS])
    process = subprocess.Popen([*launcher, *args] if launcher else [sys.executable, *args], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                               env=env)
    deadline = time.time() + 600
    while process.poll() is None and not saved_steps(output_dir, at_least=target) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.2))
    if process.poll() is None:
        # the whole tree, as when a machine dies: torch's launcher starts its workers in sessions of their own,
        # so killing the launcher's process group would leave them training
        tree = psutil.Process(process.pid).children(recursive=True)
        os.killpg(process.pid, signal.SIGKILL)
        for child in tree:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(tree, timeout=30)
    process.wait()
    assert process.returncode == -signal.SIGKILL, f"the stage ended before it was killed:\n{process.stderr.read()[-3000:]}"
    assert not (output_dir / "results.json").exists()
    return target


def preempt_after_a_checkpoint(args, output_dir: Path, rng: random.Random, how: str, launcher=(), env=None) -> int:
    """Start the stage, wait for a randomly chosen early checkpoint, wait a random extra moment, send SIG<how> to
    the stage's process: it must write a checkpoint at the end of the step in flight, say so in one line and exit
    with 128 + the signal's number. Returns the step of that checkpoint."""
    signum = getattr(signal, f"SIG{how}")
    target = rng.choice([SAVE_STEPS, 2 * SAVE_STEPS])
    process = subprocess.Popen([*launcher, *args] if launcher else [sys.executable, *args], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 600
    while process.poll() is None and not saved_steps(output_dir, at_least=target) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.2))
    assert process.poll() is None, f"the stage ended before the signal:\n{process.stderr.read()[-3000:]}"
    if launcher:  # the stage's processes, the launcher's children (as scripts/slurm/node.sh sends it)
        for worker in psutil.Process(process.pid).children():
            worker.send_signal(signum)
    else:
        process.send_signal(signum)
    stderr = process.communicate(timeout=600)[1]
    if launcher:  # torch's launcher reports the workers' exit code as a failure of its own
        assert process.returncode != 0, stderr[-3000:]
        line = next(line for line in stderr.splitlines() if ": stopped by " in line)
    else:
        assert process.returncode == 128 + signum, stderr[-3000:]
        assert "Traceback" not in stderr
        line = stderr.strip().splitlines()[-1]
    name = "Ctrl-C" if how == "INT" else f"SIG{how}"
    prefix = f"{args[0].split('/')[-1][:-3]}: stopped by {name} after step "
    assert line.startswith(prefix), line
    step = int(line[len(prefix):].split(":")[0])
    assert line.endswith(f"{output_dir / f'checkpoint-{step}'} is written; the same command resumes from it"), line
    assert step >= target and saved_steps(output_dir)[-1] == step  # the step it reached, not the last periodic save
    assert not (output_dir / "results.json").exists() and not (output_dir / "config.json").exists()
    return step


def logged(output_dir: Path, keys) -> dict[int, dict]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    steps = [row["step"] for row in history if any(k in row for k in keys)]
    assert steps == sorted(set(steps)), f"steps logged twice or out of order: {steps}"
    return {row["step"]: {k: row[k] for k in keys if k in row} for row in history if any(k in row for k in keys)}


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_killed_after_a_checkpoint_resumes_and_matches_an_uninterrupted_run(tiny_run, tmp_path, stage):
    rng = random.Random(f"{stage}-{os.getpid()}")
    uninterrupted = tmp_path / "uninterrupted"
    run_python(*command(tiny_run, stage, uninterrupted))
    final = json.loads((uninterrupted / "results.json").read_text())
    keys = STAGES[stage][1]
    expected = logged(uninterrupted, keys)
    for how in INTERRUPTIONS[stage]:
        interrupted = tmp_path / f"interrupted-{how}"
        if how == "KILL":
            target = kill_after_a_checkpoint(command(tiny_run, stage, interrupted), interrupted, rng)
        else:
            target = preempt_after_a_checkpoint(command(tiny_run, stage, interrupted), interrupted, rng, how)
        saved = saved_steps(interrupted)
        assert saved and saved[-1] >= target
        resumed = run_python(*command(tiny_run, stage, interrupted))
        log = resumed.stdout + resumed.stderr
        assert f"resuming from {interrupted / f'checkpoint-{saved[-1]}'}" in log

        got = logged(interrupted, keys)
        assert list(got) == list(expected), how  # every step once: none lost, none repeated
        assert max(got) > saved[-1]  # and the resumed run did train past the checkpoint
        for step, values in expected.items():
            for key, value in values.items():
                assert got[step][key] == pytest.approx(value, rel=TOLERANCE, abs=1e-6), (stage, how, step, key)
        final_resumed = json.loads((interrupted / "results.json").read_text())
        for key, value in final.items():
            # timings differ; TRL's token counter (num_tokens) is not part of transformers' checkpoint, so it
            # restarts; transformers' train_loss is the mean over the steps this process ran (the per-step losses
            # are compared)
            if isinstance(value, float) and key != "train_loss" and not key.endswith(
                    ("runtime", "wall_seconds", "per_second", "num_tokens")):
                assert final_resumed[key] == pytest.approx(value, rel=TOLERANCE, abs=1e-6), (how, key)


def test_a_half_written_checkpoint_is_never_resumed_from_and_a_finished_one_trains_no_more(tiny_run, tmp_path):
    output = tmp_path / "sft"
    run_python(*command(tiny_run, "sft", output, ["--max_steps", "6"]))
    # simulate a kill while checkpoint-9 was being written: weights there, trainer_state.json cut short
    half = output / "checkpoint-9"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 100)
    (half / "trainer_state.json").write_text('{"global_step": 9, "log_hi')
    (output / "results.json").unlink()
    resumed = run_python(*command(tiny_run, "sft", output, ["--max_steps", "12"]))
    log = resumed.stdout + resumed.stderr
    assert f"removing {half}" in log and f"resuming from {output / 'checkpoint-6'}" in log
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 12
    # rerun once finished (as after an evaluation that failed): nothing left to train, the same model (transformers
    # alone trains a 13th step); fewer steps than the checkpoint has: refused
    weights = (output / "model.safetensors").read_bytes()
    again = run_python(*command(tiny_run, "sft", output, ["--max_steps", "12"]))
    assert f"{output / 'checkpoint-12'} is at the last step (12): nothing left to train" in again.stdout + again.stderr
    assert (output / "model.safetensors").read_bytes() == weights
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 12
    fewer = run_python(*command(tiny_run, "sft", output, ["--max_steps", "9"]), check=False)
    assert fewer.returncode == 2 and fewer.stderr.strip().splitlines()[-1].startswith(
        f"error: sft: {output / 'checkpoint-12'} is at step 12, beyond this run's 9 steps: raise max_steps")


def test_ppo_rollout_sampler_repeats_each_batch_and_replays_any_epoch():
    """The PPO trainer's prompt order: each rollout batch once per micro-batch of its update, whole batches only,
    a fresh permutation per epoch that depends on (seed, epoch) alone, so a run resumed in a later epoch
    (transformers calls set_epoch) draws exactly what the uninterrupted run drew."""
    from pipeline.trainers.ppo import RolloutSampler

    def epoch(sampler, number):
        sampler.set_epoch(number)
        return list(sampler)

    sampler = RolloutSampler(num_prompts=10, batch_size=3, repeats=2, seed=7)
    first = epoch(sampler, 0)
    assert len(first) == len(sampler) == 18  # 3 whole batches of 3, twice each; the 10th prompt waits
    batches = [first[i:i + 3] for i in range(0, 18, 3)]
    assert batches[0] == batches[1] and batches[2] == batches[3] and batches[4] == batches[5]
    assert len({i for b in batches for i in b}) == 9
    later = [epoch(sampler, n) for n in (1, 2)]
    assert later[0] != first and later[1] != later[0]
    torch.manual_seed(123)  # the global RNG plays no part in the order
    fresh = RolloutSampler(num_prompts=10, batch_size=3, repeats=2, seed=7)
    assert epoch(fresh, 2) == later[1] and epoch(fresh, 0) == first


def test_stage_refuses_an_output_dir_holding_another_stage(tiny_run, tmp_path):
    output = tmp_path / "reward"
    run_python(*command(tiny_run, "reward", output, ["--max_steps", "3"]))
    before = sorted(p.name for p in output.iterdir())
    result = run_python(*command(tiny_run, "sft", output, ["--max_steps", "3"]), check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: sft: output_dir {output} holds the output of the reward stage, not sft")
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in output.iterdir()) == before


def test_nan_loss_stops_the_stage_naming_the_step_and_keeps_the_checkpoints(tiny_run, tmp_path):
    output = tmp_path / "sft"
    # a learning rate of 1e30 gives huge weights after a few updates, then an inf/NaN loss
    result = run_python(*command(tiny_run, "sft", output, ["--max_steps", "30", "--learning_rate", "1e30",
                                                           "--lr_scheduler_type", "constant", "--warmup_steps", "0",
                                                           "--save_steps", "1"]), check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: sft: the gradient norm (a NaN/inf loss) is nan at step ") or \
        line.startswith("error: sft: the gradient norm (a NaN/inf loss) is inf at step "), line
    step = int(line.split(" at step ")[1].split(":")[0])
    assert 1 < step < 30
    checkpoints = sorted(int(p.name.split("-")[1]) for p in output.glob("checkpoint-*"))
    assert checkpoints and checkpoints[-1] == step - 1  # every finished step was saved, the failed one not
    assert not (output / "results.json").exists()
