"""A user's own runs: one run per output folder, no silent default folder, `resume_from_checkpoint` honoured and
checked, checkpoints with a file cut short never trusted, and an evaluation that says whether it is held out.
(Preemption by signals is in test_resume.py and test_deepspeed.py.)"""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import save_file

from conftest import ROOT, run_python
from pipeline.stages.common import asked_checkpoint, broken_file, last_checkpoint
from pipeline.stages.lock import LOCK_FILE, OutputDirLock


def fake_checkpoint(folder: Path, step: int) -> Path:
    """The files transformers writes in a checkpoint, small: weights, optimizer state, RNG state, trainer state."""
    checkpoint = folder / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    save_file({"w": torch.randn(64, 64)}, checkpoint / "model.safetensors")
    torch.save({"state": torch.randn(64, 64)}, checkpoint / "optimizer.pt")
    torch.save({"python": 1}, checkpoint / "rng_state.pth")
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return checkpoint


def cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def args(output_dir, resume=None):
    return SimpleNamespace(output_dir=str(output_dir), resume_from_checkpoint=resume, should_save=True)


def test_a_checkpoint_with_a_file_cut_short_is_kept_aside_and_the_one_before_resumed(tmp_path, caplog):
    two, four = fake_checkpoint(tmp_path, 2), fake_checkpoint(tmp_path, 4)
    assert broken_file(two) is None and broken_file(four) is None
    size = (four / "model.safetensors").stat().st_size
    cut(four / "model.safetensors")
    assert broken_file(four) == f"model.safetensors is cut short ({size // 2} of {size} bytes)"
    with caplog.at_level(logging.INFO, logger="pipeline"):
        assert last_checkpoint(args(tmp_path)) == str(two)
    assert f"not resuming from {four}: model.safetensors is cut short" in caplog.text
    assert not four.exists() and (tmp_path / "broken-checkpoint-4" / "model.safetensors").stat().st_size == size // 2
    # every kind of file a checkpoint holds is checked: a torch.save zip without its directory, JSON cut short
    cut(two / "optimizer.pt")
    assert broken_file(two).startswith("optimizer.pt is cut short (")
    (two / "optimizer.pt").unlink()
    (two / "config.json").write_text('{"model_type": "gp')
    assert broken_file(two).startswith("config.json cannot be read (JSONDecodeError")
    assert last_checkpoint(args(tmp_path)) is None  # nothing left to trust: a fresh run, nothing deleted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken-checkpoint-2", "broken-checkpoint-4"]


def test_resume_from_checkpoint_is_honoured_and_checked(tmp_path):
    two, four = fake_checkpoint(tmp_path, 2), fake_checkpoint(tmp_path, 4)
    assert last_checkpoint(args(tmp_path, str(two))) == str(two)  # not the newest: the one asked for
    assert last_checkpoint(args(tmp_path, "true")) == str(four)
    with pytest.raises(ValueError, match=rf"^resume_from_checkpoint {tmp_path}/checkpoint-9 does not exist \(output_dir's "
                                         rf"newest checkpoint is {four}\); nothing was trained$"):
        asked_checkpoint(args(tmp_path, str(tmp_path / "checkpoint-9")))
    with pytest.raises(ValueError, match="is a file, not a checkpoint folder"):
        asked_checkpoint(args(tmp_path, str(four / "config.json")))
    (two / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match="is not a complete checkpoint"):
        asked_checkpoint(args(tmp_path, str(two)))
    cut(four / "model.safetensors")
    with pytest.raises(ValueError, match=f"^resume_from_checkpoint {four}: model.safetensors is cut short"):
        asked_checkpoint(args(tmp_path, str(four)))


def test_the_lock_names_its_holder_and_a_refused_run_leaves_no_trace(tmp_path):
    folder = tmp_path / "new"
    first = OutputDirLock(str(folder)).acquire()
    holder = json.loads((folder / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid()
    with pytest.raises(ValueError, match=rf"is being written by another run \(process {os.getpid()} on "):
        OutputDirLock(str(folder)).acquire()
    first.release(wrote_nothing=True)  # it made the folder and wrote nothing: both go
    assert not folder.exists()
    again = OutputDirLock(str(folder)).acquire()
    (folder / "model.safetensors").write_text("x")
    again.release(wrote_nothing=True)  # something else is there: the folder stays
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors"]
    third = OutputDirLock(str(folder)).acquire()
    third.release()  # a run that succeeded leaves the empty lock file (removing it could let two runs both lock)
    assert (folder / LOCK_FILE).read_text() == ""
    OutputDirLock(str(folder)).acquire().release()  # and the next run takes it


def test_a_second_run_on_the_same_output_dir_is_refused_naming_the_first(tiny_run, tmp_path):
    output = tmp_path / "sft"
    holder = OutputDirLock(str(output)).acquire()  # this test process stands for the first run
    (output / "checkpoint-3").mkdir()
    result = run_python("scripts/sft.py", "--config", tiny_run["recipes"] / "sft.yaml", "--output_dir", output,
                        check=False)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: sft: output_dir {output} is being written by another run (process {os.getpid()} "), line
    assert "nothing was written" in line and "Traceback" not in result.stderr
    assert sorted(p.name for p in output.iterdir()) == [LOCK_FILE, "checkpoint-3"]
    holder.release()


def test_a_recipe_without_output_dir_is_refused(tiny_run, tmp_path):
    recipe = yaml.safe_load((tiny_run["recipes"] / "sft.yaml").read_text())
    del recipe["output_dir"]
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(recipe))
    result = subprocess.run([sys.executable, ROOT / "scripts/sft.py", "--config", tmp_path / "sft.yaml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: sft: recipe '{tmp_path / 'sft.yaml'}' has no output_dir: set output_dir in the recipe or with "
        "--output_dir (transformers would write to ./trainer_output) (PIPELINE_DEBUG=1 shows the traceback)")
    assert os.listdir(tmp_path) == ["sft.yaml"]
    (tmp_path / "chain").mkdir()  # the runner says the same before running anything, and writes nothing
    os.replace(tmp_path / "sft.yaml", tmp_path / "chain" / "sft.yaml")
    result = subprocess.run([sys.executable, "-m", "pipeline", "run", tmp_path / "chain"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2 and "has no output_dir: set output_dir in the recipe" in result.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["chain", "sft.yaml"]


def test_evaluation_without_a_test_split_says_it_is_not_held_out_and_fits_max_prompt_length(tiny_run, tmp_path):
    """GRPO on a prompts file without a test split, some prompts longer than max_prompt_length: training drops them,
    and so does the evaluation after training (it used to take every prompt, and crash on the long ones after
    training, losing the model); the results say the evaluation ran on training prompts."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_run["outputs"] / "sft")
    short = [f"Write a review of Film {i}." for i in range(12)]
    long = ["Write a review of " + " and ".join(f"The Film Number {j}" for j in range(30)) + "." for _ in range(4)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}]}) + "\n" for p in short + long))
    lengths = [len(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                 return_dict=False))
               for p in short + long]
    limit = max(lengths[:12])
    assert min(lengths[12:]) > limit
    output = tmp_path / "grpo"
    result = run_python("scripts/grpo.py", "--config", tiny_run["recipes"] / "grpo.yaml", "--output_dir", output,
                        "--dataset_name", prompts, "--max_prompt_length", limit, "--max_steps", 2, "--report_to", "none",
                        "--eval_max_prompts", 64)
    log = result.stdout + result.stderr
    assert "has no test split: the evaluation after training uses training prompts, which are not held out" in log
    results = json.loads((output / "results.json").read_text())
    assert results["eval_held_out"] is False and results["eval_prompts"] == 12
    assert json.loads((tiny_run["outputs"] / "grpo" / "results.json").read_text())["eval_held_out"] is True


def test_the_runner_passes_sigterm_on_to_its_running_stages_and_waits_for_their_checkpoints(tmp_path):
    """`pipeline run` sent SIGTERM (Kubernetes signals the container's first process; `kill` on a plain machine)
    passes it on to the stages running (here two forked stand-ins, as --jobs 2 runs them), waits while they write
    their checkpoint, then stops with Stopped (exit 143 in `main`) instead of dying and leaving them orphaned."""
    import signal
    import threading
    import time

    from pipeline import cli

    def stand_in(marker: Path):
        def body():
            got = []
            signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
            deadline = time.time() + 30
            while not got and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(0.3)  # "writing the checkpoint": the runner must wait for it
            marker.write_text(json.dumps(got))
            sys.exit(128 + got[0] if got else 0)
        return body

    markers = [tmp_path / "a", tmp_path / "b"]
    children = [cli.start(["true"], stand_in(marker)) for marker in markers]
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    codes = []
    with pytest.raises(cli.Stopped) as stopped:
        for _, code in cli.wait(children):
            codes.append(code)
    assert stopped.value.signum == signal.SIGTERM and codes == [143, 143]
    assert [json.loads(marker.read_text()) for marker in markers] == [[signal.SIGTERM]] * 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the runner's handler is gone after the wait


def test_a_path_of_the_wrong_kind_is_named_as_such(tmp_path):
    """A stage given a folder where its recipe file goes (`--config recipes/tiny`: it said "does not exist"), or a
    file where a model folder goes (it said "the config file at 'README.md' is not a valid JSON file")."""
    from pipeline.config import parse
    from pipeline.models import check_model_kind

    with pytest.raises(ValueError, match=r"^recipe '.*recipes/tiny' is a folder, not a recipe file: give one of its "
                                         r"recipes \(dpo-lora.yaml, dpo.yaml, .*\) \(python -m pipeline run .*recipes/tiny"):
        parse("sft", ["--config", str(ROOT / "recipes" / "tiny")])
    with pytest.raises(ValueError, match=r"^model_name_or_path 'README.md' is a file, not a model folder: give the "
                                         r"folder that holds the model's config.json"):
        check_model_kind("README.md", "causal-lm", "model_name_or_path")


def test_a_folder_no_stage_wrote_is_not_taken_as_output_dir(tmp_path):
    """A user's folder with files of its own (they would be overwritten: config.json, README.md)."""
    from pipeline.stages.common import STAGE_FILE, StageOutputError, claim_output_dir

    folder = tmp_path / "mine"
    folder.mkdir()
    claim_output_dir(str(folder), "sft")  # empty: fine
    (folder / "README.md").write_text("my notes")
    (folder / "config.json").write_text("{}")
    with pytest.raises(StageOutputError, match=r"holds files that no stage of the pipeline wrote \(README.md, "
                                               r"config.json\), which the stage would overwrite: give it a new or "
                                               r"empty folder \(nothing was written\)$"):
        claim_output_dir(str(folder), "sft")
    (folder / STAGE_FILE).write_text(json.dumps({"stage": "sft"}))
    claim_output_dir(str(folder), "sft")  # the stage's own folder, rerun
    assert (folder / "README.md").read_text() == "my notes"


def test_resume_from_another_stages_checkpoint_is_refused(tmp_path):
    from pipeline.stages.common import STAGE_FILE

    sft = tmp_path / "sft"
    checkpoint = fake_checkpoint(sft, 4)
    (sft / STAGE_FILE).write_text(json.dumps({"stage": "sft"}))
    assert asked_checkpoint(args(tmp_path / "more-sft", str(checkpoint)), "sft") == str(checkpoint)
    with pytest.raises(ValueError, match=rf"^resume_from_checkpoint {checkpoint} is a checkpoint of the sft stage, "
                                         r"not dpo: resume dpo from one of its own checkpoints"):
        asked_checkpoint(args(tmp_path / "dpo", str(checkpoint)), "dpo")


def test_a_signal_to_a_worker_the_stage_forked_ends_the_worker_quietly():
    """datasets' map with num_proc forks workers that inherit the stage's handler: a SIGTERM reaching them (Slurm
    and `pkill -f` signal every process) ends them with 143 and no traceback of their own, and the stage decides;
    a data loader's worker, forked while training, ignores it and serves batches to the step boundary."""
    import signal

    from pipeline.stages import preemption

    previous = preemption.install("sft")
    try:
        for training, expected in ((False, 143), (True, 0)):
            preemption._State.training = training
            pid = os.fork()
            if pid == 0:
                os.kill(os.getpid(), signal.SIGTERM)
                os._exit(0)
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == expected
        assert preemption.received() is None  # the stage's own process was not signalled
    finally:
        preemption._State.training = False
        preemption.restore(previous)
