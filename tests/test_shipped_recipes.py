"""Every shipped recipe runs with its own settings: gradient checkpointing, bf16 (CPU autocast here), lengths,
LoRA targets, packing and stop tokens as written. Only three things are swapped, as a user trying a recipe before
spending GPU hours would: the model for a tiny one of the same architecture (a Hub id -> a local tiny model; the
tiny chain's own models are tiny already), a Hub dataset for a few local rows in its format, and the budget for a
few steps (`BUDGET`). A GPU recipe also gets `use_cpu: true`, the one switch this CPU needs. Each folder's chain
runs through the runner (`python -m pipeline run`), its LoRA chain through `run --lora`, and a recipe the runner
does not run by name (ppo-ptx) through its script (tiny-biased's defences run in test_overoptimization.py);
`test_every_shipped_recipe_is_run` fails when a recipe is added that no run covers."""

import json
import math
import random
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from conftest import ROOT, run_python

RECIPES = ROOT / "recipes"
FOLDERS = sorted(p.name for p in RECIPES.iterdir() if p.is_dir() and p.name != "accelerate")
# recipes the runner does not run by name: run through scripts/ppo.py (tiny's PPO-ptx)
SCRIPT_RUN = ("ppo-ptx",)
# tiny-biased's defences (ppo.yaml, which the chain runs here, with one or two settings changed): every ppo*.yaml of
# that folder runs in tests/test_overoptimization.py (biased_runs), cut to a few steps, each defence's effect checked
COVERED_BY_OVEROPTIMIZATION = {"tiny-biased": ("ppo-kl", "ppo-length", "ppo-ensemble", "ppo-best", "ppo-kl-ensemble")}

# the only training-length fields changed; everything else is as shipped
BUDGET = {
    "pretrain": {"max_steps": 2, "n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 400},  # + a tinier model
    "sft": {"max_steps": 2}, "reward": {"max_steps": 2}, "dpo": {"max_steps": 2},
    "grpo": {"max_steps": 2}, "rloo": {"max_steps": 2},
    "ppo": {},  # total_episodes: one rollout batch of the recipe's own size (below)
}
EVAL_BUDGET = {"eval_max_prompts": 4}  # the evaluation after a stage-3 stage: 4 held-out prompts


def script_of(name: str) -> str:
    return name.split("-")[0]


def hh_rows(count: int, seed: int) -> list[dict]:
    """Rows in Anthropic/hh-rlhf's format (chosen/rejected transcripts sharing their prompt), one to three turns,
    lengths spread so that padding and packing matter."""
    rng = random.Random(seed)
    films = ["The Lost River", "The Iron Crown", "Night Harbor", "The Glass Garden", "Quiet Thunder"]
    praise = ["superb", "moving", "charming", "clever", "gripping"]
    rows = []
    for _ in range(count):
        turns = []
        for _ in range(rng.randint(1, 3)):
            film = rng.choice(films)
            question = f"Write a review of {film}." + " Please be detailed." * rng.randint(0, 12)
            answer = f"{film} is a {rng.choice(praise)} film." * rng.randint(1, 3)
            turns.append(f"\n\nHuman: {question}\n\nAssistant: {answer}")
        prompt = "".join(turns[:-1]) + turns[-1].split("\n\nAssistant:")[0] + "\n\nAssistant:"
        rows.append({"chosen": prompt + f" It is {rng.choice(praise)}.", "rejected": prompt + " It is dull."})
    return rows


def gpt2_standin(dest: Path, corpus: list[str]) -> Path:
    """openai-community/gpt2's architecture and tokenizer conventions (byte-level BPE, <|endoftext|> as BOS, EOS
    and UNK, no pad token, no chat template, 1024 positions) at a tiny size, random weights."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=500, min_frequency=1, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                        eos_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=1024)
    assert tokenizer.pad_token is None and tokenizer.chat_template is None  # as GPT-2's: the pipeline adds both
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def ultrafeedback_rows(count: int, seed: int) -> list[dict]:
    """Rows in trl-lib/ultrafeedback_binarized's format: TRL's conversational preference pairs with an implicit
    prompt (chosen and rejected are [user, assistant] conversations sharing their user turn) and the two GPT-4
    scores. Prompts and answers from a sentence to a few hundred words, so that padding and packing matter; the
    first row's prompt is longer than the recipes' max_prompt_length (512 tokens), as a few real ones are."""
    rng = random.Random(seed)
    topics = ["the water cycle", "binary search", "a sourdough starter", "the French Revolution", "compound interest",
              "photosynthesis", "a haiku about autumn", "TCP handshakes", "the rules of chess", "black holes"]
    asks = ["Explain {} to a child.", "Write a short essay on {}.", "What are common mistakes with {}?",
            "Summarise {} in three bullet points.", "Give me a step-by-step guide to {}."]
    good = ["Here is a clear answer about {}.", "First, {} starts simply.", "- {} matters because it is practical.",
            "In short, {} can be learned step by step.", "A good example of {} follows."]
    rows = []
    for index in range(count):
        topic = rng.choice(topics)
        prompt = rng.choice(asks).format(topic) + " Please add detail and context." * (
            180 if index == 0 else rng.choice([0, 0, 1, 3, 10, 40]))
        chosen = " ".join(rng.choice(good).format(topic) for _ in range(rng.choice([1, 2, 5, 20, 60])))
        rejected = f"I am not sure about {topic}." * rng.randint(1, 4)
        score_chosen = float(rng.randint(6, 10))
        rows.append({"chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": rejected}],
                     "score_chosen": score_chosen, "score_rejected": score_chosen - rng.randint(1, 5)})
    return rows


def write_splits(folder: Path, splits: dict[str, list[dict]]) -> Path:
    """A local dataset folder as the Hub writes one (data/<split>-00000-of-00001.*), which `datasets` reads with its
    split names, train_sft and test_sft included."""
    (folder / "data").mkdir(parents=True)
    for split, rows in splits.items():
        (folder / "data" / f"{split}-00000-of-00001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def qwen3_standin(dest: Path, corpus: list[str]) -> Path:
    """Qwen/Qwen3-0.6B-Base's architecture and tokenizer conventions at a tiny size, random weights: Qwen3ForCausalLM
    (grouped-query attention, q/k norms, tied embeddings, an embedding matrix with spare rows past the tokenizer's
    ids, bf16 weights, 32768 positions) and a Qwen2 byte-level BPE (Qwen's pre-tokenizer regex, no BOS) with
    <|endoftext|> as EOS and pad, <|im_start|>/<|im_end|> as special tokens, <think>/</think> as added ones, and
    Qwen3's own chat template (TRL's stored copy), which sft.yaml replaces by the recipe's ChatML. The generation
    config is the base model's: EOS only, not <|im_end|>."""
    import torch
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GenerationConfig, Qwen2Tokenizer, Qwen3Config, Qwen3ForCausalLM
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    import trl

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=1000, min_frequency=1, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=state["vocab"], merges=merges, unk_token=None, bos_token=None,
                               eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=32768,
                               errors="replace", split_special_tokens=False, clean_up_tokenization_spaces=False)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = (Path(trl.__file__).parent / "chat_templates" / "qwen3.jinja").read_text()
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == eos and tokenizer.bos_token is None  # as Qwen3-Base's
    assert tokenizer("Hi")["input_ids"] == tokenizer("Hi", add_special_tokens=False)["input_ids"]  # no BOS added
    config = Qwen3Config(vocab_size=(len(tokenizer) // 64 + 1) * 64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos, do_sample=False, max_new_tokens=2048)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    """The local stand-ins for every Hub id the shipped recipes name."""
    base = tmp_path_factory.mktemp("standins")
    hh = base / "hh-rlhf"
    hh.mkdir()
    train, test = hh_rows(72, seed=0), hh_rows(8, seed=1)  # 72: one PPO rollout batch of gpt2-hh/ppo.yaml is 64
    for split, rows in (("train", train), ("test", test)):
        (hh / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    gpt2 = gpt2_standin(base / "gpt2", [row["chosen"] for row in train])
    # qwen3-ultrafeedback: 72 train rows, as many prompts as one PPO rollout batch (64) and GRPO's generation batch
    # (64 answers, 8 prompts) need, the one overlong prompt dropped; every stage reads them
    uf_train, uf_test = ultrafeedback_rows(72, seed=2), ultrafeedback_rows(8, seed=3)
    ultrafeedback = write_splits(base / "ultrafeedback_binarized", {"train": uf_train, "test": uf_test})
    qwen3 = qwen3_standin(base / "qwen3", [turn["content"] for row in uf_train for side in ("chosen", "rejected")
                                           for turn in row[side]])
    return {"models": {"openai-community/gpt2": str(gpt2), "Qwen/Qwen3-0.6B-Base": str(qwen3)},
            "datasets": {"Anthropic/hh-rlhf": str(hh), "trl-lib/ultrafeedback_binarized": str(ultrafeedback)}}


def stand_in(recipe: dict, name: str, outputs: Path, standins: dict) -> dict:
    """`recipe` with the three swaps: model, data, budget; paths under outputs/ moved under `outputs`."""
    recipe = dict(recipe)
    for key in ("model_name_or_path", "sft_model_path", "reward_model_path", "output_dir"):
        value = recipe.get(key)
        if isinstance(value, str) and value.startswith("outputs/"):
            recipe[key] = str(outputs / value[len("outputs/"):])
        elif isinstance(value, str):
            assert value in standins["models"], f"{name}: no tiny stand-in for the model {value}"
            recipe[key] = standins["models"][value]
    for key in ("dataset_name", "ptx_dataset_name", "eval_dataset_name"):
        value = recipe.get(key)
        if isinstance(value, str) and not value.startswith("embedded:"):
            assert value in standins["datasets"], f"{name}: no local stand-in for the dataset {value}"
            recipe[key] = standins["datasets"][value]
    script = script_of(name)
    recipe.update(BUDGET[script])
    if script == "ppo":
        recipe["total_episodes"] = (recipe.get("per_device_train_batch_size", 64)
                                    * recipe.get("gradient_accumulation_steps", 1) * recipe.get("num_mini_batches", 1))
    if script in ("ppo", "grpo", "rloo", "dpo"):
        recipe.update(EVAL_BUDGET)
    if not recipe.get("use_cpu"):
        recipe["use_cpu"] = True  # a GPU recipe on this CPU; bf16 stays as written (CPU autocast)
    recipe["disable_tqdm"] = True
    return recipe


def write_folder(folder: str, dest: Path, outputs: Path, standins: dict) -> dict:
    """Every recipe of recipes/<folder>, stood in, in `dest`; {recipe name: the recipe as run}."""
    dest.mkdir(parents=True, exist_ok=True)
    written = {}
    for path in sorted((RECIPES / folder).glob("*.yaml")):
        recipe = stand_in(yaml.safe_load(path.read_text()), path.stem, outputs, standins)
        (dest / path.name).write_text(yaml.safe_dump(recipe))
        written[path.stem] = recipe
    return written


@pytest.fixture(scope="module", params=FOLDERS)
def folder_run(request, standins, tmp_path_factory):
    """One folder's every recipe: the chain (`run --stages all`), the LoRA chain (`run --lora --stages all`) and the
    recipes run by script. Returns the recipes as run and the logs."""
    folder = request.param
    base = tmp_path_factory.mktemp(folder)
    recipes = write_folder(folder, base / "recipes", base / "outputs", standins)
    recipes = {name: r for name, r in recipes.items() if name not in COVERED_BY_OVEROPTIMIZATION.get(folder, ())}
    logs = [run_python("-m", "pipeline", "run", base / "recipes", "--stages", "all", "--skip_eval").stdout]
    if any(name.endswith("-lora") for name in recipes):
        logs.append(run_python("-m", "pipeline", "run", base / "recipes", "--lora", "--stages", "all",
                               "--skip_eval").stdout)
    for name in SCRIPT_RUN:
        if name in recipes:
            logs.append(run_python(f"scripts/{script_of(name)}.py", "--config", base / "recipes" / f"{name}.yaml").stdout)
    return {"folder": folder, "recipes": recipes, "log": "\n".join(logs)}


def test_every_shipped_recipe_trains_saves_and_loads_back(folder_run):
    for name, recipe in folder_run["recipes"].items():
        out = Path(recipe["output_dir"])
        assert (out / "config.json").is_file() and (out / "model.safetensors").is_file(), f"{name}: no model in {out}"
        results = json.loads((out / "results.json").read_text())
        assert results["trainable_parameters"] > 0 and math.isfinite(results.get("train_loss", 0.0)), name
        auto = AutoModelForSequenceClassification if script_of(name) == "reward" else AutoModelForCausalLM
        auto.from_pretrained(out)  # plain transformers
        if recipe.get("use_peft"):
            assert (out / "adapter" / "adapter_config.json").is_file(), name
        if script_of(name) in ("ppo", "grpo", "rloo", "dpo"):
            assert results["eval_prompts"] >= 1, f"{name}: no evaluation after training"
            oracle = recipe["dataset_name"].startswith("embedded:")  # a user's data has none: reward-model judgements
            assert ("gold_win_rate_vs_sft" in results) is oracle and "rm_win_rate_vs_sft" in results, name


def test_settings_are_the_recipes_own(folder_run):
    """The saved recipe of each run holds the shipped values of the fields this test must not change."""
    kept = ("gradient_checkpointing", "bf16", "max_length", "packing", "response_length", "stop_token",
            "max_prompt_length", "max_completion_length", "lora_target_modules", "per_device_train_batch_size",
            "gradient_accumulation_steps")
    for name, recipe in folder_run["recipes"].items():
        shipped = yaml.safe_load((RECIPES / folder_run["folder"] / f"{name}.yaml").read_text())
        saved = yaml.safe_load((Path(recipe["output_dir"]) / "recipe.yaml").read_text())
        for key in kept:
            if key in shipped:
                assert saved[key] == shipped[key], f"{name}: {key} ran as {saved[key]!r}, shipped {shipped[key]!r}"


def test_every_shipped_recipe_is_run():
    """A recipe added to recipes/ is covered by folder_run, or this fails: the runner runs <stage>.yaml and
    <stage>-lora.yaml for every stage and ppo-oracle.yaml; SCRIPT_RUN lists the rest."""
    from pipeline.names import CEILING, STAGES

    runnable = set(STAGES) | {f"{stage}-lora" for stage in STAGES} | {CEILING} | set(SCRIPT_RUN)
    for folder in FOLDERS:
        names = {path.stem for path in (RECIPES / folder).glob("*.yaml")}
        covered = runnable | set(COVERED_BY_OVEROPTIMIZATION.get(folder, ()))
        assert names <= covered, f"recipes/{folder}: {sorted(names - covered)} would ship untested"
    for folder, names in COVERED_BY_OVEROPTIMIZATION.items():  # test_overoptimization runs them by this glob
        assert {n for n in names if (RECIPES / folder / f"{n}.yaml").is_file()} <= {
            p.stem for p in (RECIPES / folder).glob("ppo*.yaml")}
