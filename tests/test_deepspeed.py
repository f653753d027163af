"""Every stage under DeepSpeed ZeRO-2 and ZeRO-3 with 2 CPU processes (DS_ACCELERATOR=cpu,
recipes/accelerate/zero{2,3}_cpu.yaml): it trains, evaluates on every process (the stage-3 algorithms against
the SFT policy, the weights sharded under ZeRO-3) and saves a model that loads in plain transformers; PPO (ZeRO-2
and 3), GRPO and DPO (ZeRO-3) are killed after a checkpoint and resume where an uninterrupted run ends. And PPO
launched as 2 machines x 1 process on 127.0.0.1."""

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from conftest import ROOT, run_python

pytest.importorskip("deepspeed")

ENV = {**os.environ, "DS_ACCELERATOR": "cpu"}
SHORT = {"pretrain": ["--max_steps", "4"], "sft": ["--max_steps", "4"], "reward": ["--max_steps", "4"],
         "ppo": ["--total_episodes", "32", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
                 "--num_ppo_epochs", "2"],
         "grpo": [], "rloo": [], "dpo": []}  # the test recipes' few steps (conftest.TINY_OVERRIDES)
# a model of the same kind from the test chain: the saved model must have its keys, and other weights
SAME_KIND = {"pretrain": "pretrain", "sft": "sft", "reward": "reward"}  # the rest: the SFT policy, their start


def launcher(zero: int) -> list:
    return ["-m", "accelerate.commands.launch", "--config_file", ROOT / f"recipes/accelerate/zero{zero}_cpu.yaml"]


def stage_args(tiny_run, stage, output_dir, *extra) -> list:
    return [f"scripts/{stage}.py", "--config", tiny_run["recipes"] / f"{stage}.yaml", "--output_dir", output_dir,
            "--report_to", "none", "--save_strategy", "no", *SHORT[stage], *extra]


@pytest.mark.parametrize("zero", [2, 3])
@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward", "ppo", "grpo", "rloo", "dpo"])
def test_stage_trains_and_saves_under_deepspeed(tiny_run, tmp_path, stage, zero):
    output = tmp_path / stage
    run_python(*launcher(zero), *stage_args(tiny_run, stage, output), env=ENV)
    check_trained_under_deepspeed(tiny_run, output, stage)


def check_trained_under_deepspeed(tiny_run, output, stage, moved=True):
    results = json.loads((output / "results.json").read_text())
    assert (results["num_processes"], results["distributed_type"]) == (2, "DEEPSPEED")
    base_dir = tiny_run["outputs"] / SAME_KIND.get(stage, "sft")
    loader = AutoModelForSequenceClassification if stage == "reward" else AutoModelForCausalLM
    trained, base = loader.from_pretrained(output).state_dict(), loader.from_pretrained(base_dir).state_dict()
    if stage != "pretrain":  # pretrain starts from scratch: nothing to compare with
        assert trained.keys() == base.keys()
        # the gathered weights are the trained ones
        assert any(not torch.equal(trained[k], base[k]) for k in trained) or not moved
    assert all(torch.isfinite(v).all() for v in trained.values())
    if stage == "ppo":
        value = AutoModelForSequenceClassification.from_pretrained(output / "value_model")
        reward = AutoModelForSequenceClassification.from_pretrained(tiny_run["outputs"] / "reward")
        assert any(not torch.equal(a, b) for a, b in zip(value.state_dict().values(), reward.state_dict().values()))
    if stage in ("ppo", "grpo", "rloo", "dpo"):
        # the evaluation ran on both processes, each on its share of the prompts, and gathered every answer,
        # scored by the reward model too
        assert results["eval_prompts"] == 8 and 0 <= results["gold_win_rate_vs_sft"] <= 1
        assert math.isfinite(results[f"rm_score_{stage}"]) and 0 <= results["rm_win_rate_vs_sft"] <= 1


@pytest.mark.parametrize("zero", [2, 3])
def test_grpo_without_reference_and_rewarded_by_a_function_under_deepspeed(tiny_run, tmp_path, zero):
    """The evaluation's own models: with `beta: 0` there is no reference model, so the evaluation loads a copy of
    the SFT policy, and with `reward_model_weight: 0` the reward model only scores the answers; under ZeRO-3 both
    load sharded and must be prepared for DeepSpeed like the trainer's. (The tiny test policy's answers often all
    get the same gold score, which leaves GRPO without an advantage to follow: the weights may not move.)"""
    output = tmp_path / "grpo"
    run_python(*launcher(zero), *stage_args(tiny_run, "grpo", output, "--beta", "0", "--reward_model_weight", "0",
                                            "--reward_functions", "pipeline.embedded:gold_reward"), env=ENV)
    check_trained_under_deepspeed(tiny_run, output, "grpo", moved=False)


LORA = ["--use_peft", "true", "--lora_r", "8", "--lora_alpha", "16",
        "--lora_target_modules", "c_attn", "c_proj", "c_fc"]


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo", "grpo", "dpo"])
def test_lora_stage_under_zero3_saves_its_adapter_and_the_merged_model(tiny_run, tmp_path, stage):
    """LoRA under ZeRO-3: the main process merges the adapter into a whole copy of the base model (loaded whole,
    not sharded: a sharded load there waits for the other processes forever); PPO's and GRPO's reference is the
    policy with its adapter switched off; DPO's evaluation, which has no reference model with LoRA, uses a copy
    of the SFT policy prepared for DeepSpeed."""
    output = tmp_path / stage
    run_python(*launcher(3), *stage_args(tiny_run, stage, output, *LORA), env=ENV, timeout=300)
    check_trained_under_deepspeed(tiny_run, output, stage)
    assert (output / "adapter" / "adapter_config.json").is_file()
    loader = AutoModelForSequenceClassification if stage == "reward" else AutoModelForCausalLM
    merged = loader.from_pretrained(output).state_dict()
    base = loader.from_pretrained(tiny_run["outputs"] / ("pretrain" if stage == "sft" else "sft")).state_dict()
    adapted = {k for k in merged if k.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight"))}
    assert adapted and all(not torch.equal(merged[k], base[k]) for k in adapted)  # each LoRA'd matrix moved
    frozen = {k for k in merged if k not in adapted and k in base and "score" not in k}
    assert frozen and all(torch.equal(merged[k], base[k]) for k in frozen)  # and nothing else did


def test_stage_started_from_an_adapter_folder_under_zero3(tiny_run, tmp_path):
    """`model_name_or_path` may name a LoRA adapter folder: every process loads its base model whole, merges the
    adapter, and DeepSpeed shards the merged model (a sharded base cannot be merged into); it trains in full."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    sft = tiny_run["outputs"] / "sft"
    adapter = tmp_path / "adapter"
    config = LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM", init_lora_weights=False)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(sft), config)
    lora.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(sft).save_pretrained(adapter)
    output = tmp_path / "dpo"
    run_python(*launcher(3), *stage_args(tiny_run, "dpo", output, "--model_name_or_path", adapter), env=ENV,
               timeout=300)
    check_trained_under_deepspeed(tiny_run, output, "dpo")
    results = json.loads((output / "results.json").read_text())
    assert results["trainable_parameters"] == results["total_parameters"]


# per stage: fewer steps than test_resume's, enough for a kill to land after a checkpoint and before the end
RESUME_SHORTER = {"ppo": ["--total_episodes", "96"],  # 6 updates of 2 optimizer steps; checkpoints every 3 steps
                  "grpo": ["--max_steps", "12"], "dpo": ["--max_steps", "12"]}


@pytest.mark.parametrize("stage, zero, how", [("ppo", 2, "KILL"), ("ppo", 3, "TERM"), ("grpo", 3, "KILL"),
                                             ("dpo", 3, "USR1")])
def test_stage_killed_under_deepspeed_resumes_like_an_uninterrupted_run(tiny_run, tmp_path, stage, zero, how):
    """PPO's own checkpointing, TRL's GRPO (a generation batch per step) and DPO (a reference model, prepared
    for DeepSpeed beside the policy): each killed after a checkpoint (SIGKILL), or preempted (SIGTERM, SIGUSR1 to
    both processes: they agree on a step and write their shards there), then resumed from DeepSpeed's engine
    files, logs what an uninterrupted run logs."""
    from test_resume import STAGES, command, kill_after_a_checkpoint, logged, preempt_after_a_checkpoint, saved_steps

    launch = [sys.executable, *map(str, launcher(zero))]
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    shorter = RESUME_SHORTER[stage]
    run_python(*launch[1:], *command(tiny_run, stage, uninterrupted, shorter), env=ENV)
    if how == "KILL":
        kill_after_a_checkpoint(command(tiny_run, stage, interrupted, shorter), interrupted, random.Random(zero),
                                launcher=launch, env=ENV)
    else:
        preempt_after_a_checkpoint(command(tiny_run, stage, interrupted, shorter), interrupted, random.Random(zero),
                                   how, launcher=launch, env=ENV)
    saved = saved_steps(interrupted)
    checkpoint = interrupted / f"checkpoint-{saved[-1]}"
    assert (checkpoint / f"global_step{saved[-1]}").is_dir()  # DeepSpeed's own engine checkpoint
    resumed = run_python(*launch[1:], *command(tiny_run, stage, interrupted, shorter), env=ENV)
    assert f"resuming from {checkpoint}" in resumed.stdout + resumed.stderr
    keys = STAGES[stage][1]
    expected, got = logged(uninterrupted, keys), logged(interrupted, keys)
    assert list(got) == list(expected) and max(got) > saved[-1]
    for step, values in expected.items():
        for key, value in values.items():
            assert got[step][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, key)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ppo_as_two_machines_on_loopback_through_the_slurm_script_is_preempted_requeued_and_resumed(tiny_run, tmp_path):
    """scripts/slurm/launch.slurm with stand-ins for Slurm's srun (one task per node, SLURM_NODEID set, signals passed
    on to the tasks, as srun does) and scontrol (the node list: 127.0.0.1; requeue: recorded): two `accelerate
    launch --num_machines 2 --machine_rank 0|1` commands, 1 process each, form one gloo job that trains PPO. Slurm's
    early warning (SIGUSR1 to the batch script) reaches both processes, which write a checkpoint at the same step
    and stop; the script requeues the job; the requeued job (the same command) resumes from that checkpoint,
    evaluates and saves."""
    from test_resume import saved_steps

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        "#!/bin/bash\nshift\npids=()\nfor node in $(seq 0 $((SLURM_NNODES - 1))); do\n"
        "  SLURM_NODEID=$node \"$@\" & pids+=($!)\ndone\n"
        "trap 'kill -USR1 \"${pids[@]}\"' USR1\ntrap 'kill -TERM \"${pids[@]}\"' TERM\nrc=0\n"
        "for p in \"${pids[@]}\"; do\n  while wait $p; s=$?; kill -0 $p 2>/dev/null; do :; done\n"
        "  [ $s -eq 0 ] || rc=1\ndone\nexit $rc\n")
    requeued = tmp_path / "requeued"
    (bin_dir / "scontrol").write_text(
        f"#!/bin/bash\nif [ \"$1\" = requeue ]; then echo \"$@\" >> {requeued}; else echo 127.0.0.1; fi\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    config = tmp_path / "one_process_per_machine.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nmixed_precision: 'no'\n"
                      "num_machines: 1\nnum_processes: 1\nmachine_rank: 0\nsame_network: true\nuse_cpu: false\n")
    output = tmp_path / "ppo"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_ID": "4242",
           "PYTHON": sys.executable, "MAIN_PORT": str(free_port())}
    # 6 updates of 2 optimizer steps, a checkpoint every 3 steps (the flags after --config <recipe>)
    extra = [str(a) for a in stage_args(tiny_run, "ppo", output)[3:]] + [
        "--total_episodes", "96", "--save_strategy", "steps", "--save_steps", "3", "--logging_steps", "1"]
    job = ["bash", "scripts/slurm/launch.slurm", "ppo", str(tiny_run["recipes"] / "ppo.yaml"), str(config), *extra]
    first = subprocess.Popen(job, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while first.poll() is None and not saved_steps(output, at_least=3) and time.time() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, first.communicate()[1][-3000:]
    first.send_signal(signal.SIGUSR1)
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert requeued.read_text().split() == ["requeue", "4242"]
    step = saved_steps(output)[-1]
    assert f"ppo: stopped by SIGUSR1 after step {step}: {output / f'checkpoint-{step}'} is written" in stderr
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in (output / f"checkpoint-{step}").iterdir()}
    assert not (output / "results.json").exists()

    result = subprocess.run(job, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resuming from {output / f'checkpoint-{step}'}" in result.stdout + result.stderr
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    logged = [row["step"] for row in history if "objective/scores" in row]
    assert logged == [1, 3, 5, 7, 9, 11]  # each of the 6 updates once (its rollout is logged at its first step)
    results = json.loads((output / "results.json").read_text())
    assert (results["num_processes"], results["distributed_type"]) == (2, "MULTI_CPU")
    assert results["eval_prompts"] == 8
    AutoModelForCausalLM.from_pretrained(output)
    AutoModelForSequenceClassification.from_pretrained(output / "value_model")


def test_ppo_and_grpo_with_every_weight_sharded_make_the_same_passes_on_every_process(tiny_run, tmp_path):
    """ZeRO-3 keeps small weights whole on every process (`stage3_param_persistence_threshold`); with none kept,
    each forward pass of a layer gathers its weights from both processes, which must then make the same passes. The
    padding-free layouts hold one or two blocks and the scoring passes' parts follow the answers' lengths, which
    differ from process to process: before `padding_free.lockstep` this PPO run (seed 1) hung."""
    import yaml

    deepspeed_config = tmp_path / "zero3_all_sharded.json"
    deepspeed_config.write_text(json.dumps({
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                              "stage3_gather_16bit_weights_on_model_save": True},
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "bf16": {"enabled": False}}))
    config = tmp_path / "accelerate.yaml"
    config.write_text(yaml.safe_dump({
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED", "num_machines": 1,
        "num_processes": 2, "machine_rank": 0, "main_process_port": 29543, "rdzv_backend": "static",
        "same_network": True, "use_cpu": False,
        "deepspeed_config": {"deepspeed_config_file": str(deepspeed_config), "zero3_init_flag": False}}))
    for stage, extra in (("ppo", ["--total_episodes", "64"]), ("grpo", [])):
        output = tmp_path / stage
        run_python("-m", "accelerate.commands.launch", "--config_file", config,
                   *stage_args(tiny_run, stage, output, "--seed", "1", *extra), env=ENV, timeout=240)
        check_trained_under_deepspeed(tiny_run, output, stage)
