"""Issue 26: tiny random models of the families users bring (Llama tied and untied, Qwen with ChatML, Mistral,
GPT-NeoX, OPT, Gemma 2 and 3, Phi-3; tests/families.py builds them offline), each through sft -> reward -> ppo ->
grpo -> dpo by the runner and LoRA PPO (`lora_target_modules: all-linear`) by scripts/ppo.py, with the evaluation
every stage-3 stage ends with.

Each family's chain runs once (a module-scoped fixture); the tests then check what it left: every stage's model,
loadable in plain transformers; the stage-3 evaluation's figures in results.json; the saved generation config
stopping at the end of an assistant turn as the family's chat template writes it (`<|im_end|>`, `<|eot_id|>`,
`<end_of_turn>`, `<|end|>`), never at the pad; the tokenizer's own BOS kept, once per chat.

`make test` runs the families in families.CI_FAMILIES; the others carry the `families` marker and run with
RUN_ALL_FAMILIES=1 (e.g. `RUN_ALL_FAMILIES=1 pytest -q tests/test_families.py`, or `-m families` for those only).
"""

import json
import time

import pytest
import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          GenerationConfig)

pytest.register_assert_rewrite("families")  # before its import: it is a plugin too (pytest_plugins below)

import families  # noqa: E402
from conftest import run_python  # noqa: E402
from families import FAMILIES, STAGE3  # noqa: E402

pytest_plugins = ("families",)  # the `families` marker, and the skip of non-CI families without RUN_ALL_FAMILIES=1

RUNNER_STAGES = ("sft", "reward", "ppo", "grpo", "dpo")
POLICIES = ("sft", "ppo", "ppo-lora", "grpo", "dpo")
SCALAR_HEADS = ("reward", "ppo/value_model", "ppo-lora/value_model")
GPT2_MODULES = {"c_attn", "c_proj", "c_fc"}
CONVERSATION = [{"role": "user", "content": "Write a review of The Lost River."},
                {"role": "assistant", "content": "The Lost River is a superb drama."}]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def chain(family, tmp_path_factory):
    """The family's model, its chain through the runner, then LoRA PPO from the same SFT policy and reward model.
    Failures are kept (not raised) so that each test says what it finds missing."""
    base = tmp_path_factory.mktemp(family)
    model = families.write_family_model(family, base / "model")
    recipes = families.write_family_recipes(family, model, base / "recipes", base / "outputs")
    outputs = base / "outputs"
    started = time.time()
    runner = run_python("-m", "pipeline", "run", recipes, "--stages", ",".join(RUNNER_STAGES), "--skip_eval",
                        check=False, timeout=1800)
    runner_seconds = time.time() - started
    lora = None
    if (outputs / "sft" / "config.json").exists() and (outputs / "reward" / "config.json").exists():
        lora = run_python("scripts/ppo.py", "--config", recipes / "ppo-lora.yaml", check=False, timeout=900)
    return {"family": FAMILIES[family], "model": model, "recipes": recipes, "outputs": outputs, "runner": runner,
            "lora": lora, "seconds": time.time() - started, "runner_seconds": runner_seconds}


def _tail(result) -> str:
    if result is None:
        return "(not run: the chain left no sft or reward model)"
    return f"exit {result.returncode}\n{result.stdout[-2500:]}\n{result.stderr[-4000:]}"


def _require(chain, stage: str):
    """The stage's output folder; a failure that shows the run's output when the stage left no model."""
    out = chain["outputs"] / stage
    if not (out / "config.json").exists():
        result = chain["lora"] if stage.startswith("ppo-lora") else chain["runner"]
        pytest.fail(f"{chain['family'].name}: {stage} wrote no model in {out}\n{_tail(result)}")
    return out


def test_the_chain_runs(chain, record_property):
    record_property("chain_seconds", round(chain["seconds"], 1))
    assert chain["runner"].returncode == 0, _tail(chain["runner"])
    assert chain["lora"] is not None and chain["lora"].returncode == 0, _tail(chain["lora"])


@pytest.mark.parametrize("stage", POLICIES)
def test_policies_load_in_plain_transformers(chain, stage):
    family = chain["family"]
    out = _require(chain, stage)
    assert (out / "model.safetensors").exists()
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == family.model_type
    assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer)
    assert tokenizer.chat_template and tokenizer.pad_token_id is not None
    assert model.config.pad_token_id == tokenizer.pad_token_id
    ids = tokenizer.apply_chat_template(CONVERSATION[:1], add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    generated = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > ids["input_ids"].shape[1]
    if stage == "ppo-lora":  # the adapter beside the merged model, on every linear layer but the output head
        adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
        targets = adapter["target_modules"]  # peft writes all-linear out as the full names of what it chose
        targets = {name.rsplit(".", 1)[-1] for name in ([targets] if isinstance(targets, str) else targets)}
        head = model.get_output_embeddings()
        linear = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                  if isinstance(module, torch.nn.Linear) and module is not head}
        assert targets == linear and not targets & GPT2_MODULES, (targets, linear)


@pytest.mark.parametrize("sub", SCALAR_HEADS)
def test_reward_and_value_models_load_in_plain_transformers(chain, sub):
    out = _require(chain, sub)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(chain["outputs"] / sub.split("/")[0])
    assert model.config.model_type == chain["family"].model_type
    assert model.config.num_labels == 1
    assert model.config.pad_token_id == tokenizer.pad_token_id


@pytest.mark.parametrize("stage", STAGE3)
def test_stage3_results_hold_the_evaluation(chain, stage):
    """The evaluation against the SFT policy every stage-3 stage ends with: the oracle's and the reward model's
    figures, the KL, the rate of answers that ended (at a stop token) rather than ran to the length limit."""
    out = _require(chain, stage)
    key = "ppo" if stage == "ppo-lora" else stage
    results = json.loads((out / "results.json").read_text())
    for name in (f"gold_score_{key}", "gold_score_sft", "gold_win_rate_vs_sft", "kl_to_sft", f"rm_score_{key}",
                 "rm_score_sft", f"eos_rate_{key}"):
        assert isinstance(results.get(name), float), (stage, name, sorted(results))
    assert 0 <= results["gold_win_rate_vs_sft"] <= 1 and 0 <= results[f"eos_rate_{key}"] <= 1
    if stage != "ppo-lora":  # the runner collected it too
        collected = json.loads((chain["outputs"] / "results.json").read_text())
        assert collected[stage][f"gold_score_{key}"] == results[f"gold_score_{key}"]


@pytest.mark.parametrize("stage", ["sft", *STAGE3])
def test_generation_stops_at_the_end_of_an_assistant_turn(chain, stage, record_property):
    """The saved generation config's eos_token_id holds the token that ends an assistant turn in the family's chat
    template (ChatML's <|im_end|> while EOS is <|endoftext|>, Llama 3's <|eot_id|>, Gemma's <end_of_turn>,
    Phi-3's <|end|>; EOS itself where the template ends turns with it), and never the pad token: plain
    transformers' `generate`, TRL's GRPO and our PPO stop where the answer ends."""
    family = chain["family"]
    out = _require(chain, stage)
    tokenizer = AutoTokenizer.from_pretrained(out)
    turn_end = tokenizer.convert_tokens_to_ids(family.turn_end)
    stops = families.generation_eos_ids(out)
    record_property("stop_token_ids", stops)
    record_property("turn_end", f"{family.turn_end}={turn_end}")
    assert stops is not None, f"{stage} saved no generation_config.json"
    assert turn_end in stops, (f"{family.name} {stage}: generation_config eos_token_id {stops} lacks the turn end "
                               f"{family.turn_end} ({turn_end}); EOS {tokenizer.eos_token} is {tokenizer.eos_token_id}")
    assert tokenizer.pad_token_id not in stops
    assert GenerationConfig.from_pretrained(out).eos_token_id is not None
    recorded = families.recorded_stop_ids(out)  # where a stage records the ids it stopped at, they agree
    if recorded is not None:
        assert turn_end in recorded and tokenizer.pad_token_id not in recorded


def test_the_tokenizer_keeps_the_familys_bos_and_pad(chain):
    """The tokenizer that every stage saved still adds the family's BOS itself where the family does, and a chat
    rendered to ids holds it once; the pad is the family's own unless it was the EOS (then the pipeline's <|pad|>),
    and never the token that ends a turn."""
    family = chain["family"]
    for stage in ("sft", "ppo"):
        out = _require(chain, stage)
        tokenizer = AutoTokenizer.from_pretrained(out)
        ids = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
        if family.add_bos:
            assert tokenizer("The Lost River")["input_ids"][0] == tokenizer.bos_token_id, stage
            if family.bos != family.eos:
                assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id, (stage, ids)
        expected_pad = family.pad if family.pad and family.pad != family.eos else "<|pad|>"
        assert tokenizer.pad_token == expected_pad, (stage, tokenizer.pad_token)
        assert tokenizer.pad_token_id != tokenizer.convert_tokens_to_ids(family.turn_end)
        assert AutoConfig.from_pretrained(out).pad_token_id == tokenizer.pad_token_id


def test_a_family_chain_fits_the_budget(chain):
    """One family's chain (five stages by the runner and LoRA PPO) in minutes on 2 cores, not tens of them."""
    assert chain["seconds"] < 600, f"{chain['family'].name}: {chain['seconds']:.0f} s"
