"""Tiny random models of the families users bring (issue 26), each with a tokenizer in its family's own conventions,
and recipes that run one through sft -> reward -> ppo (full and LoRA) -> grpo -> dpo in seconds.

Nothing is downloaded: a family's model is a transformers config class at a tiny size (hidden 32, 2 layers, 2 heads,
random weights), and its tokenizer a byte-level BPE trained here on the embedded world's texts, given what sets the
family apart: its special tokens, whether it adds a BOS itself (a TemplateProcessing post-processor, `add_bos_token`),
its pad token (none, one the model never emits, or one it can emit: Qwen's `<|endoftext|>`), and a chat template in
the family's style, whose end of an assistant turn (`turn_end`) may not be the EOS token.

    write_family_model(name, dest)           -> dest: config.json, model.safetensors, generation_config.json, tokenizer
    write_family_recipes(name, model, dest, outputs) -> dest: sft, reward, ppo, ppo-lora, grpo, dpo .yaml

Run as a script, it measures the matrix stage by stage (each stage alone, through scripts/<stage>.py, going on past
a failure wherever the inputs allow) and prints the table docs/families.md holds:

    .venv/bin/python tests/families.py [FAMILY ...] [--out DIR] [--json FILE]

It is also a pytest plugin (tests/test_families.py names it in `pytest_plugins`): it registers the `families` marker
and marks every family outside CI_FAMILIES with it, skipped unless RUN_ALL_FAMILIES=1.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: tests/ is sys.path[0], the package is one folder up
    sys.path.insert(0, str(ROOT))

from conftest import TINY_OVERRIDES, run_python  # noqa: E402

# --------------------------------------------------------------------------------------------- chat templates

# Llama 3 (and 3.1-3.3): headers in special tokens, every turn ends with <|eot_id|>, EOS is <|end_of_text|>
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Llama 2 chat: [INST] ... [/INST] answer </s>, a BOS before every user turn (the system prompt inside the first)
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
# Mistral v0.3: [INST] and [/INST] are control tokens; one BOS; an answer ends with </s> (EOS)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + '[/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% endif %}"
    "{% endfor %}"
)
# Qwen 2 / 2.5 / 3 (base and instruct ship the same ChatML template): <|im_start|>role\n ... <|im_end|>\n
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Gemma 1/2/3: <start_of_turn>user|model\n ... <end_of_turn>\n, one BOS; EOS is <eos>
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# Phi-3 (mini-4k-instruct): <|user|>\n ... <|end|>\n<|assistant|>\n ... <|end|>\n, EOS after the last turn
PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


# ------------------------------------------------------------------------------------------------- families

@dataclass(frozen=True)
class Family:
    name: str
    model_type: str  # transformers' config.model_type of what is written
    specials: tuple[str, ...]  # special tokens, in id order from 0
    eos: str
    turn_end: str  # the token that ends an assistant turn in the chat template: where generation must stop
    bos: str | None = None
    pad: str | None = None  # None: the family ships no pad token (the pipeline adds <|pad|>)
    unk: str | None = None
    add_bos: bool = False  # the tokenizer puts `bos` before every text it encodes with special tokens
    chat_template: str | None = None  # None: the pipeline sets its own (pipeline.models.CHAT_TEMPLATE)
    config: dict = field(default_factory=dict)  # config-class fields beyond the common tiny sizes
    notes: str = ""


# Gemma 2 and Gemma 3 (text) share their tokens, template and attention sizes
GEMMA_TOKENS = dict(specials=("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"), bos="<bos>",
                    eos="<eos>", pad="<pad>", unk="<unk>", turn_end="<end_of_turn>", add_bos=True,
                    chat_template=GEMMA_TEMPLATE)
GEMMA_CONFIG = {"num_key_value_heads": 1, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64,
                "tie_word_embeddings": True}

FAMILIES = {f.name: f for f in [
    Family("llama3-untied", "llama", ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                      "<|end_header_id|>", "<|eot_id|>"),
           bos="<|begin_of_text|>", eos="<|end_of_text|>", turn_end="<|eot_id|>", add_bos=True,
           chat_template=LLAMA3_TEMPLATE, config={"num_key_value_heads": 1, "tie_word_embeddings": False},
           notes="Llama 3: BOS added by the tokenizer and the template; turns end <|eot_id|>, EOS <|end_of_text|>; "
                 "no pad; GQA; untied embeddings"),
    Family("llama2-tied", "llama", ("<unk>", "<s>", "</s>"), bos="<s>", eos="</s>", unk="<unk>", turn_end="</s>",
           add_bos=True, chat_template=LLAMA2_TEMPLATE, config={"num_key_value_heads": 2, "tie_word_embeddings": True},
           notes="Llama 2 chat ([INST]): BOS added by the tokenizer and the template; turns end with EOS; no pad; "
                 "tied embeddings"),
    Family("qwen2-chatml", "qwen2", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), eos="<|endoftext|>",
           pad="<|endoftext|>", turn_end="<|im_end|>", chat_template=CHATML_TEMPLATE,
           config={"num_key_value_heads": 1, "tie_word_embeddings": True},
           notes="Qwen 2.5 base: ChatML, turns end <|im_end|> while EOS = pad = <|endoftext|>; no BOS; tied"),
    Family("qwen3-instruct", "qwen3", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), eos="<|im_end|>",
           pad="<|endoftext|>", turn_end="<|im_end|>", chat_template=CHATML_TEMPLATE,
           config={"num_key_value_heads": 1, "head_dim": 16, "tie_word_embeddings": True},
           notes="Qwen 3 instruct: EOS = <|im_end|>, pad = <|endoftext|>, a token the model can emit; no BOS"),
    Family("mistral", "mistral", ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"), bos="<s>", eos="</s>", unk="<unk>",
           turn_end="</s>", add_bos=True, chat_template=MISTRAL_TEMPLATE,
           config={"num_key_value_heads": 1, "sliding_window": 64, "tie_word_embeddings": False},
           notes="Mistral v0.3: [INST]/[/INST] control tokens, BOS added, turns end with EOS; no pad; sliding "
                 "window 64"),
    Family("gpt-neox", "gpt_neox", ("<|endoftext|>", "<|padding|>"), bos="<|endoftext|>", eos="<|endoftext|>",
           unk="<|endoftext|>", turn_end="<|endoftext|>",
           config={"rotary_pct": 0.25, "tie_word_embeddings": False},
           notes="Pythia: no chat template (the pipeline adds its own), no pad token set, no BOS added"),
    Family("opt", "opt", ("<s>", "<pad>", "</s>", "<unk>"), bos="</s>", eos="</s>", pad="<pad>", unk="<unk>",
           turn_end="</s>", add_bos=True, chat_template="pipeline",
           notes="OPT: the tokenizer prepends </s> (its BOS is its EOS); pad <pad>; learned positions; the "
                 "pipeline's chat template"),
    Family("gemma2", "gemma2", **GEMMA_TOKENS, config=GEMMA_CONFIG,
           notes="Gemma 2: turns end <end_of_turn>, EOS <eos>, pad <pad>; BOS added; logit soft-capping; sliding "
                 "window 64 on every other layer; tied"),
    Family("gemma3-text", "gemma3_text", **GEMMA_TOKENS,
           config={**GEMMA_CONFIG, "layer_types": ["sliding_attention", "full_attention"]},
           notes="Gemma 3 text-only (Gemma3ForCausalLM, as Gemma 3 1B): the Gemma template and tokens"),
    Family("phi3", "phi3", ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>",
                            "<|end|>"),
           bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>", unk="<unk>", turn_end="<|end|>",
           chat_template=PHI3_TEMPLATE, config={"num_key_value_heads": 2, "tie_word_embeddings": False},
           notes="Phi-3 mini: turns end <|end|>, EOS = pad = <|endoftext|>; fused qkv_proj / gate_up_proj"),
]}

# The families `make test` runs (the rest: RUN_ALL_FAMILIES=1, pytest -m families)
CI_FAMILIES = ("qwen2-chatml", "llama3-untied", "gemma2")

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "max_position_embeddings": 256}
VOCAB_SIZE = 512  # the BPE's size before the special tokens; the model's vocabulary is len(tokenizer)
TOKENIZER_TEXTS = 4000  # of the embedded corpus's training texts


# ------------------------------------------------------------------------------------------------ tokenizers

def _texts(family: Family) -> list[str]:
    """The embedded world's texts (its pretraining corpus and SFT answers), with the pipeline's own end-of-turn
    token taken out: the family's special tokens are single tokens, no merge learned from them."""
    from pipeline import embedded
    from pipeline.models import EOS_TOKEN, PAD_TOKEN

    corpus = embedded.build("corpus", seed=0, splits=("train",))["train"]["text"][:TOKENIZER_TEXTS]
    sft = embedded.build("sft", seed=0, splits=("train",))["train"]
    texts = list(corpus) + [row["prompt"][0]["content"] + " " + row["completion"][0]["content"] for row in sft]
    texts += ["user assistant system model [INST] [/INST] <<SYS>> <</SYS>>"] * 10  # the templates' own words
    for token in (EOS_TOKEN, PAD_TOKEN, *family.specials):
        texts = [text.replace(token, " ") for text in texts]
    return texts


def build_tokenizer(family: Family):
    """A byte-level BPE on the embedded texts with the family's special tokens (ids 0.. in `specials` order),
    BOS added by the tokenizer where the family does, and its chat template."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from pipeline.models import CHAT_TEMPLATE

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_texts(family), vocab_size=VOCAB_SIZE + len(family.specials), min_frequency=2,
                            special_tokens=list(family.specials))
    named = {"bos_token": family.bos, "eos_token": family.eos, "pad_token": family.pad, "unk_token": family.unk}
    extra = [t for t in family.specials if t not in named.values()]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, **{k: v for k, v in named.items() if v is not None},
        extra_special_tokens=extra, add_bos_token=family.add_bos, add_eos_token=False, model_max_length=1024,
    )
    if family.chat_template is not None:
        tokenizer.chat_template = CHAT_TEMPLATE if family.chat_template == "pipeline" else family.chat_template
    return tokenizer


# ------------------------------------------------------------------------------------------------------ models

def build_config(family: Family, tokenizer):
    import transformers

    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if family.model_type == "gpt_neox":
        return transformers.GPTNeoXConfig(**ids, **TINY, **family.config)
    if family.model_type == "opt":
        sizes = {k: v for k, v in TINY.items() if k != "intermediate_size"}
        return transformers.OPTConfig(**ids, **sizes, ffn_dim=TINY["intermediate_size"],
                                      word_embed_proj_dim=TINY["hidden_size"], **family.config)
    config_class = transformers.AutoConfig.for_model(family.model_type).__class__
    return config_class(**ids, **TINY, **family.config)


def write_family_model(name: str, dest: Path | str, seed: int = 0) -> Path:
    """A tiny random `name` model and its tokenizer, saved to `dest` as a Hub checkpoint would be (config.json,
    model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json, chat_template.jinja)."""
    import torch
    from transformers import AutoModelForCausalLM

    family = FAMILIES[name]
    dest = Path(dest)
    tokenizer = build_tokenizer(family)
    config = build_config(family, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    assert model.config.model_type == family.model_type, (name, model.config.model_type)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def turn_end_id(name: str, tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(FAMILIES[name].turn_end)


# ----------------------------------------------------------------------------------------------------- recipes

STAGES = ("sft", "reward", "ppo", "ppo-lora", "grpo", "dpo")
STAGE3 = ("ppo", "ppo-lora", "grpo", "dpo")
# TINY_OVERRIDES (tests/conftest.py) with room for the longer chat templates (ChatML's system turn and headers):
# 64 tokens cut a demonstration before its turn end, which is what these tests are about
OVERRIDES = {
    **{stage: TINY_OVERRIDES[stage] for stage in ("sft", "reward", "ppo", "grpo", "dpo")},
    "sft": {**TINY_OVERRIDES["sft"], "max_length": 128},
    "reward": {**TINY_OVERRIDES["reward"], "max_length": 128},
    "dpo": {**TINY_OVERRIDES["dpo"], "max_length": 128},
    "ppo-lora": {**TINY_OVERRIDES["ppo"], "lora_target_modules": "all-linear", "num_ppo_epochs": 2,
                 "logging_steps": 2, "save_steps": 4},
}


def write_family_recipes(name: str, model: Path | str, dest: Path | str, outputs: Path | str) -> Path:
    """recipes/tiny/{sft,reward,ppo,ppo-lora,grpo,dpo}.yaml for the family's model at `model`: the chain reads
    `model` and then its own outputs under `outputs` (ppo-lora from the full chain's sft and reward), at the tiny
    test budgets, on the embedded datasets."""
    assert name in FAMILIES, name
    dest, outputs = Path(dest), Path(outputs)
    dest.mkdir(parents=True, exist_ok=True)
    paths = {"sft": {"model_name_or_path": str(model)},
             "reward": {"model_name_or_path": str(outputs / "sft")},
             **{stage: {"sft_model_path": str(outputs / "sft"), "reward_model_path": str(outputs / "reward")}
                for stage in ("ppo", "ppo-lora")},
             **{stage: {"model_name_or_path": str(outputs / "sft"), "reward_model_path": str(outputs / "reward")}
                for stage in ("grpo", "dpo")}}
    for stage in STAGES:
        recipe = yaml.safe_load((ROOT / "recipes" / "tiny" / f"{stage}.yaml").read_text())
        recipe.update(OVERRIDES[stage], **paths[stage], disable_tqdm=True, report_to="none",
                      output_dir=str(outputs / stage))
        assert not {"dataset_name", "embedded_seed"} - set(recipe), stage  # the embedded datasets
        (dest / f"{stage}.yaml").write_text(yaml.safe_dump(recipe))
    return dest


# ------------------------------------------------------------------------------------------ what a stage saved

def generation_eos_ids(output_dir: Path | str) -> list[int] | None:
    """eos_token_id of the generation_config.json a stage saved (a list, or None without one)."""
    path = Path(output_dir) / "generation_config.json"
    if not path.exists():
        return None
    eos = json.loads(path.read_text()).get("eos_token_id")
    return [] if eos is None else eos if isinstance(eos, list) else [eos]


def recorded_stop_ids(output_dir: Path | str) -> list[int] | None:
    """The stop token ids a stage-3 stage used, where it recorded them: results.json (`stop_token_id(s)`) or the
    training arguments it saved, else None (nothing records them)."""
    results = Path(output_dir) / "results.json"
    if results.exists():
        saved = json.loads(results.read_text())
        for key in ("stop_token_ids", "stop_token_id"):
            if saved.get(key) is not None:
                value = saved[key]
                return value if isinstance(value, list) else [value]
    return None


# ------------------------------------------------------------------------------------------ pytest plugin part

def pytest_configure(config):
    config.addinivalue_line("markers", "families: the families outside CI_FAMILIES in tests/test_families.py "
                                       "(run them with RUN_ALL_FAMILIES=1 pytest -m families tests/test_families.py)")


def pytest_collection_modifyitems(config, items):
    import pytest

    run_all = os.environ.get("RUN_ALL_FAMILIES") == "1"
    for item in items:
        name = getattr(item, "callspec", None) and item.callspec.params.get("family")
        if name in FAMILIES and name not in CI_FAMILIES:  # a `family` parameter naming one of FAMILIES alone
            item.add_marker("families")
            if not run_all:
                item.add_marker(pytest.mark.skip(reason=f"{name}: outside CI_FAMILIES; RUN_ALL_FAMILIES=1 runs it"))


# --------------------------------------------------------------------------------------------- the measurement

def _first_error(text: str) -> tuple[str, str]:
    """(the exception line, the innermost pipeline/ frame `file:line`) of a stage's output."""
    lines = [line for line in text.splitlines() if line.strip()]
    exception = ""
    for line in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b.*:|^[\w.]+Error$|^Error: |^\S+: error: ", line.strip()) \
                or line.startswith(("ValueError", "RuntimeError", "AssertionError", "TypeError", "KeyError")):
            exception = line.strip()
            break
    if not exception and lines:
        exception = lines[-1].strip()
    frames = re.findall(r'File "([^"]*/(?:pipeline|trl|transformers|peft)/[^"]+)", line (\d+)', text)
    pipeline_frames = [f"{p[p.rindex('pipeline/'):]}:{n}" for p, n in frames if "/pipeline/" in p
                       and "site-packages" not in p]
    innermost = [f"{p[p.rindex('site-packages/') + 14:] if 'site-packages/' in p else p}:{n}" for p, n in frames[-1:]]
    where = (pipeline_frames[-1] if pipeline_frames else "") + (f" (raised in {innermost[0]})" if innermost else "")
    return exception[:300], where


def run_stage(stage: str, recipe: Path, timeout: int = 900, *extra) -> dict:
    script = "ppo" if stage == "ppo-lora" else stage
    started = time.time()
    result = run_python(f"scripts/{script}.py", "--config", recipe, *extra, check=False, timeout=timeout)
    record = {"stage": stage, "returncode": result.returncode, "seconds": round(time.time() - started, 1)}
    if result.returncode != 0:
        output = result.stdout + "\n" + result.stderr
        record["error"], record["where"] = _first_error(output)
        record["in_evaluation"] = "policy_eval.py" in output or "evaluate_against_sft" in output
        record["log_tail"] = output[-6000:]
    return record


def measure(name: str, base: Path) -> dict:
    """One family through every stage alone (scripts/<stage>.py), going on after a failure where the inputs
    allow: a stage whose sft output is missing starts from the base model instead (noted), one whose reward model
    is missing does not run."""
    from transformers import AutoTokenizer

    started = time.time()
    model = write_family_model(name, base / "model")
    recipes = write_family_recipes(name, model, base / "recipes", base / "outputs")
    outputs = base / "outputs"
    tokenizer = AutoTokenizer.from_pretrained(model)
    report = {"family": name, "turn_end": FAMILIES[name].turn_end, "turn_end_id": turn_end_id(name, tokenizer),
              "eos_token": tokenizer.eos_token, "eos_token_id": tokenizer.eos_token_id, "stages": {}}
    for stage in STAGES:
        extra, note = [], ""
        if stage != "sft" and not (outputs / "sft" / "config.json").exists():
            field = "model_name_or_path" if stage in ("reward", "grpo", "dpo") else "sft_model_path"
            extra, note = [f"--{field}", str(model)], "sft output missing: from the base model"
        if stage in ("ppo", "ppo-lora", "grpo", "dpo") and not (outputs / "reward" / "config.json").exists():
            report["stages"][stage] = {"stage": stage, "returncode": None, "error": "not run: no reward model"}
            continue
        record = run_stage(stage, recipes / f"{stage}.yaml", 900, *extra)
        if stage == "ppo-lora" and "'lora_target_modules' must be a list" in record.get("error", ""):
            # the recipe check refuses the string `all-linear`: the same run with the list the command line gives
            retry = run_stage(stage, recipes / f"{stage}.yaml", 900, *extra, "--lora_target_modules", "all-linear")
            retry["note"] = f"the recipe's `all-linear` string refused ({record['error']}); rerun as a list"
            retry["refused_recipe"] = record
            record = retry
        if note:
            record["note"] = note
        out = outputs / stage
        if stage in STAGE3 and record["returncode"] == 0:
            results = json.loads((out / "results.json").read_text())
            key = "ppo" if stage == "ppo-lora" else stage
            record["evaluation"] = {k: results.get(k) for k in (f"gold_score_{key}", "gold_score_sft",
                                                                "gold_win_rate_vs_sft", "kl_to_sft", f"eos_rate_{key}")}
            record["generation_eos_ids"] = generation_eos_ids(out)
            record["recorded_stop_ids"] = recorded_stop_ids(out)
        report["stages"][stage] = record
    report["seconds"] = round(time.time() - started, 1)
    return report


def _cell(record: dict, stage: str) -> str:
    if record.get("returncode") is None:
        return "not run"
    if record["returncode"] == 0:
        return "pass"
    return "FAIL (eval)" if stage in STAGE3 and record.get("in_evaluation") else "FAIL"


def table(reports: list[dict]) -> str:
    rows = ["| family | sft | reward | ppo | ppo-lora | grpo | dpo | eval | stop ids in ppo's generation_config "
            "(turn end, EOS) | seconds |", "|" + "---|" * 10]
    for report in reports:
        stages = report["stages"]
        cells = [_cell(stages[s], s) for s in STAGES]
        evaluated = [s for s in STAGE3 if stages[s].get("returncode") == 0]
        failed_eval = [s for s in STAGE3 if stages[s].get("in_evaluation")]
        eval_cell = ("FAIL (" + ", ".join(failed_eval) + ")" if failed_eval
                     else "pass" if evaluated else "not run")
        ppo = stages["ppo"]
        stop = ppo.get("generation_eos_ids")
        stop_cell = (f"`{stop}` (`{report['turn_end']}`={report['turn_end_id']}, "
                     f"`{report['eos_token']}`={report['eos_token_id']})").replace("|", "\\|") if stop is not None else "-"
        rows.append(f"| {report['family']} | " + " | ".join(cells) + f" | {eval_cell} | {stop_cell} | "
                    f"{report['seconds']:.0f} |")
    return "\n".join(rows)


def main(argv: list[str]) -> None:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("families", nargs="*", default=list(FAMILIES))
    parser.add_argument("--out", default=None, help="work folder (default: a new temporary one)")
    parser.add_argument("--json", default=None, help="write every stage's record (errors, log tails) here")
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="families-"))
    reports = []
    for name in args.families:
        report = measure(name, out / name)
        reports.append(report)
        print(f"=== {name}: {report['seconds']:.0f} s", flush=True)
        for stage, record in report["stages"].items():
            print(f"  {stage:9s} {_cell(record, stage):12s} {record.get('seconds', '')}  {record.get('error', '')}"
                  f"  {record.get('where', '')}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(reports, indent=1))
    print(table(reports))


if __name__ == "__main__":
    main(sys.argv[1:])
