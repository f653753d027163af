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


USER = {"role": "user", "content": "Write a review of The Lost River."}
SYSTEM = {"role": "system", "content": "You review films."}
ANSWER = {"role": "assistant", "content": "A superb drama."}
OTHER = {"role": "assistant", "content": "Dull."}
TOOL = {"role": "tool", "content": "{\"rating\": 5}"}
BOT = {"role": "bot", "content": "A superb drama."}
ACCEPTED = r"; the roles accepted: system, user, assistant \(rename the role, or drop the turn\)$"


@pytest.mark.parametrize("use, row, problem", [
    # roles the stages' chat templates do not render: before, SFT/PPO/GRPO dropped the turn without a word
    ("sft", {"messages": [USER, TOOL, ANSWER]}, r"'messages' turn 1 has the role 'tool'" + ACCEPTED),
    ("sft", {"messages": [USER, BOT]}, r"'messages' turn 1 has the role 'bot'" + ACCEPTED),
    ("prompt", {"prompt": [SYSTEM, {"role": "human", "content": "Hi"}]}, r"'prompt' turn 1 has the role 'human'"),
    ("preference", {"prompt": [USER], "chosen": [BOT], "rejected": [OTHER]}, r"'chosen' turn 0 has the role 'bot'"),
    ("preference", {"chosen": [USER, BOT], "rejected": [USER, OTHER]}, r"'chosen' turn 1 has the role 'bot'"),
    ("sft", {"messages": [{"role": None, "content": "Hi"}, ANSWER]}, r"'messages' turn 0 has the role None"),
    # shapes that do not fit the stage
    ("sft", {"messages": [SYSTEM, USER]}, r"'messages' has no assistant turn: nothing for SFT to learn$"),
    ("sft", {"messages": "Write a review."}, r"'messages' is a string, expected a list of \{'role', 'content'\} turns"),
    ("sft", {"prompt": "Write a review.", "completion": [ANSWER]},
     r"'completion' is a conversation but 'prompt' is a string: give all of them as strings or all as lists"),
    ("sft", {"prompt": [USER], "completion": [USER, ANSWER]},
     r"'completion' starts with a user turn: after the prompt, 'completion' is the assistant's answer"),
    ("sft", {"prompt": [USER, ANSWER], "completion": [OTHER]}, r"'prompt' ends with an assistant turn"),
    ("sft", {"chosen": [USER], "rejected": [USER, OTHER]}, r"'chosen' has no assistant turn: nothing for SFT to learn$"),
    ("sft", {"chosen": "\n\nHuman: Hi", "rejected": "\n\nHuman: Hi\n\nAssistant: No."},
     r"'chosen' has no Assistant turn"),
    ("preference", {"chosen": "\n\nHuman: Hi\n\nAssistant: Yes.", "rejected": "Hi, no."},
     r"'rejected' is not a .* transcript \(as the first row's is\)$"),
    ("preference", {"prompt": [USER], "chosen": [USER], "rejected": [OTHER]}, r"'chosen' starts with a user turn"),
    ("preference", {"prompt": [USER], "chosen": [ANSWER, USER], "rejected": [OTHER]}, r"'chosen' ends with a user turn"),
    ("preference", {"prompt": "Q?", "chosen": [ANSWER], "rejected": " no"},
     r"'chosen' is a conversation but 'prompt' and 'rejected' are strings"),
    ("preference", {"chosen": [USER, ANSWER], "rejected": [SYSTEM, USER, OTHER]},
     r"'chosen' and 'rejected' do not start with the same turns, so no prompt can be taken from them: give a "
     r"'prompt' column"),
    ("preference", {"prompt": [USER, ANSWER], "chosen": [ANSWER], "rejected": [OTHER]},
     r"'prompt' ends with an assistant turn"),
    # a list where a string goes, multimodal content parts
    ("text", {"text": ["one", "two"]}, r"'text' is a list, expected a string$"),
    ("sft", {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]}]},
     r"'messages' has a user turn whose content is a list \(of parts\?\), not text: only text content is read$"),
])
def test_conversations_with_roles_or_shapes_a_stage_cannot_use_are_refused(use, row, problem):
    data = Dataset.from_list([row])
    with pytest.raises(DataError, match=rf"^src: row 0: {problem}") as error:
        normalise(data, use, "src")
    assert "\n" not in str(error.value)


def test_conversations_of_the_accepted_shapes_pass():
    for use, row in [("sft", {"messages": [SYSTEM, USER, ANSWER, USER, OTHER]}),  # multi-turn, ends with assistant
                     ("sft", {"messages": [USER, ANSWER, USER]}),  # the last user turn is context, not learned
                     ("preference", {"chosen": [SYSTEM, USER, ANSWER], "rejected": [SYSTEM, USER, OTHER]}),
                     ("preference", {"chosen": [USER, ANSWER, USER, ANSWER],  # differ before the last turn
                                     "rejected": [USER, OTHER, USER, OTHER]}),
                     ("prompt", {"prompt": [SYSTEM, USER]})]:
        assert len(normalise(Dataset.from_list([row]), use, "src")) == 1


def _sft_trainer(tokenizer, rows, tmp_path, **config):
    from trl import SFTConfig

    from pipeline.stages.sft import SFTStageTrainer
    from test_any_model import micro_llama

    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_length=64, report_to="none", use_cpu=True, bf16=False,
                     **config)
    return SFTStageTrainer(model=micro_llama(tokenizer), args=args, processing_class=tokenizer,
                           train_dataset=normalise(Dataset.from_list(rows), "sft", "chat.jsonl"), source="chat.jsonl")


def test_messages_sft_learns_only_the_assistant_turns_with_completion_only_loss(tmp_path):
    """Before: TRL's completion_only_loss covers prompt/completion rows only, and `messages` rows were trained on
    the system and user tokens too."""
    from test_any_model import CHATML, word_tokenizer

    chatml = word_tokenizer(CHATML, "<|endoftext|>", "<|pad|>", ("<|im_start|>", "<|im_end|>"))
    system, user = {"role": "system", "content": "the film"}, {"role": "user", "content": "hi a review"}
    first, second = {"role": "assistant", "content": "a film"}, {"role": "assistant", "content": "the review"}
    messages = [system, user, first, user, second]
    trainer = _sft_trainer(chatml, [{"messages": messages}], tmp_path, completion_only_loss=True)
    row = trainer.train_dataset[0]
    tokens = chatml.convert_ids_to_tokens(row["input_ids"])
    learned = [token for token, label in zip(tokens, row["labels"]) if label != -100]
    # each assistant turn's words and its turn end; not its header (<|im_start|> assistant), system or user tokens
    assert learned == ["a", "film", "<|im_end|>", "the", "review", "<|im_end|>"]
    assert all(label in (-100, token) for label, token in zip(row["labels"], row["input_ids"]))
    everything = _sft_trainer(chatml, [{"messages": messages}], tmp_path, completion_only_loss=False).train_dataset[0]
    assert everything["labels"] == everything["input_ids"] == row["input_ids"]  # every token learned


def test_messages_sft_masks_for_the_pipelines_template_and_names_a_template_without_prefixes(tmp_path):
    from pipeline.models import train_tokenizer
    from pipeline.stages.sft import assistant_labels

    tokenizer = train_tokenizer(["Write a review of The Lost River. A superb drama. Dull."] * 50, vocab_size=300)
    ids, labels = assistant_labels(tokenizer, [SYSTEM, USER, ANSWER, USER, OTHER])
    learned = tokenizer.decode([label for label in labels if label != -100])
    assert learned == " A superb drama.<|endoftext|> Dull.<|endoftext|>"  # the answers and their EOS
    # a template that renders an earlier turn differently once more turns follow (Qwen3 drops older thoughts)
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
                               "{{ 'Assistant: (older)' + eos_token }}{% else %}{{ m['role'] + ': ' + m['content'] }}"
                               "{% endif %}{% endfor %}")
    from pipeline.stages.sft import assistant_only_labels
    with pytest.raises(DataError, match=r"^chat.jsonl: row 0: the chat template renders the turns up to assistant "
                                        r"turn 2 differently once more turns follow, so the assistant tokens of "
                                        r"'messages' cannot be found .*; set completion_only_loss: false"):
        assistant_only_labels(Dataset.from_list([{"messages": [SYSTEM, USER, ANSWER, USER, OTHER]}]), tokenizer,
                              "chat.jsonl")
