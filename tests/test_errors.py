"""Bad input that only shows while a stage runs: an output folder that cannot be written (read-only, full disk)
and SFT rows longer than max_length. Each stage runs as a subprocess, as a user would run it; docs/errors.md
lists every bad input with the test that checks it."""

import ctypes
import errno
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest
from datasets import Dataset

from conftest import ROOT, run_python
from pipeline.data import DataError
from pipeline.stages import describe_write_error
from pipeline.stages.sft import fit_to_max_length

TINY_PRETRAIN = ["--config", ROOT / "recipes" / "tiny" / "pretrain.yaml", "--vocab_size", "400", "--n_layer", "1",
                 "--n_embd", "32", "--n_head", "2", "--max_length", "64", "--dataset_test_split", "none",
                 "--report_to", "none", "--disable_tqdm", "true"]
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER = 1, 2, 3


def mode_bits_apply():
    """preexec_fn: make file permission bits apply to the child. A non-root child needs nothing. As root (CI
    containers, this machine), the capabilities that bypass them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH,
    CAP_FOWNER) are dropped from the child's bounding set, so after exec it has them no more: it is still uid 0,
    owner of the repository, the venv and its caches, but a folder of mode 0555 is read-only to it, as to anyone.
    (setuid to an unprivileged user would not do here: the venv's python lives under /root, mode 0700.)"""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def file_size_limit(limit: int):
    """preexec_fn: a disk that fills up. Every file the child writes is capped at `limit` bytes
    (RLIMIT_FSIZE, `ulimit -f`), with SIGXFSZ ignored, so a longer write fails with EFBIG as a write to a full
    disk fails with ENOSPC."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def snapshot(folder) -> dict:
    """relative path -> sha256 of every file under `folder`."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def error_line(result, stage: str) -> str:
    """The one `error: <stage>: ...` line of a failed stage; no traceback."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"error: {stage}: ")
    return lines[0]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny pretrain output: one step, with checkpoint-1 beside the final model (~15 s on 2 cores)."""
    out = tmp_path_factory.mktemp("errors") / "pretrain"
    run_python("scripts/pretrain.py", *TINY_PRETRAIN, "--max_steps", "1", "--save_steps", "1", "--output_dir", out)
    assert (out / "checkpoint-1" / "trainer_state.json").exists() and (out / "model.safetensors").exists()
    return out


@pytest.fixture
def read_only(tmp_path):
    """Make a folder read-only (0555) for a child started with mode_bits_apply; skip where that cannot be done."""
    made = []

    def make(folder):
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o555)
        made.append(folder)
        try:
            probe = subprocess.run([sys.executable, "-c", f"open({str(folder / 'probe')!r}, 'w')"],
                                   preexec_fn=mode_bits_apply, capture_output=True)
        except subprocess.SubprocessError as error:
            pytest.skip(f"cannot drop root's file capabilities in a child here: {error}")
        if probe.returncode == 0:
            pytest.skip("a folder of mode 0555 is still writable to a child process here")
        return folder

    yield make
    for folder in made:
        folder.chmod(0o755)


def test_read_only_output_dir_fails_before_training_and_keeps_its_files(pretrained, tmp_path, read_only):
    out = tmp_path / "pretrain"
    shutil.copytree(pretrained, out)
    before = snapshot(out)
    read_only(out)
    result = run_python("scripts/pretrain.py", *TINY_PRETRAIN, "--max_steps", "2", "--output_dir", out,
                        check=False, preexec_fn=mode_bits_apply)
    line = error_line(result, "pretrain")
    assert f"cannot write to {out}: permission denied; nothing was trained or written" in line
    assert "resuming from" not in result.stdout and "train_loss" not in result.stdout  # stopped before the stage
    assert snapshot(out) == before
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in pretrained.iterdir())


def test_new_output_dir_under_a_read_only_folder(tmp_path, read_only):
    parent = read_only(tmp_path / "locked")
    result = run_python("scripts/pretrain.py", *TINY_PRETRAIN, "--max_steps", "1", "--output_dir", parent / "out",
                        check=False, preexec_fn=mode_bits_apply)
    line = error_line(result, "pretrain")
    assert f"cannot write to {parent} (to create output_dir {parent / 'out'}): permission denied" in line
    assert list(parent.iterdir()) == []


def test_full_disk_while_saving_a_checkpoint_keeps_the_earlier_one(pretrained, tmp_path):
    """The run resumes from checkpoint-1, trains, and fails writing checkpoint-2's weights (120 KB > the 64 KB
    file size limit). The files of the earlier run, checkpoint-1 and the final model included, are untouched."""
    out = tmp_path / "pretrain"
    shutil.copytree(pretrained, out)
    before = snapshot(out)
    result = run_python("scripts/pretrain.py", *TINY_PRETRAIN, "--max_steps", "3", "--save_steps", "1",
                        "--output_dir", out, check=False, preexec_fn=file_size_limit(64_000))
    line = error_line(result, "pretrain")
    assert f"cannot write to {out}" in line and "file too large (the file size limit, `ulimit -f`, was reached)" in line
    assert "resuming from" in result.stdout  # it got as far as training
    after = snapshot(out)
    # README.md is left out: TRL's SFTTrainer writes its own model card over it before every checkpoint it
    # saves, full disk or not (the stage writes the pipeline's card again when it finishes).
    assert {path: after.get(path) for path in before if path != "README.md"} == {
        path: digest for path, digest in before.items() if path != "README.md"}
    assert "checkpoint-1/model.safetensors" in after and "model.safetensors" in after


@pytest.mark.parametrize("error, output_dir, expected", [
    (OSError(errno.EROFS, "Read-only file system", "/mnt/out/config.json"), "/mnt/out",
     "cannot write to /mnt/out/config.json: read-only file system"),
    (OSError(errno.ENOSPC, "No space left on device", "/data/out/checkpoint-2/optimizer.pt"), "/data/out",
     "cannot write to /data/out/checkpoint-2/optimizer.pt: no space left on device"),
    (OSError(errno.EDQUOT, "Disk quota exceeded", "/home/u/out/x"), "/home/u/out",
     "cannot write to /home/u/out/x: disk quota exceeded"),
    (OSError(errno.EACCES, "Permission denied", "/srv/data.jsonl"), "/home/u/out",
     "cannot access /srv/data.jsonl: permission denied"),
    # safetensors (Rust) reports I/O errors with their errno in the text, and no file name
    (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"), "/data/out",
     "cannot write to /data/out: no space left on device"),
    (ValueError("learning_rate must be positive"), "/data/out", None),
    (OSError(errno.ENOENT, "No such file or directory", "/x"), "/data/out", None),
])
def test_write_errors_are_named_by_their_cause(error, output_dir, expected):
    assert describe_write_error(error, output_dir) == expected


# ----------------------------------------------------------------------------- SFT rows longer than max_length

def tokenized(*rows):
    """(prompt length, completion length) -> {"input_ids", "labels"} as TRL prepares them (prompt labels -100)."""
    return Dataset.from_list([{"input_ids": list(range(p + c)), "labels": [-100] * p + list(range(p, p + c))}
                              for p, c in rows])


def test_overlong_rows_are_truncated_and_counted(caplog):
    data = tokenized((4, 4), (4, 20), (12, 4), (3, 5))  # 2 over max_length=10; (12, 4) keeps no completion token
    with caplog.at_level("WARNING", logger="pipeline"):
        out = fit_to_max_length(data, 10, "truncate", "x [train]")
    assert [len(ids) for ids in out["input_ids"]] == [8, 10, 8]
    assert out[1]["labels"] == [-100] * 4 + list(range(4, 10))
    assert ("x [train]: 2 of 4 rows are longer than max_length=10 tokens: truncated (overlong_rows: truncate); "
            "1 rows have no completion token within max_length: dropped; 3 rows left") in caplog.text


def test_overlong_rows_are_dropped_and_counted(caplog):
    data = tokenized((4, 4), (4, 20), (12, 4), (3, 5))
    with caplog.at_level("WARNING", logger="pipeline"):
        out = fit_to_max_length(data, 10, "drop", "x [train]")
    assert [len(ids) for ids in out["input_ids"]] == [8, 8]
    assert "x [train]: 2 of 4 rows are longer than max_length=10 tokens: dropped (overlong_rows: drop)" in caplog.text


def test_overlong_rows_keep_end_and_selected_rows(caplog):
    """truncation_mode keep_end keeps the last max_length tokens (so (12, 4) keeps its completion and (4, 20)
    is cut from the front); rows behind an indices mapping (a select or a shuffle) are read in that order."""
    data = tokenized((3, 5), (4, 20), (12, 4), (4, 4), (10, 0)).select([3, 2, 1, 0, 4])
    with caplog.at_level("WARNING", logger="pipeline"):
        out = fit_to_max_length(data, 10, "truncate", "x [train]", truncation_mode="keep_end")
    assert [len(ids) for ids in out["input_ids"]] == [8, 10, 10, 8]
    assert out[1]["labels"] == [-100] * 6 + list(range(12, 16)) and out[2]["labels"] == list(range(14, 24))
    assert ("x [train]: 2 of 5 rows are longer than max_length=10 tokens: truncated (overlong_rows: truncate); "
            "1 rows have no completion token within max_length: dropped; 4 rows left") in caplog.text


def test_no_row_within_max_length_is_an_error():
    with pytest.raises(DataError, match=r"x \[train\]: no row fits in max_length=4 tokens \(2 of 2 are longer\); "
                                        "raise max_length or set overlong_rows: truncate"):
        fit_to_max_length(tokenized((4, 4), (2, 8)), 4, "drop", "x [train]")


LONG_ROWS = ([{"prompt": "Write a review of The Lost River.", "completion": " The Lost River is a superb drama."}] * 6
             + [{"prompt": "Write a review of The Lost River.", "completion": " It felt superb." * 40}] * 3
             + [{"prompt": "Write a review of The Lost River. " * 30, "completion": " Fine."}])


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "bfd-packed"])
@pytest.mark.parametrize("mode, expected", [
    ("truncate", "4 of 10 rows are longer than max_length=48 tokens: truncated (overlong_rows: truncate); "
                 "1 rows have no completion token within max_length: dropped; 9 rows left"),
    ("drop", "4 of 10 rows are longer than max_length=48 tokens: dropped (overlong_rows: drop); 6 rows left"),
])
def test_sft_stage_reports_and_handles_overlong_rows(pretrained, tmp_path, mode, expected, packing):
    """bfd packing keeps rows whole: the rows are fitted (and counted) first, then packed."""
    data_file = tmp_path / "long.jsonl"
    data_file.write_text("\n".join(json.dumps(row) for row in LONG_ROWS))
    result = run_python("scripts/sft.py", "--config", ROOT / "recipes" / "tiny" / "sft.yaml",
                        "--model_name_or_path", pretrained, "--dataset_name", data_file, "--max_length", "48",
                        "--overlong_rows", mode, "--max_steps", "1", "--save_strategy", "no", "--report_to", "none",
                        "--disable_tqdm", "true", "--output_dir", tmp_path / "sft",
                        *(["--packing", "true", "--packing_strategy", "bfd"] if packing else []))
    assert f"{data_file} [train]: {expected}" in result.stdout
    assert json.loads((tmp_path / "sft" / "results.json").read_text())["train_loss"] > 0


def test_sft_stage_with_every_row_too_long_says_so(pretrained, tmp_path):
    data_file = tmp_path / "long.jsonl"
    data_file.write_text("\n".join(json.dumps(row) for row in LONG_ROWS))
    result = run_python("scripts/sft.py", "--config", ROOT / "recipes" / "tiny" / "sft.yaml",
                        "--model_name_or_path", pretrained, "--dataset_name", data_file, "--max_length", "8",
                        "--overlong_rows", "drop", "--report_to", "none", "--output_dir", tmp_path / "sft",
                        check=False)
    line = error_line(result, "sft")
    assert (f"{data_file} [train]: no row fits in max_length=8 tokens (10 of 10 are longer); raise max_length or "
            "set overlong_rows: truncate") in line


def test_overlong_rows_drop_with_packing_is_refused(tmp_path):
    from pipeline.config import parse
    from pipeline.stages import sft

    args = parse("sft", ["--config", str(ROOT / "recipes" / "tiny" / "sft.yaml"), "--packing", "true",
                         "--packing_strategy", "wrapped", "--overlong_rows", "drop",
                         "--output_dir", str(tmp_path / "sft")])
    with pytest.raises(ValueError, match="overlong_rows: drop needs packing: false or packing_strategy: bfd "
                                         r"\(packing_strategy wrapped splits"):
        sft.main(*args)
    assert not (tmp_path / "sft").exists()


def test_ppo_prompts_longer_than_max_prompt_length_are_dropped_and_counted(caplog):
    """PPO's side of over-long rows (pipeline/stages/ppo.py: tokenize_prompts): dropped and counted, and an
    error naming the limit when none is left."""
    from pipeline.models import train_tokenizer
    from pipeline.stages.ppo import tokenize_prompts

    tokenizer = train_tokenizer(["Write a review of The Lost River.", "It felt dull."] * 50, vocab_size=300)
    prompts = Dataset.from_list([{"prompt": [{"role": "user", "content": "Write a review."}]},
                                 {"prompt": [{"role": "user", "content": "Write a review of The Lost River. " * 20}]}])
    with caplog.at_level("WARNING", logger="pipeline"):
        kept = tokenize_prompts(prompts, tokenizer, 32, "p [train]")
    assert len(kept) == 1 and len(kept[0]["input_ids"]) <= 32
    assert "p [train]: dropped 1 prompts longer than 32 tokens" in caplog.text
    with pytest.raises(DataError, match=r"^p \[train\]: every prompt is longer than max_prompt_length=4 tokens$"):
        tokenize_prompts(prompts, tokenizer, 4, "p [train]")
