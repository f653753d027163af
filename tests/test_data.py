"""Data normalisation for each format, hh-rlhf transcripts, local files, and one-line validation errors."""

import json

import pytest
from datasets import Dataset

from pipeline.data import DataError, load_for, load_splits, normalise, parse_transcript
from pipeline.config import parse
from conftest import ROOT

USER = {"role": "user", "content": "Write a review of The Lost River."}
GOOD = {"role": "assistant", "content": "The Lost River is a superb drama."}
BAD = {"role": "assistant", "content": "It felt dull."}
HH_CHOSEN = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Recommend a film?\n\nAssistant: The Lost River."
HH_REJECTED = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Recommend a film?\n\nAssistant: No."


def rows(*examples):
    return Dataset.from_list(list(examples))


def test_parse_transcript_splits_turns_and_keeps_inner_newlines():
    turns = parse_transcript("\n\nHuman: line one\nline two\n\nAssistant: sure")
    assert turns == [{"role": "user", "content": "line one\nline two"}, {"role": "assistant", "content": "sure"}]
    with pytest.raises(ValueError):
        parse_transcript("no turns here")


@pytest.mark.parametrize("example, expected_columns", [
    ({"text": "plain text"}, ["text"]),
    ({"messages": [USER, GOOD]}, ["messages"]),
    ({"prompt": "Say hi.", "completion": " Hi."}, ["prompt", "completion"]),
    ({"prompt": [USER], "completion": [GOOD]}, ["prompt", "completion"]),
])
def test_sft_formats_are_kept(example, expected_columns):
    out = normalise(rows({**example, "extra": 1}), "sft", "x")
    assert out.column_names == expected_columns
    assert out[0] == {k: example[k] for k in expected_columns}


def test_hh_transcript_for_sft_learns_the_last_assistant_turn():
    out = normalise(rows({"chosen": HH_CHOSEN, "rejected": HH_REJECTED}), "sft", "x")[0]
    assert [t["role"] for t in out["prompt"]] == ["user", "assistant", "user"]
    assert out["completion"] == [{"role": "assistant", "content": "The Lost River."}]


def test_hh_transcript_preference_shares_the_prompt():
    out = normalise(rows({"chosen": HH_CHOSEN, "rejected": HH_REJECTED}), "preference", "x")[0]
    assert out["prompt"][-1] == {"role": "user", "content": "Recommend a film?"}
    assert out["chosen"] == [{"role": "assistant", "content": "The Lost River."}]
    assert out["rejected"] == [{"role": "assistant", "content": "No."}]


@pytest.mark.parametrize("example", [
    {"prompt": "Q?", "chosen": " yes", "rejected": " no"},
    {"chosen": "Q? yes", "rejected": "Q? no"},
    {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]},
    {"chosen": [USER, GOOD], "rejected": [USER, BAD]},
])
def test_preference_formats_are_kept(example):
    out = normalise(rows(example), "preference", "x")
    assert out[0] == example


@pytest.mark.parametrize("example, expected", [
    ({"prompt": "Q?"}, "Q?"),
    ({"prompt": [USER]}, [USER]),
    ({"messages": [USER, GOOD]}, [USER]),
    ({"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, parse_transcript(HH_CHOSEN)[:-1]),
])
def test_prompt_formats(example, expected):
    assert normalise(rows(example), "prompt", "x")[0] == {"prompt": expected}


@pytest.mark.parametrize("use, example, problem", [
    ("preference", {"prompt": "Q?", "chosen": " same", "rejected": " same"}, "identical"),
    ("preference", {"prompt": "Q?", "chosen": "", "rejected": " no"}, "'chosen' is empty"),
    ("preference", {"prompt": "Q?", "chosen": None, "rejected": " no"}, "'chosen' is missing"),
    ("sft", {"prompt": [USER], "completion": [{"role": "assistant", "content": " "}]}, "empty or non-string"),
    ("text", {"text": "   "}, "'text' is empty"),
    ("prompt", {"prompt": [USER, GOOD]}, "does not end with a user turn"),
])
def test_bad_rows_name_source_row_and_problem(use, example, problem):
    good = {"text": "fine"} if use == "text" else None
    data = [example] if good is None else [good, example]
    with pytest.raises(DataError) as error:
        normalise(Dataset.from_list(data), use, "data.jsonl")
    message = str(error.value)
    assert message.startswith("data.jsonl: row ")
    assert f"row {len(data) - 1}:" in message and problem in message


def test_non_string_field_is_rejected():
    with pytest.raises(DataError, match="row 0: 'text' is a int"):
        normalise(Dataset.from_list([{"text": 3}]), "text", "x")


def test_missing_columns_name_what_was_expected():
    with pytest.raises(DataError, match=r"x: missing columns for preference data.*found \['answer', 'question'\]"):
        normalise(rows({"question": "a", "answer": "b"}), "preference", "x")


def test_drop_mode_counts_and_drops_bad_rows(capsys):
    data = rows({"prompt": "Q?", "chosen": " a", "rejected": " b"}, {"prompt": "Q?", "chosen": " a", "rejected": " a"})
    out = normalise(data, "preference", "x", invalid_rows="drop")
    assert len(out) == 1
    assert "dropped 1 of 2 rows" in capsys.readouterr().out


def test_local_jsonl_in_hh_rlhf_format_loads_for_every_stage(tmp_path):
    path = tmp_path / "hh.jsonl"
    path.write_text("\n".join(json.dumps({"chosen": HH_CHOSEN, "rejected": HH_REJECTED}) for _ in range(3)))
    for stage, use in (("sft", "sft"), ("reward", "preference"), ("ppo", "prompt")):
        recipe = ROOT / "recipes" / "gpt2-hh" / f"{stage}.yaml"
        script_args, _, _ = parse(stage, ["--config", str(recipe), "--bf16", "false", "--dataset_name", str(path)])
        train, test, source = load_for(use, script_args)
        assert len(train) == 3 and test is None and source == str(path)


def test_local_parquet_and_folder_with_splits(tmp_path):
    Dataset.from_list([{"prompt": "Q?", "completion": " A."}]).to_parquet(str(tmp_path / "one.parquet"))
    train, test, _ = load_splits(str(tmp_path / "one.parquet"))
    assert train[0] == {"prompt": "Q?", "completion": " A."} and test is None
    folder = tmp_path / "folder"
    folder.mkdir()
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text(json.dumps({"text": split}) + "\n")
    train, test, _ = load_splits(str(folder))
    assert train[0]["text"] == "train" and test[0]["text"] == "test"


@pytest.mark.parametrize("content, problem", [
    (None, "no such file"),
    ("", "the file is empty"),
    ('{"text": "ok"}\n{"text": broken\n', "could not be read"),
])
def test_unreadable_local_files(tmp_path, content, problem):
    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=problem) as error:
        load_splits(str(path))
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_dataset_with_no_rows_is_named():
    with pytest.raises(DataError, match="^data.jsonl: the dataset has no rows$"):
        normalise(Dataset.from_list([]), "sft", "data.jsonl")


def test_drop_mode_with_every_row_bad_is_an_error(capsys):
    data = rows({"prompt": "Q?", "chosen": " a", "rejected": " a"}, {"prompt": "Q?", "chosen": None, "rejected": " b"})
    with pytest.raises(DataError, match="^x: no valid rows left$"):
        normalise(data, "preference", "x", invalid_rows="drop")
    assert "dropped 2 of 2 rows (first: row 0: 'chosen' and 'rejected' are identical)" in capsys.readouterr().out


def test_missing_split_and_missing_dataset_name(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n")
    with pytest.raises(DataError, match=rf"^{path}: no 'validation' split \(it has: train\)$"):
        load_splits(str(path), train_split="validation")
    with pytest.raises(DataError, match="^no dataset given: set `dataset_name`"):
        load_splits(None)


def test_unknown_embedded_kind():
    with pytest.raises(ValueError, match="embedded:sft"):
        load_splits("embedded:nope")


def test_normalised_files_are_cached_and_the_cache_follows_the_code(tmp_path, monkeypatch):
    """Data read from a file is checked once: a second load of the same file reuses the cached result (no row
    checked again), and TRL's tokenization after it is cached too; a change to pipeline/data.py's code (its
    version key) checks the rows again."""
    from trl import SFTConfig, SFTTrainer
    from transformers import GPT2Config, GPT2LMHeadModel

    import pipeline.data as data
    from pipeline.models import train_tokenizer

    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": [USER], "completion": [GOOD if i % 2 else BAD]})
                              for i in range(40)))
    checked = []
    original = data._normalise_row
    monkeypatch.setattr(data, "_normalise_row", lambda *a: checked.append(1) or original(*a))

    def load():
        train, _, _ = load_splits(str(path))
        return normalise(train, "sft", "x")

    first = load()
    assert len(checked) == 40 and first.cache_files  # written to disk
    second = load()
    assert len(checked) == 40 and second._fingerprint == first._fingerprint  # loaded, not checked again
    assert second.to_list() == first.to_list()
    monkeypatch.setattr(data, "_CODE_VERSION", "another-version")
    load()
    assert len(checked) == 80

    tokenizer = train_tokenizer([USER["content"], GOOD["content"], BAD["content"]] * 20, vocab_size=300)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_embd=16, n_head=2))
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=second,
                         args=SFTConfig(output_dir=str(tmp_path / "out"), max_length=64, report_to="none",
                                        use_cpu=True))
    assert trainer.train_dataset.cache_files  # TRL's tokenization of it went to the cache as well


def test_conversational_preference_rows_feed_sft_and_prompt_stages(tmp_path):
    """TRL's conversational preference format (trl-lib/ultrafeedback_binarized: chosen/rejected conversations, the
    prompt implicit in them) serves every stage: SFT learns the chosen answer given its prompt, the online stages
    sample answers to the prompt."""
    from datasets import Dataset

    from pipeline.data import normalise

    user = {"role": "user", "content": "Write a review of The Lost River."}
    rows = Dataset.from_list([{"chosen": [user, {"role": "assistant", "content": "A superb drama."}],
                               "rejected": [user, {"role": "assistant", "content": "Dull."}],
                               "score_chosen": 8.0, "score_rejected": 2.0}])
    sft = normalise(rows, "sft", "uf")[0]
    assert sft == {"prompt": [user], "completion": [{"role": "assistant", "content": "A superb drama."}]}
    assert normalise(rows, "prompt", "uf")[0] == {"prompt": [user]}
    assert normalise(rows, "preference", "uf")[0]["chosen"][-1]["content"] == "A superb drama."
