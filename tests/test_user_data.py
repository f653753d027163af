"""What a new user brings as data (issue 27): local files of every format `datasets` reads, conversations with
roles or shapes a stage cannot use, SFT on `messages` rows with the loss on the assistant turns only, and DPO
pairs longer than max_length. Each bad input gets one line naming the file (or source, row and field) and what to
do. In process, on tiny in-memory data and micro tokenizers/models."""

import bz2
import gzip
import json
import lzma

import pytest
from datasets import Dataset, DatasetDict

from pipeline.data import DataError, load_splits, normalise

ROWS = [{"prompt": "Q?", "completion": " A."}, {"prompt": "Q2?", "completion": " B."}]
JSONL = "\n".join(json.dumps(row) for row in ROWS) + "\n"
CSV = "prompt,completion\nQ?, A.\nQ2?, B.\n"


def test_local_files_of_every_format_datasets_reads_load(tmp_path):
    """Before: .csv, .tsv, .txt, compressed and upper-case files got "Couldn't find any data file at X"."""
    writers = {
        "data.csv": lambda p: p.write_text(CSV),
        "bom.csv": lambda p: p.write_text(CSV, encoding="utf-8-sig"),  # Excel's byte-order mark
        "data.tsv": lambda p: p.write_text(CSV.replace(",", "\t")),
        "data.JSONL": lambda p: p.write_text(JSONL),
        "data.ndjson": lambda p: p.write_text(JSONL),
        "data.json": lambda p: p.write_text(json.dumps(ROWS)),
        "data.jsonl.gz": lambda p: p.write_bytes(gzip.compress(JSONL.encode())),
        "data.json.bz2": lambda p: p.write_bytes(bz2.compress(json.dumps(ROWS).encode())),
        "data.CSV.XZ": lambda p: p.write_bytes(lzma.compress(CSV.encode())),
        "data.Parquet": lambda p: Dataset.from_list(ROWS).to_parquet(str(p)),
    }
    for name, write in writers.items():
        write(tmp_path / name)
        train, test, source = load_splits(str(tmp_path / name))
        assert train.to_list() == ROWS and test is None, name
        assert normalise(train, "sft", source).column_names == ["prompt", "completion"]
    (tmp_path / "corpus.txt").write_text("one line\nanother line\n")
    assert load_splits(str(tmp_path / "corpus.txt"))[0]["text"] == ["one line", "another line"]


def test_local_folders_saved_datasets_and_bad_files_get_one_line(tmp_path):
    saved = tmp_path / "saved"  # Dataset.save_to_disk: before, "Please use `load_from_disk` instead"
    Dataset.from_list(ROWS).save_to_disk(str(saved))
    assert load_splits(str(saved))[0].to_list() == ROWS
    DatasetDict(train=Dataset.from_list(ROWS), test=Dataset.from_list(ROWS[:1])).save_to_disk(str(tmp_path / "dict"))
    assert len(load_splits(str(tmp_path / "dict"))[1]) == 1
    shards = tmp_path / "shards"  # before: b.JSONL and c.jsonl.gz were left out without a word
    shards.mkdir()
    (shards / "a.jsonl").write_text(JSONL)
    (shards / "b.JSONL").write_text(JSONL)
    (shards / "c.jsonl.gz").write_bytes(gzip.compress(JSONL.encode()))
    (shards / "README.md").write_text("# notes\n")
    assert len(load_splits(str(shards))[0]) == 6
    mixed = tmp_path / "mixed"  # before: datasets read the jsonl files and left the csv out without a word
    mixed.mkdir()
    (mixed / "train.jsonl").write_text(JSONL)
    (mixed / "test.csv").write_text(CSV)
    (tmp_path / "empty").mkdir()
    (tmp_path / "data.yaml").write_text("prompt: Q?\n")
    (tmp_path / "data.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    for name, message in [
            ("mixed", r"the folder holds data files of 2 formats \(train.jsonl; test.csv\); a folder is read as one "
                      r"format: keep one, or give one file as dataset_name$"),
            ("empty", r"the folder holds no data file \(the extensions read: .json, .jsonl, .*\.gz, .bz2"),
            ("data.yaml", r"not a data file this pipeline reads \(the extensions read: .json, .jsonl, .ndjson, .csv, "
                          r".tsv, .txt, .parquet, .arrow, in any case; the text ones also as .gz, .bz2, .xz, .zst, "
                          r".lz4\)$"),
            ("missing.csv", "no such file or folder$")]:
        with pytest.raises(DataError, match=f"^{tmp_path / name}: {message}") as error:
            load_splits(str(tmp_path / name))
        assert "\n" not in str(error.value)
    try:
        import zstandard  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match=r"data.jsonl.zst: reading .zst files needs the zstandard package "
                                            r"\(pip install zstandard\), or decompress the file first$"):
            load_splits(str(tmp_path / "data.jsonl.zst"))
