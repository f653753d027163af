"""Datasets: load (Hub id, local file or folder, a `save_to_disk` folder, or `embedded:<kind>`), normalise to TRL's
standard/conversational formats, and validate every row before any training starts.

Local files: .json, .jsonl, .ndjson, .csv, .tsv, .txt (one row per line, a `text` column), .parquet, .arrow, in any
case (.JSONL), and the text formats compressed (.gz, .bz2, .xz; .zst and .lz4 with the zstandard/lz4 packages).
A folder: its data files, split by name as `datasets` does (train*, test*, ...), all of one format.
Conversations are lists of {"role", "content"} turns with the roles system, user and assistant (a fixed set, not
read from the chat template: the stages render conversations with the tokenizer's template, and TRL's trainers
split prompts from answers by these roles).

Formats recognised, per use:
- text:       {"text"}
- sft:        {"messages"} | {"prompt", "completion"} | {"text"} | hh-rlhf {"chosen": transcript} (->
              prompt/completion: the final assistant turn is the completion)
- preference: {"chosen", "rejected"} (+ "prompt"), standard or conversational | hh-rlhf transcripts
- prompt:     {"prompt"} | {"messages"} | hh-rlhf {"chosen": transcript}
hh-rlhf transcripts are strings of "\\n\\nHuman: ...\\n\\nAssistant: ..." turns; they become conversations,
and for preference pairs the turns shared by chosen and rejected become the prompt.
"""

import hashlib
import os
import re

import trl
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from trl.data_utils import extract_prompt

from . import embedded

USES = ("text", "sft", "preference", "prompt")
EMBEDDED_PREFIX = "embedded:"
# the data files `datasets` reads as rows, by extension (compared in lower case): (builder, its arguments)
LOCAL_BUILDERS = {".json": ("json", {}), ".jsonl": ("json", {}), ".ndjson": ("json", {}), ".csv": ("csv", {}),
                  ".tsv": ("csv", {"sep": "\t"}), ".txt": ("text", {}), ".parquet": ("parquet", {}),
                  ".arrow": ("arrow", {})}
TEXT_FORMATS = {".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".txt"}  # may be compressed
COMPRESSIONS = {".gz": None, ".bz2": None, ".xz": None, ".zst": "zstandard", ".lz4": "lz4"}  # -> the module needed
ROLES = ("system", "user", "assistant")  # the roles a conversation's turns may have
_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
# Part of the fingerprint of normalise()'s cached map: datasets hashes a module-level function by its name, not
# its code, so a cached result must be tied to this file's code (and TRL's extract_prompt) explicitly.
with open(__file__, "rb") as _source:
    _CODE_VERSION = hashlib.sha256(_source.read() + trl.__version__.encode()).hexdigest()[:16]


class DataError(ValueError):
    """A dataset that cannot be used; the message names the source, the row and the problem."""


def load_splits(dataset_name: str, dataset_config: str | None = None, train_split: str = "train",
                test_split: str = "test", seed: int = 0, biases: dict | None = None) -> tuple[Dataset, Dataset | None, str]:
    """(train, test or None, a label naming the source) for any supported dataset name."""
    splits, label = _load_all(dataset_name, dataset_config, seed, biases=biases)
    if train_split not in splits:
        raise DataError(f"{label}: no '{train_split}' split (it has: {', '.join(splits)})")
    return splits[train_split], splits.get(test_split), label


def _load_all(dataset_name: str | None, dataset_config: str | None, seed: int,
              only: tuple[str, ...] | None = None, biases: dict | None = None) -> tuple[DatasetDict, str]:
    """Every split of the dataset; `only`: the embedded datasets generate just these splits (others load whole);
    biases: the embedded raters' (length_bias, repeat_bias: embedded_length_bias, embedded_repeat_bias)."""
    if dataset_name is None:
        raise DataError("no dataset given: set `dataset_name` in the recipe or with --dataset_name")
    if dataset_name.startswith(EMBEDDED_PREFIX):
        splits = embedded.build(dataset_name[len(EMBEDDED_PREFIX):], seed=seed, splits=only, **(biases or {}))
        said = ", ".join(f"{name.replace('_', ' ')} {value:g}" for name, value in (biases or {}).items()
                         if value and name != "max_sentences")
        label = dataset_name + (f" (biased raters: {said})" if said else "")
    elif _looks_local(dataset_name):
        splits, label = _load_local(dataset_name), dataset_name
    else:
        splits, label = load_dataset(dataset_name, dataset_config), dataset_name
    return splits, label


def _extension(path: str) -> tuple[str, str]:
    """(data extension, compression extension or ""), in lower case: "a.JSONL.gz" -> (".jsonl", ".gz")."""
    stem, last = os.path.splitext(os.path.basename(path).lower())
    if last in COMPRESSIONS:
        return os.path.splitext(stem)[1], last
    return last, ""


def _looks_local(name: str) -> bool:
    """A local file or folder (or one meant to be: a path, or a name with a data file's extension), not a Hub id."""
    extension, compression = _extension(name)
    return (os.path.exists(name) or extension in LOCAL_BUILDERS or bool(compression)
            or name.startswith((".", "/", "~")) or name.count("/") > 1)


def supported_extensions() -> str:
    return f"{', '.join(LOCAL_BUILDERS)}, in any case; the text ones also as {', '.join(COMPRESSIONS)}"


def _builder(path: str) -> tuple[str, dict] | None:
    """The `datasets` builder and its arguments for a data file, or None if it is not one this loader reads.
    Raises DataError for a compression whose package is not installed."""
    extension, compression = _extension(path)
    if extension not in LOCAL_BUILDERS or compression and extension not in TEXT_FORMATS:
        return None
    module = COMPRESSIONS.get(compression)
    if module is not None:
        try:
            __import__(module)
        except ImportError:
            raise DataError(f"{path}: reading {compression} files needs the {module} package (pip install {module}), "
                            f"or decompress the file first") from None
    return LOCAL_BUILDERS[extension]


def _is_saved_dataset(path: str) -> bool:
    """A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or (
        os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json")))


def _folder_files(path: str) -> dict[str, list[str]]:
    """A folder's data files by split, the way `datasets` splits a folder by file names (train*, test*, ...; all
    files are `train` when none is named for a split). Files that are not data (README.md, notes) are left out."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        patterns = get_data_patterns(path)
        found = DataFilesDict.from_patterns(patterns, base_path=path)
    except Exception:  # datasets' EmptyDatasetError and the like: no file at all
        found = {}
    files = {str(split): [f for f in names if _builder(f) is not None] for split, names in found.items()}
    return {split: names for split, names in files.items() if names}


def _load_local(path: str) -> DatasetDict:
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        if _is_saved_dataset(path):
            return _read(path, lambda: _as_dict(load_from_disk(path)))
        files = _folder_files(path)
        if not files:
            raise DataError(f"{path}: the folder holds no data file (the extensions read: {supported_extensions()})")
        kinds = {}  # (builder, its arguments) -> the files read with it
        for name in (name for names in files.values() for name in names):
            builder, options = _builder(name)
            kinds.setdefault((builder, tuple(options.items())), []).append(os.path.relpath(name, path))
        if len(kinds) > 1:  # datasets reads the most common format and leaves the other files out without a word
            listed = "; ".join(f"{', '.join(names[:3])}{' ...' if len(names) > 3 else ''}" for names in kinds.values())
            raise DataError(f"{path}: the folder holds data files of {len(kinds)} formats ({listed}); a folder is read "
                            "as one format: keep one, or give one file as dataset_name")
        builder, options = _builder(next(iter(files.values()))[0])
        return _read(path, lambda: load_dataset(builder, data_files=files, **options))
    builder = _builder(path)
    if builder is None:
        raise DataError(f"{path}: not a data file this pipeline reads (the extensions read: {supported_extensions()})")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: the file is empty")
    builder, options = builder
    return _read(path, lambda: load_dataset(builder, data_files={"train": path}, **options))


def _as_dict(loaded) -> DatasetDict:
    return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})


def _read(path: str, load) -> DatasetDict:
    try:
        return load()
    except DataError:
        raise
    except Exception as error:  # datasets wraps parser errors in long chains: keep the first line
        cause = error.__cause__ or error
        first = str(cause).splitlines()[0] if str(cause) else ""
        raise DataError(f"{path}: could not be read ({type(cause).__name__}: {first})") from error


def parse_transcript(text: str) -> list[dict]:
    """hh-rlhf's "\\n\\nHuman: ...\\n\\nAssistant: ..." string -> [{"role", "content"}, ...]."""
    parts = _TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError("not a Human/Assistant transcript")
    return [{"role": "user" if who == "Human" else "assistant", "content": said.strip()}
            for who, said in zip(parts[1::2], parts[2::2])]


def _transcript(row: dict, field: str) -> list[dict]:
    if row[field] is None:
        raise ValueError(f"'{field}' is missing (None)")
    if isinstance(row[field], str):
        try:
            return parse_transcript(row[field])
        except ValueError:
            pass
    raise ValueError(f"'{field}' is not a \"\\n\\nHuman: ...\\n\\nAssistant: ...\" transcript (as the first row's is)")


def _is_transcript(value) -> bool:
    return isinstance(value, str) and value.startswith("\n\nHuman:")


def _check_text(value, field: str) -> None:
    if value is None:
        raise ValueError(f"'{field}' is missing (None)")
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"'{field}' is empty")
        return
    if isinstance(value, list):
        if not value:
            raise ValueError(f"'{field}' is an empty conversation")
        for number, turn in enumerate(value):
            if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
                raise ValueError(f"'{field}' has a turn that is not a {{'role', 'content'}} message")
            if turn["role"] not in ROLES:
                raise ValueError(f"'{field}' turn {number} has the role {turn['role']!r}; the roles accepted: "
                                 f"{', '.join(ROLES)} (rename the role, or drop the turn)")
            if isinstance(turn["content"], list):
                raise ValueError(f"'{field}' has a {turn['role']} turn whose content is a list (of parts?), not "
                                 "text: only text content is read")
            if not isinstance(turn["content"], str) or not turn["content"].strip():
                raise ValueError(f"'{field}' has a {turn['role']} turn with empty or non-string content")
        return
    raise ValueError(f"'{field}' is a {type(value).__name__}, expected a string or a list of messages")


def _format(columns: list[str], first: dict, use: str) -> str:
    """Name the dataset's format for `use`, or raise naming what is missing."""
    has = set(columns)
    if use == "text" and "text" in has:
        return "text"
    if use == "sft":
        for fmt, needed in (("messages", {"messages"}), ("prompt-completion", {"prompt", "completion"}),
                            ("text", {"text"})):
            if needed <= has:
                return fmt
        if "chosen" in has and _is_transcript(first.get("chosen")):
            return "hh-transcript"
        if "chosen" in has and isinstance(first.get("chosen"), list):
            return "chosen-conversation"
    if use == "preference" and {"chosen", "rejected"} <= has:
        if "prompt" not in has and _is_transcript(first.get("chosen")):
            return "hh-transcript"
        return "preference"
    if use == "prompt":
        if "prompt" in has:
            return "prompt"
        if "messages" in has:
            return "messages"
        if "chosen" in has and _is_transcript(first.get("chosen")):
            return "hh-transcript"
        if "chosen" in has and isinstance(first.get("chosen"), list):
            return "chosen-conversation"
    expected = {"text": "'text'", "sft": "'messages', 'prompt'+'completion', 'text' or a preference 'chosen' "
                                         "(an hh-rlhf transcript or a conversation)",
                "preference": "'chosen'+'rejected' (optionally 'prompt')",
                "prompt": "'prompt', 'messages' or a preference 'chosen' (an hh-rlhf transcript or a "
                          "conversation)"}[use]
    hint = ""
    if len(has) == 1 and isinstance(first.get(next(iter(has))), list) and first[next(iter(has))] and all(
            isinstance(item, dict) and "role" not in item for item in first[next(iter(has))]):
        hint = (f" (its '{next(iter(has))}' holds {len(first[next(iter(has))])} records: is the file one JSON object "
                "with the rows inside? give the rows as a JSON list, or one per line as JSON Lines)")
    raise ValueError(f"missing columns for {use} data: expected {expected}, found {sorted(has) or 'none'}{hint}")


def _check_text_only(value, field: str) -> None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"'{field}' is a {type(value).__name__}, expected a string")


def _check_same_kind(row: dict, fields: list[str]) -> None:
    """Every field a string, or every field a conversation (TRL renders them together)."""
    kinds = {field: isinstance(row[field], list) for field in fields}
    if len(set(kinds.values())) > 1:
        lists = [f"'{f}'" for f, is_list in kinds.items() if is_list]
        strings = [f"'{f}'" for f, is_list in kinds.items() if not is_list]
        raise ValueError(f"{' and '.join(lists)} {'is a conversation' if len(lists) == 1 else 'are conversations'} "
                         f"but {' and '.join(strings)} {'is a string' if len(strings) == 1 else 'are strings'}: "
                         "give all of them as strings or all as lists of {'role', 'content'} turns")


def _check_answer(conversation: list[dict], field: str) -> None:
    """What follows a prompt: the assistant's turns (a continuation may have user turns between them)."""
    if conversation[0]["role"] != "assistant" or conversation[-1]["role"] != "assistant":
        end = "starts" if conversation[0]["role"] != "assistant" else "ends"
        role = conversation[0 if end == "starts" else -1]["role"]
        raise ValueError(f"'{field}' {end} with a {role} turn: after the prompt, '{field}' is the assistant's answer "
                         "(it must start and end with an assistant turn)")


def _check_prompt_before_answer(prompt, field: str = "prompt") -> None:
    if isinstance(prompt, list) and prompt[-1]["role"] == "assistant":
        raise ValueError(f"'{field}' ends with an assistant turn: the answer that follows it must answer a user "
                         "turn (move that assistant turn into the answer, or drop it)")


def _check_shape(row: dict, fmt: str, use: str) -> None:
    """The conversation's shape fits the use: an assistant turn to learn in SFT, answers that are assistant turns
    after a prompt that does not end with one, strings and conversations not mixed."""
    if use == "text":
        return
    if use == "sft" and fmt == "messages":
        if not isinstance(row["messages"], list):
            raise ValueError("'messages' is a string, expected a list of {'role', 'content'} turns (a CSV cell is "
                             "text: write conversations as JSON Lines)")
        if not any(turn["role"] == "assistant" for turn in row["messages"]):
            raise ValueError("'messages' has no assistant turn: nothing for SFT to learn")
    if use == "sft" and fmt == "prompt-completion":
        _check_same_kind(row, ["prompt", "completion"])
        if isinstance(row["completion"], list):
            _check_prompt_before_answer(row["prompt"])
            _check_answer(row["completion"], "completion")
    if use == "preference":
        fields = (["prompt"] if "prompt" in row else []) + ["chosen", "rejected"]
        _check_same_kind(row, fields)
        if isinstance(row["chosen"], list):
            pair = row if "prompt" in row else extract_prompt({"chosen": row["chosen"], "rejected": row["rejected"]})
            if not pair["prompt"]:
                raise ValueError("'chosen' and 'rejected' do not start with the same turns, so no prompt can be "
                                 "taken from them: give a 'prompt' column, or start both with the same user turn")
            for field in ("chosen", "rejected"):
                if not pair[field]:
                    raise ValueError(f"'{field}' has no turn after the prompt it shares with the other answer")
            _check_prompt_before_answer(pair["prompt"])
            for field in ("chosen", "rejected"):
                _check_answer(pair[field], field)


def _prompt_of(conversation: list[dict]) -> list[dict]:
    """The turns up to (not including) the last assistant turn."""
    last = max((i for i, t in enumerate(conversation) if t["role"] == "assistant"), default=len(conversation))
    return conversation[:last]


def _fields(fmt: str, use: str, columns) -> list[str]:
    """The columns that normalise() writes for data of format `fmt` (with these columns) used for `use`."""
    if use == "text":
        return ["text"]
    if use == "prompt":
        return ["prompt"]
    if fmt == "hh-transcript":
        return {"preference": ["prompt", "chosen", "rejected"], "sft": ["prompt", "completion"]}[use]
    if fmt == "chosen-conversation":  # preference rows in TRL's conversational format, used for SFT
        return ["prompt", "completion"]
    return {"messages": ["messages"], "prompt-completion": ["prompt", "completion"], "text": ["text"],
            "preference": (["prompt"] if "prompt" in columns else []) + ["chosen", "rejected"]}[fmt]


def _normalise_row(row: dict, fmt: str, use: str) -> dict:
    fields = _fields(fmt, use, row)
    if use == "text":
        _check_text_only(row["text"], "text")
        _check_text(row["text"], "text")
        return {"text": row["text"]}
    if fmt == "hh-transcript":
        transcript = {field: _transcript(row, field) for field in ("chosen", "rejected") if field in row}
        if use == "preference":
            pair = extract_prompt({"chosen": transcript["chosen"], "rejected": transcript["rejected"]})
            row, fmt = pair, "preference"
        elif use == "sft":  # learn the final assistant turn, given the conversation before it
            conversation = transcript["chosen"]
            if not any(turn["role"] == "assistant" for turn in conversation):
                raise ValueError("'chosen' has no Assistant turn: nothing for SFT to learn")
            prompt = _prompt_of(conversation)
            row, fmt = {"prompt": prompt, "completion": conversation[len(prompt):]}, "prompt-completion"
        else:
            row, fmt = {"prompt": _prompt_of(transcript["chosen"])}, "prompt"
    if fmt == "chosen-conversation":  # TRL's conversational preference rows (trl-lib/ultrafeedback_binarized)
        _check_text(row["chosen"], "chosen")
        if not isinstance(row["chosen"], list) or not any(turn["role"] == "assistant" for turn in row["chosen"]):
            raise ValueError("'chosen' has no assistant turn: nothing for SFT to learn")
        conversation = (row["prompt"] if isinstance(row.get("prompt"), list) else []) + row["chosen"]
        prompt = _prompt_of(conversation)
        row, fmt = ({"prompt": prompt, "completion": conversation[len(prompt):]}, "prompt-completion") \
            if use == "sft" else ({"prompt": prompt}, "prompt")
    if use == "prompt" and fmt == "messages":
        row, fmt = {"prompt": _prompt_of(row["messages"])}, "prompt"
    for field in fields:
        _check_text(row[field], field)
    _check_shape(row, fmt, use)
    if use == "preference" and row["chosen"] == row["rejected"]:
        raise ValueError("'chosen' and 'rejected' are identical")
    if use == "prompt" and isinstance(row["prompt"], list) and row["prompt"][-1]["role"] != "user":
        raise ValueError("'prompt' does not end with a user turn")
    return {field: row[field] for field in fields}


def normalise(dataset: Dataset, use: str, source: str, invalid_rows: str = "error") -> Dataset:
    """Validate every row and return the dataset in one of TRL's formats for `use`.

    invalid_rows: "error" stops at the first bad row (naming source, row and problem); "drop" drops bad
    rows and prints how many were dropped and why (the first reason).
    """
    if use not in USES:
        raise ValueError(f"unknown use {use!r}; one of {USES}")
    if len(dataset) == 0:
        raise DataError(f"{source}: the dataset has no rows")
    try:
        fmt = _format(dataset.column_names, dataset[0], use)
    except ValueError as error:
        raise DataError(f"{source}: {error}") from None
    # A datasets map, so that data read from files or the Hub (Arrow on disk) is checked once: the result is
    # cached, and so are TRL's tokenization maps after it (a rerun, a resumed run, and the other processes of a
    # multi-process run, which TRL lets the main process prepare first, load them instead of redoing them).
    # every row in the first row's kind (strings, or conversations): a JSON Lines file may mix them, and TRL
    # formats every row as it found the first
    column = {"messages": "messages", "prompt-completion": "prompt", "text": "text", "prompt": "prompt",
              "preference": "prompt" if "prompt" in dataset.column_names else "chosen"}.get(fmt)
    kind = None if column is None or dataset[0][column] is None else isinstance(dataset[0][column], list)
    checked = dataset.map(_normalise_batch, batched=True, with_indices=True, remove_columns=dataset.column_names,
                          fn_kwargs={"fmt": fmt, "use": use, "fields": _fields(fmt, use, dataset.column_names),
                                     "source": source, "drop": invalid_rows == "drop", "code": _CODE_VERSION,
                                     "kind": (column, kind)},
                          desc=f"Checking {source}")
    dropped = len(dataset) - len(checked)
    if dropped:
        first = next(reason for reason in (_invalid(row, i, fmt, use, (column, kind)) for i, row in enumerate(dataset))
                     if reason)
        print(f"[data] {source}: dropped {dropped} of {len(dataset)} rows (first: {first})")
    if len(checked) == 0:
        raise DataError(f"{source}: no valid rows left")
    return checked


def _check_kind(row: dict, kind: tuple[str | None, bool | None]) -> None:
    column, conversation = kind
    if conversation is not None and row[column] is not None and isinstance(row[column], list) != conversation:
        said = ("a conversation", "a string")
        raise ValueError(f"'{column}' is {said[conversation]} but row 0's is {said[not conversation]}: every row must "
                         "be of one format (all strings, or all lists of {'role', 'content'} turns)")


def _normalise_batch(batch: dict, indices: list[int], fmt: str, use: str, fields: list[str], source: str,
                     drop: bool, code: str, kind: tuple = (None, None)) -> dict:
    """normalise()'s map: the valid rows of a batch, normalised; an invalid row stops it or is left out.
    (`code` only keys the cache: _CODE_VERSION.)"""
    out = {field: [] for field in fields}
    for position, index in enumerate(indices):
        row = {column: values[position] for column, values in batch.items()}
        try:
            normalised = _normalise_row(row, fmt, use)
            _check_kind(row, kind)
        except ValueError as error:
            if not drop:
                raise DataError(f"{source}: row {index}: {error}") from None
            continue
        for field in fields:
            out[field].append(normalised[field])
    return out


def _invalid(row: dict, index: int, fmt: str, use: str, kind: tuple = (None, None)) -> str | None:
    """Why a row is invalid ("row <index>: <problem>"), or None."""
    try:
        _normalise_row(row, fmt, use)
        _check_kind(row, kind)
    except ValueError as error:
        return f"row {index}: {error}"
    return None


def first_rows_with_roles(dataset: Dataset, roles) -> dict[str, tuple[int, str]]:
    """role -> (the first row with a turn of that role, its field), over the dataset's conversation columns;
    computed on the Arrow columns (no row is turned into Python objects)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    found = {}
    table = dataset.with_format("arrow")[:]
    for name in table.column_names:
        column = table.column(name)
        if not (pa.types.is_list(column.type) and pa.types.is_struct(column.type.value_type)
                and column.type.value_type.get_field_index("role") >= 0):
            continue
        column = column.combine_chunks()
        turn_roles = pc.struct_field(pc.list_flatten(column), "role")
        parents = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
        for role in roles:
            hits = pc.equal(turn_roles, role).to_numpy(zero_copy_only=False)
            if hits.any() and (role not in found or parents[hits.argmax()] < found[role][0]):
                found[role] = (int(parents[hits.argmax()]), name)
    return found


def check_roles_rendered(dataset: Dataset | None, source: str, not_rendered: dict[str, str], template: str) -> None:
    """Refuse a dataset with turns of a role the chat template does not render (models.roles_not_rendered): they
    would be left out of what the model sees, without a word (or stop the tokenization with a traceback)."""
    if dataset is None or not not_rendered:
        return
    for role, (row, field) in sorted(first_rows_with_roles(dataset, not_rendered).items(), key=lambda kv: kv[1]):
        raise DataError(f"{source}: row {row}: '{field}' has a {role} turn, and {template} does not render {role} "
                        f"turns ({not_rendered[role]}): drop those turns or merge them into the user turn, or use a "
                        "chat template that renders them")


def template_refusal(error: Exception, dataset: Dataset, tokenizer, source: str) -> DataError:
    """One line for a chat template that raised while a trainer tokenized the dataset (Mistral's and Llama 2's
    "Conversation roles must alternate user/assistant/...", Gemma's "System role not supported"): the first row
    the template refuses, found by rendering the rows again one by one (only after the error)."""
    said = str(error).splitlines()[0] if str(error) else type(error).__name__
    for index, row in enumerate(dataset):
        prompt = row.get("prompt") if isinstance(row.get("prompt"), list) else []
        for field in ("messages", "prompt", "completion", "chosen", "rejected"):
            if not isinstance(row.get(field), list):
                continue
            conversation = row[field] if field in ("messages", "prompt") else prompt + row[field]
            try:
                tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=field == "prompt")
            except Exception as refused:  # the template's own raise_exception, or any error of its code
                said = str(refused).splitlines()[0] if str(refused) else type(refused).__name__
                return DataError(f"{source}: row {index}: the chat template cannot render '{field}' "
                                 f"({', '.join(turn['role'] for turn in conversation)}): {said}")
    return DataError(f"{source}: the chat template cannot render a conversation of the dataset: {said}")


def load_for(use: str, script_args) -> tuple[Dataset, Dataset | None, str]:
    """Load and normalise the train (and test, if any) split named by a stage's script arguments."""
    train, test, source = load_splits(script_args.dataset_name, script_args.dataset_config,
                                      script_args.dataset_train_split, script_args.dataset_test_split,
                                      seed=script_args.embedded_seed, biases=rater_biases(script_args))
    invalid = script_args.invalid_rows
    train = normalise(train, use, f"{source} [{script_args.dataset_train_split}]", invalid)
    if test is not None:
        test = normalise(test, use, f"{source} [{script_args.dataset_test_split}]", invalid)
    return train, test, source


def rater_biases(script_args) -> dict:
    """The embedded raters' biases a stage's recipe sets (recipes/tiny-biased), as embedded.build takes them."""
    return {"length_bias": getattr(script_args, "embedded_length_bias", 0.0),
            "repeat_bias": getattr(script_args, "embedded_repeat_bias", 0.0),
            "max_sentences": getattr(script_args, "embedded_max_sentences", embedded.DEFAULT_SENTENCES)}


def load_test(use: str, script_args) -> Dataset | None:
    """The test split named by a stage's script arguments, normalised (None if the dataset has none), without
    generating the embedded train split: what the evaluation after the stages reads."""
    test_split = script_args.dataset_test_split
    splits, source = _load_all(script_args.dataset_name, script_args.dataset_config, script_args.embedded_seed,
                               only=(test_split,))
    if test_split not in splits:
        return None
    return normalise(splits[test_split], use, f"{source} [{test_split}]", script_args.invalid_rows)


def load_extra_tests(use: str, script_args) -> dict[str, Dataset]:
    """Held-out splits named `<test split>_<name>` beside the test split (the embedded preference data's
    `test_title_only`: pairs that differ only in the film's title), normalised, by <name>. A stage reports each
    one as eval_<name>_<metric> beside the test split's eval_<metric>."""
    prefix = f"{script_args.dataset_test_split}_"
    splits, source = _load_all(script_args.dataset_name, script_args.dataset_config, script_args.embedded_seed,
                               biases=rater_biases(script_args))
    return {name[len(prefix):]: normalise(split, use, f"{source} [{name}]", script_args.invalid_rows)
            for name, split in splits.items() if name.startswith(prefix)}
