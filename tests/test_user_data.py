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
    # Phi-3's template ends a conversation (not a turn) with EOS: learned after the last answer only
    from families import PHI3_TEMPLATE
    from test_any_model import word_tokenizer

    phi3 = word_tokenizer(PHI3_TEMPLATE, "<|endoftext|>", "<|pad|>", ("<|system|>", "<|user|>", "<|assistant|>",
                                                                      "<|end|>"))
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a film"},
                    {"role": "user", "content": "a review"}, {"role": "assistant", "content": "the review"}]
    ids, labels = assistant_labels(phi3, conversation)
    assert phi3.convert_ids_to_tokens([label for label in labels if label != -100]) == [
        "a", "film", "<|end|>", "the", "review", "<|end|>", "<|endoftext|>"]
    # a template that renders an earlier turn differently once more turns follow (drops older answers' reasoning)
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
                               "{{ 'Assistant: (older)' + eos_token }}{% else %}{{ m['role'] + ': ' + m['content'] }}"
                               "{% endif %}{% endfor %}")
    from pipeline.stages.sft import assistant_only_labels
    with pytest.raises(DataError, match=r"^chat.jsonl: row 0: the chat template renders the turns up to assistant "
                                        r"turn 2 differently once more turns follow, so the assistant tokens of "
                                        r"'messages' cannot be found .*; set completion_only_loss: false"):
        assistant_only_labels(Dataset.from_list([{"messages": [SYSTEM, USER, ANSWER, USER, OTHER]}]), tokenizer,
                              "chat.jsonl")


def _dpo_trainer(tokenizer, pairs, tmp_path, max_length, **config):
    from transformers import GPT2Config, GPT2LMHeadModel
    from trl import DPOConfig

    from pipeline.stages.dpo import DPOStageTrainer

    def model():
        return GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_embd=16, n_head=2,
                                          bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id))
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), max_length=max_length, report_to="none", use_cpu=True,
                     bf16=False, **config)
    return DPOStageTrainer(model=model(), ref_model=model(), args=args, processing_class=tokenizer,
                           train_dataset=normalise(Dataset.from_list(pairs), "preference", "pairs.jsonl"),
                           source="pairs.jsonl")


def test_dpo_pairs_longer_than_max_length_are_counted_and_none_left_is_one_line(tmp_path, caplog):
    """Before: TRL dropped the pairs whose prompt alone fills max_length without a word, and with none left
    training stopped on a sampler's "num_samples should be a positive integer value, but got num_samples=0"."""
    from pipeline.models import train_tokenizer

    tokenizer = train_tokenizer(["Write a review of The Lost River. A superb drama. Dull."] * 50, vocab_size=300)
    long_prompt = {"role": "user", "content": "Write a review of The Lost River. " * 4}
    pairs = [{"prompt": [USER], "chosen": [ANSWER], "rejected": [OTHER]},
             {"prompt": [long_prompt], "chosen": [ANSWER], "rejected": [OTHER]}]
    prompt_tokens = [len(tokenizer.apply_chat_template(pair["prompt"], add_generation_prompt=True,
                                                       return_dict=True)["input_ids"]) for pair in pairs]
    max_length = prompt_tokens[0] + 2  # the short pair is cut, the long one has no room for an answer
    with caplog.at_level("WARNING", logger="pipeline"):
        trainer = _dpo_trainer(tokenizer, pairs, tmp_path, max_length)
    assert len(trainer.train_dataset) == 1
    assert (f"pairs.jsonl [train]: 1 of 2 pairs are longer than max_length={max_length} tokens (up to "
            in caplog.text and "cut to it (the end of their answers, truncation_mode: keep_start); 1 pairs whose "
            "prompt alone fills max_length: dropped; 1 pairs left" in caplog.text)
    with pytest.raises(DataError, match=rf"^pairs.jsonl \[train\]: every pair's prompt alone fills max_length=8 tokens, "
                                        rf"so no answer token is left to train on \(prompts of {prompt_tokens[0]} to "
                                        rf"{prompt_tokens[1]} tokens; pairs of \d+ to \d+\); raise max_length "
                                        rf"\(above {prompt_tokens[0]} keeps the shortest\), or set truncation_mode: "
                                        r"keep_end \(which cuts the prompt's start instead\)$"):
        _dpo_trainer(tokenizer, pairs, tmp_path, 8)
    kept = _dpo_trainer(tokenizer, pairs, tmp_path, 8, truncation_mode="keep_end")  # the prompts' start is cut
    assert len(kept.train_dataset) == 2


def test_dpo_stage_with_every_pair_too_long_and_sft_with_a_tool_turn_fail_in_one_line(tmp_path):
    """The two lines as a user meets them: a stage run, exit 2, one line, nothing written."""
    import yaml
    from transformers import GPT2Config, GPT2LMHeadModel

    from conftest import ROOT, run_python
    from pipeline.models import train_tokenizer

    tokenizer = train_tokenizer(["Write a review of The Lost River. A superb drama. Dull."] * 50, vocab_size=300)
    model = tmp_path / "model"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_embd=16, n_head=2, n_positions=128,
                               bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)).save_pretrained(model)
    tokenizer.save_pretrained(model)
    pairs = tmp_path / "pairs.jsonl.gz"
    pairs.write_bytes(gzip.compress("".join(json.dumps({"prompt": [USER], "chosen": [ANSWER], "rejected": [OTHER]})
                                            + "\n" for _ in range(4)).encode()))
    recipe = yaml.safe_load((ROOT / "recipes" / "tiny" / "dpo.yaml").read_text())
    del recipe["reward_model_path"]
    recipe.update(model_name_or_path=str(model), dataset_name=str(pairs), max_length=8, dataset_num_proc=None,
                  output_dir=str(tmp_path / "dpo"), report_to="none", disable_tqdm=True, max_steps=1)
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(recipe))
    result = run_python("scripts/dpo.py", "--config", tmp_path / "dpo.yaml", check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: dpo: {pairs} [train]: every pair's prompt alone fills max_length=8 tokens" in result.stderr
    assert "Traceback" not in result.stderr and "num_samples" not in result.stderr
    assert not (tmp_path / "dpo").exists() or not any((tmp_path / "dpo").iterdir())
    chat = tmp_path / "chat.JSONL"
    chat.write_text(json.dumps({"messages": [USER, ANSWER]}) + "\n" + json.dumps({"messages": [USER, TOOL, ANSWER]}))
    recipe = yaml.safe_load((ROOT / "recipes" / "tiny" / "sft.yaml").read_text())
    recipe.update(model_name_or_path=str(model), dataset_name=str(chat), dataset_num_proc=None,
                  output_dir=str(tmp_path / "sft"), report_to="none", disable_tqdm=True, max_steps=1)
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(recipe))
    result = run_python("scripts/sft.py", "--config", tmp_path / "sft.yaml", check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: sft: {chat} [train]: row 1: 'messages' turn 1 has the role 'tool'; the roles accepted: system, user, "
        "assistant (rename the role, or drop the turn) (PIPELINE_DEBUG=1 shows the traceback)")
    assert not (tmp_path / "sft").exists() or not any((tmp_path / "sft").iterdir())


def test_turns_of_a_role_the_chat_template_does_not_render_are_refused():
    """system/user/assistant are accepted by the data check; whether the model's chat template renders each is
    probed (SFT and DPO, before the model loads): one that leaves system turns out, or raises on them (Gemma 2,
    Mistral), refuses data that has them."""
    from pipeline.data import check_roles_rendered
    from pipeline.models import CHAT_TEMPLATE, roles_not_rendered
    from test_any_model import CHATML, word_tokenizer

    tokenizer = word_tokenizer(CHATML, "<|endoftext|>", "<|pad|>", ("<|im_start|>", "<|im_end|>"))
    assert roles_not_rendered(tokenizer) == {}
    tokenizer.chat_template = CHAT_TEMPLATE
    assert roles_not_rendered(tokenizer) == {}
    drops = CHAT_TEMPLATE.replace("{% if message['role'] == 'system' %}{{ message['content'] }}",
                                  "{% if message['role'] == 'system' %}")
    tokenizer.chat_template = drops
    conversation = [SYSTEM, USER, ANSWER]
    assert SYSTEM["content"] not in tokenizer.apply_chat_template(conversation, tokenize=False)  # dropped silently
    assert roles_not_rendered(tokenizer) == {"system": "the chat template leaves its text out"}
    rows = normalise(Dataset.from_list([{"messages": [USER, ANSWER]}, {"messages": conversation}]), "sft", "chat")
    with pytest.raises(DataError, match=r"^chat \[train\]: row 1: 'messages' has a system turn, and the chat template "
                                        r"of m does not render system turns \(the chat template leaves its text out\): "
                                        r"drop those turns or merge them into the user turn"):
        check_roles_rendered(rows, "chat [train]", roles_not_rendered(tokenizer), "the chat template of m")
    check_roles_rendered(rows.select([0]), "chat [train]", roles_not_rendered(tokenizer), "the chat template of m")
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}"
                               "{% endfor %}")
    assert roles_not_rendered(tokenizer) == {"system": "the chat template raises on it: System role not supported"}
    pairs = normalise(Dataset.from_list([{"prompt": [SYSTEM, USER], "chosen": [ANSWER], "rejected": [OTHER]}]),
                      "preference", "pairs")
    with pytest.raises(DataError, match=r"^pairs: row 0: 'prompt' has a system turn, .*\(the chat template raises on "
                                        r"it: System role not supported\)"):
        check_roles_rendered(pairs, "pairs", roles_not_rendered(tokenizer), "the chat template of m")


def test_a_chat_template_that_raises_on_a_row_names_the_row(tmp_path):
    """Before: Mistral's and Llama 2's templates raise jinja2's TemplateError (not a ValueError) inside TRL's
    tokenization on turns that do not alternate user/assistant: a traceback."""
    from test_any_model import word_tokenizer

    alternating = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                   "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                   "{% endif %}{{ m['role'] + ' ' + m['content'] + ' <|endoftext|> ' }}{% endfor %}")
    tokenizer = word_tokenizer(alternating, "<|endoftext|>", "<|pad|>")
    rows = [{"messages": [USER, ANSWER]}, {"messages": [USER, USER, ANSWER]}]
    for completion_only_loss in (True, False):  # the pipeline's labels, or TRL's tokenization
        with pytest.raises(DataError, match=r"^chat.jsonl \[train\]: row 1: the chat template cannot render "
                                            r"'messages' \(user, user, assistant\): Conversation roles must alternate "
                                            r"user/assistant/user/assistant/...$"):
            _sft_trainer(tokenizer, rows, tmp_path, completion_only_loss=completion_only_loss)
    pairs = [{"prompt": [USER], "chosen": [ANSWER], "rejected": [OTHER]},
             {"prompt": [USER, USER], "chosen": [ANSWER], "rejected": [OTHER]}]
    with pytest.raises(DataError, match=r"^pairs.jsonl \[train\]: row 1: the chat template cannot render 'prompt' "
                                        r"\(user, user\): Conversation roles must alternate"):
        _dpo_trainer(tokenizer, pairs, tmp_path, 64)


def test_a_json_file_of_one_object_holding_the_rows_is_named(tmp_path):
    """Before: "found ['data']" without a word of why; a file of one row object is one row, as before."""
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"data": ROWS}))
    train, _, source = load_splits(str(path))
    with pytest.raises(DataError, match=r"found \['data'\] \(its 'data' holds 2 records: is the file one JSON object "
                                        r"with the rows inside\? give the rows as a JSON list, or one per line as JSON "
                                        r"Lines\)$"):
        normalise(train, "sft", source)
    path.write_text(json.dumps(ROWS[0]))
    assert normalise(load_splits(str(path))[0], "sft", source).to_list() == ROWS[:1]


def test_rows_mixing_strings_and_conversations_are_refused(tmp_path):
    """Before: a JSON Lines file with a string row and a conversation row loaded as one column of both, and TRL
    formatted every row as it found the first."""
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"prompt": [USER], "completion": [ANSWER]}) + "\n")
    train, _, source = load_splits(str(path))
    with pytest.raises(DataError, match=r"mixed.jsonl: row 1: 'prompt' is a conversation but row 0's is a string: "
                                        r"every row must be of one format \(all strings, or all lists of"):
        normalise(train, "sft", source)


def test_sft_stage_refuses_turns_its_template_drops_before_loading_the_model(tmp_path, capsys):
    """The template probe as the SFT and GRPO stages run it (in process): one line, exit 2, nothing written."""
    import yaml
    from transformers import GPT2Config, GPT2LMHeadModel

    from conftest import ROOT
    from pipeline.models import CHAT_TEMPLATE, train_tokenizer
    from pipeline.stages import run

    tokenizer = train_tokenizer(["Write a review of The Lost River. A superb drama. Dull."] * 50, vocab_size=300)
    tokenizer.chat_template = CHAT_TEMPLATE.replace("{% if message['role'] == 'system' %}{{ message['content'] }}",
                                                    "{% if message['role'] == 'system' %}")  # drops system turns
    model = tmp_path / "model"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_embd=16, n_head=2, n_positions=128,
                               bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)).save_pretrained(model)
    tokenizer.save_pretrained(model)

    def refused(stage: str, rows: list[dict], **changes) -> tuple:
        """The stage's tiny recipe on `rows` and the model above, run in process: exit 2, nothing written; the
        data file and the error line."""
        data_file = tmp_path / f"{stage}.jsonl"
        data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
        recipe = yaml.safe_load((ROOT / "recipes" / "tiny" / f"{stage}.yaml").read_text())
        recipe.update(model_name_or_path=str(model), dataset_name=str(data_file), output_dir=str(tmp_path / stage),
                      report_to="none", disable_tqdm=True, max_steps=1, **changes)
        (tmp_path / f"{stage}.yaml").write_text(yaml.safe_dump(recipe))
        with pytest.raises(SystemExit) as exit_code:
            run(stage, ["--config", str(tmp_path / f"{stage}.yaml")])
        assert exit_code.value.code == 2
        assert not (tmp_path / stage).exists() or not any((tmp_path / stage).iterdir())
        return data_file, capsys.readouterr().err.strip().splitlines()[-1]

    chat, line = refused("sft", [{"messages": [USER, ANSWER]}, {"messages": [SYSTEM, USER, ANSWER]}],
                         dataset_num_proc=None)
    assert line == (
        f"error: sft: {chat} [train]: row 1: 'messages' has a system turn, and the chat template of {model} does not "
        "render system turns (the chat template leaves its text out): drop those turns or merge them into the user "
        "turn, or use a chat template that renders them (PIPELINE_DEBUG=1 shows the traceback)")
    # the online stages probe the template on their prompts the same way (GRPO here, rewarded by a function)
    prompts, line = refused("grpo", [{"prompt": [USER]}, {"prompt": [SYSTEM, USER]}], reward_model_path=None,
                            reward_functions=["reward_fns:constant"])
    assert line.startswith(f"error: grpo: {prompts} [train]: row 1: 'prompt' has a system turn, and the chat template "
                           f"of {model} does not render system turns")
