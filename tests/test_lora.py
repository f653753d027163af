"""LoRA through TRL's ModelConfig (use_peft, lora_r, ...) and get_peft_config, on tiny settings: every LoRA stage
saves its adapter (output_dir/adapter) and the merged model (output_dir, plain transformers); the reward model
trains its score head beside the adapters; PPO with LoRA keeps one copy of the base model for policy, reference
(its adapters disabled), value (an adapter and a head) and a reward model trained as an adapter on the SFT model,
trains both adapters, resumes after SIGKILL and merges; 4-bit loading is GPU-only and fails in one line on CPU."""

import json
import math
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from conftest import ROOT, TINY_OVERRIDES, run_python

LORA_STAGES = ("sft", "reward", "ppo", "grpo", "dpo")


def write_lora_recipes(dest, outputs, pretrain_recipe):
    """recipes/tiny/<stage>-lora.yaml on tiny settings, writing under `outputs`, reading the tiny pretrain model;
    the pretrain recipe is beside them (the evaluation suite takes the corpus and the pretrain model from it)."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "pretrain.yaml").write_text(pretrain_recipe.read_text())
    pretrain_dir = yaml.safe_load(pretrain_recipe.read_text())["output_dir"]
    for stage in LORA_STAGES:
        recipe = yaml.safe_load((ROOT / "recipes" / "tiny" / f"{stage}-lora.yaml").read_text())
        recipe.update(TINY_OVERRIDES[stage], disable_tqdm=True, output_dir=str(outputs / stage))
        for key in ("model_name_or_path", "sft_model_path", "reward_model_path"):
            if key in recipe:
                name = os.path.basename(recipe[key])
                recipe[key] = pretrain_dir if name == "pretrain" else str(outputs / name)
        (dest / f"{stage}-lora.yaml").write_text(yaml.safe_dump(recipe))
    return dest


@pytest.fixture(scope="module")
def lora_run(tiny_run, tmp_path_factory):
    """The LoRA chain (sft -> reward -> ppo, then grpo and dpo: the *-lora.yaml recipes) through `run --lora`, on
    the tiny pretrain."""
    base = tmp_path_factory.mktemp("lora")
    recipes = write_lora_recipes(base / "recipes", base / "outputs", tiny_run["recipes"] / "pretrain.yaml")
    result = run_python("-m", "pipeline", "run", recipes, "--lora", "--stages", "all")
    return {"outputs": base / "outputs", "recipes": recipes, "log": result.stdout + result.stderr,
            "full": tiny_run["outputs"]}


def _results(path):
    return json.loads((path / "results.json").read_text())


def _lora_numel(adapter_dir) -> int:
    return sum(t.numel() for k, t in load_file(adapter_dir / "adapter_model.safetensors").items() if "lora_" in k)


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_lora_stage_saves_adapter_and_merged_model(lora_run, stage):
    out = lora_run["outputs"] / stage
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16
    assert config["base_model_name_or_path"] == (str(lora_run["outputs"] / "sft") if stage == "reward"
                                                 else yaml.safe_load((lora_run["recipes"] / "sft-lora.yaml")
                                                                     .read_text())["model_name_or_path"])
    # all-linear, which peft writes out as the module names it chose: GPT-2's attention and MLP projections in
    # every block, the same layers as naming c_attn, c_proj and c_fc
    assert {name.rsplit(".", 1)[-1] for name in config["target_modules"]} == {"c_attn", "c_fc", "c_proj"}
    assert len(config["target_modules"]) == 4 * yaml.safe_load(
        (lora_run["recipes"] / "pretrain.yaml").read_text())["n_layer"]
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()  # the merged model
    assert not (out / "adapter_config.json").exists()  # output_dir itself is a whole model, not an adapter
    results = _results(out)
    assert 0 < results["trainable_parameters"] < 0.5 * results["total_parameters"]
    # what the optimizer trained is what the adapter holds: the LoRA matrices (+ the reward model's score head)
    saved = load_file(adapter / "adapter_model.safetensors")
    assert results["trainable_parameters"] == sum(t.numel() for t in saved.values())
    assert any("score" in k for k in saved) == (stage == "reward")


def test_reward_model_trains_its_score_head(lora_run):
    """task SEQ_CLS: peft keeps a trained copy of `score` (modules_to_save) in the adapter, and the merged model
    has that head, not the random one the base would get."""
    from peft import PeftModel

    out = lora_run["outputs"] / "reward"
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    head = [v for k, v in saved.items() if "score" in k]
    assert len(head) == 1 and head[0].shape[0] == 1
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert merged.config.num_labels == 1
    torch.testing.assert_close(merged.score.weight, head[0])

    # the merged model scores as base + adapter does
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoModelForSequenceClassification.from_pretrained(lora_run["outputs"] / "sft", num_labels=1)
    base.config.pad_token_id = tokenizer.pad_token_id
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    batch = tokenizer(["\n\nHuman: Review The Lost River.\n\nAssistant: I loved it.", "It was dull."],
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted(**batch).logits, atol=1e-5, rtol=1e-4)


def test_merged_sft_model_loads_in_plain_transformers_and_equals_base_plus_adapter(lora_run):
    from peft import PeftModel

    from pipeline.models import load_causal_lm, load_tokenizer
    from trl import ModelConfig

    out = lora_run["outputs"] / "sft"
    tokenizer = AutoTokenizer.from_pretrained(out)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    base_path = json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_path).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), out / "adapter").eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Write a review of The Lost River."}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = merged(**ids).logits
        torch.testing.assert_close(logits, adapted(**ids).logits, atol=1e-5, rtol=1e-4)
        assert (logits - base(**ids).logits).abs().max() > 1e-3  # LoRA changed the model
        # the pipeline's loaders take the adapter folder itself: base + adapter, merged
        from_adapter = load_causal_lm(str(out / "adapter"), load_tokenizer(str(out / "adapter")), ModelConfig())
        torch.testing.assert_close(from_adapter.eval()(**ids).logits, logits, atol=1e-5, rtol=1e-4)
    # and a stage started from it trains it in full, as a model from from_pretrained (peft loads adapters frozen)
    assert all(p.requires_grad for p in from_adapter.parameters())
    assert merged.generate(**ids, max_new_tokens=4, do_sample=False).shape[1] > ids["input_ids"].shape[1]


def test_lora_chain_runs_and_is_evaluated(lora_run):
    """`run --lora` runs the *-lora.yaml stages (the pretrain model is the full chain's), collects their results
    in the LoRA run's folder and evaluates them; PPO's policy trains only its adapters."""
    assert "] pretrain:" not in lora_run["log"] and "] sft:" in lora_run["log"]  # pretrain did not run
    results = json.loads((lora_run["outputs"] / "results.json").read_text())
    assert set(results) >= {"sft", "reward", "ppo", "grpo", "dpo", "eval"}
    assert 0 <= results["ppo"]["gold_win_rate_vs_sft"] <= 1 and 0 <= results["reward"]["eval_accuracy"] <= 1
    assert set(results["eval"]["perplexity"]) == {"pretrain", "sft", "ppo", "grpo", "dpo"}
    ppo = results["ppo"]
    assert 0 < ppo["policy_trainable_parameters"] < 0.5 * ppo["policy_total_parameters"]
    full = _results(lora_run["full"] / "ppo")
    assert full["policy_trainable_parameters"] == full["policy_total_parameters"]  # without LoRA: all of it
    # the PPO output is a whole causal LM, with the value model beside it
    AutoModelForCausalLM.from_pretrained(lora_run["outputs"] / "ppo")
    AutoModelForSequenceClassification.from_pretrained(lora_run["outputs"] / "ppo" / "value_model")


@pytest.mark.parametrize("stage", ["grpo", "dpo"])
def test_stage3_lora_trains_only_adapters_and_saves_them_beside_the_merged_model(lora_run, stage):
    results = _results(lora_run["outputs"] / stage)
    assert 0 < results["trainable_parameters"] < 0.5 * results["total_parameters"]
    adapter = lora_run["outputs"] / stage / "adapter"
    assert _lora_numel(adapter) == results["trainable_parameters"]
    merged = AutoModelForCausalLM.from_pretrained(lora_run["outputs"] / stage)  # a plain checkpoint
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    assert 0 <= results["gold_win_rate_vs_sft"] <= 1 and math.isfinite(results["kl_to_sft"])


def test_ppo_lora_saves_its_adapter(lora_run):
    adapter = lora_run["outputs"] / "ppo" / "adapter"
    assert (adapter / "adapter_config.json").exists()
    assert _lora_numel(adapter) == _results(lora_run["outputs"] / "ppo")["policy_trainable_parameters"]


PROBE = """
import gc, json, os, sys
import pipeline.trainers.ppo as ppo
from transformers import PreTrainedModel

original = ppo.PPOTrainer.__init__

def probe(self, *args, **kwargs):
    original(self, *args, **kwargs)
    gc.collect()
    models = [o for o in gc.get_objects() if isinstance(o, PreTrainedModel)]
    lms = [m for m in models if type(m).__name__.endswith("LMHeadModel")]
    base = [p for m in lms for n, p in m.named_parameters() if "lora_" not in n]
    # the transformer weights under every head (LoRA matrices apart), each tensor once: copies of the base model
    backbones = {id(p): p.numel() for m in models for n, p in getattr(m, m.base_model_prefix, m).named_parameters()
                 if "lora_" not in n}
    print("PROBE " + json.dumps({
        "ref_model_is_none": self.ref_model is None,
        "policy": type(self.model.policy).__name__,
        "value_model": type(self.model.value_model).__name__,
        "reward_model": type(self.reward_model).__name__,
        "causal_lms": len(lms),
        "causal_lm_base_parameters": sum(p.numel() for p in base),
        "backbone_parameters": sum(backbones.values()),
        "sequence_classifiers": sum(type(m).__name__.endswith("ForSequenceClassification") for m in models),
    }), flush=True)
    os._exit(0)

ppo.PPOTrainer.__init__ = probe
from pipeline.stages import run
run("ppo", sys.argv[1:])
"""


def _probe_ppo(recipe, *flags) -> dict:
    result = run_python("-c", PROBE, "--config", recipe, *flags)
    line = next(line for line in result.stdout.splitlines() if line.startswith("PROBE "))
    return {**json.loads(line[len("PROBE "):]), "log": result.stdout + result.stderr}


def test_ppo_with_lora_holds_one_base_model_copy(lora_run, tiny_run, tmp_path):
    """Every transformers model alive once the PPOTrainer is built (the stage's own loading, then the trainer's).
    LoRA PPO of the LoRA chain, whose reward model is a LoRA adapter on its SFT model: one model, the policy (a
    PeftModel), and one copy of the base weights for policy, reference (its adapters disabled), value and reward
    (adapters on it). Beside it: a whole reward model (the full chain's) loads whole, the value model still an
    adapter; `share_base_model: false` loads the value model whole too (the old layout); without LoRA, four copies."""
    recipe = lora_run["recipes"] / "ppo-lora.yaml"
    lora = _probe_ppo(recipe, "--output_dir", tmp_path / "lora")
    beside = _probe_ppo(recipe, "--output_dir", tmp_path / "beside", "--reward_model_path",
                        tiny_run["outputs"] / "reward")
    separate = _probe_ppo(recipe, "--output_dir", tmp_path / "separate", "--share_base_model", "false")
    full = _probe_ppo(tiny_run["recipes"] / "ppo.yaml", "--output_dir", tmp_path / "full")
    assert lora["ref_model_is_none"] and lora["policy"] == "PeftModelForCausalLM"
    assert lora["causal_lms"] == beside["causal_lms"] == separate["causal_lms"] == 1
    assert not full["ref_model_is_none"] and full["causal_lms"] == 2
    assert 2 * lora["causal_lm_base_parameters"] == full["causal_lm_base_parameters"]  # one policy copy, not two
    one_copy = lora["causal_lm_base_parameters"]  # the policy's transformer (its LM head is tied to the embeddings)
    assert lora["backbone_parameters"] == one_copy  # policy, reference, value and reward: one copy
    assert lora["sequence_classifiers"] == 0
    assert lora["value_model"] == lora["reward_model"] == "AdapterScalarHead"
    assert "is a LoRA adapter on sft_model_path: an adapter on the policy's base model" in lora["log"]
    assert beside["sequence_classifiers"] == 1 and beside["reward_model"] == "GPT2ForSequenceClassification"
    assert beside["value_model"] == "AdapterScalarHead" and beside["backbone_parameters"] == 2 * one_copy
    assert "is a whole reward model (no LoRA adapter): loaded whole beside" in beside["log"]
    assert separate["sequence_classifiers"] == 2 and separate["backbone_parameters"] == 3 * one_copy
    assert full["sequence_classifiers"] == 2 and full["backbone_parameters"] == 4 * one_copy


def test_reward_adapter_is_shared_only_when_it_is_on_the_sft_model(lora_run, tiny_run, tmp_path):
    """The check that decides it, from the files: the LoRA chain's reward model is an adapter on its SFT model (the
    stage's folder or the adapter folder itself); not on the full chain's SFT model; a whole reward model is not an
    adapter; and an SFT folder whose weights changed after the reward stage (a copy with one weight moved, in a
    LoRA-adapted matrix or elsewhere) no longer matches the merged reward model beside the adapter."""
    import shutil

    from safetensors.torch import save_file

    from pipeline.models import reward_adapter_on

    outputs, full = lora_run["outputs"], tiny_run["outputs"]
    assert reward_adapter_on(str(outputs / "reward"), str(outputs / "sft")) == (
        str(outputs / "reward" / "adapter"), "a LoRA adapter on sft_model_path")
    assert reward_adapter_on(str(outputs / "reward" / "adapter"), f"{outputs}/../{outputs.name}/sft/")[0] == str(
        outputs / "reward" / "adapter")
    assert reward_adapter_on(str(outputs / "reward"), str(full / "sft")) == (
        None, f"a LoRA adapter on {outputs / 'sft'}, not on sft_model_path")
    assert reward_adapter_on(str(full / "reward"), str(full / "sft")) == (None, "a whole reward model (no LoRA adapter)")
    for key in ("transformer.h.0.attn.c_attn.weight", "transformer.wte.weight"):
        sft, reward = tmp_path / key / "sft", tmp_path / key / "reward"
        shutil.copytree(outputs / "sft", sft)
        shutil.copytree(outputs / "reward", reward)
        config = json.loads((reward / "adapter" / "adapter_config.json").read_text())
        (reward / "adapter" / "adapter_config.json").write_text(json.dumps({**config,
                                                                             "base_model_name_or_path": str(sft)}))
        assert reward_adapter_on(str(reward), str(sft))[0] == str(reward / "adapter")  # the copy still matches
        weights = load_file(sft / "model.safetensors")
        weights[key][0, 0] += 1e-3
        save_file(weights, sft / "model.safetensors", metadata={"format": "pt"})
        adapter, what = reward_adapter_on(str(reward), str(sft))
        assert adapter is None and f"({key} is not the SFT model's plus the adapter's; was sft_model_path" in what


# 5 updates of 16 rollouts, 4 optimizer steps each: checkpoints at steps 5, 10 and 15, each in the middle of an
# update (a kill lands after the 5th or 10th step's: test_resume); activation checkpointing on, so that layers are
# recomputed in the backward pass under the adapter of their forward
ONE_BASE_STEPS = 20
ONE_BASE_FLAGS = ["--total_episodes", "80", "--save_steps", "5", "--logging_steps", "1", "--gradient_checkpointing",
                  "true", "--report_to", "none"]
ONE_BASE_LOGGED = ["objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg"]


def _rows():
    """Two query + response rows of the tiny vocabulary (the second left-padded) and their mask."""
    rows = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [1, 1, 20, 21, 22, 23, 24, 25]])
    mask = torch.ones_like(rows, dtype=torch.bool)
    mask[1, :2] = False
    return rows, mask


@pytest.fixture(scope="module")
def one_base_run(lora_run, tmp_path_factory):
    """The LoRA chain's PPO recipe (its reward model: a LoRA adapter on its SFT model) on one base model, in process,
    recording what the trainer holds before training and, at every optimizer step, the trainable parameters that got
    no gradient (DDP with find_unused_parameters=False needs none)."""
    from transformers import TrainerCallback

    import pipeline.trainers.ppo as ppo
    from pipeline import rollout
    from pipeline.stages import run

    output = tmp_path_factory.mktemp("one-base") / "ppo"
    record = {"no_gradient": []}

    class Gradients(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            record["no_gradient"].append([n for n, p in model.named_parameters() if p.requires_grad and p.grad is None])

    original = ppo.PPOTrainer.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.add_callback(Gradients())
        rows, mask = _rows()
        with torch.no_grad():
            record.update(trainer=self, before={n: p.detach().clone() for n, p in self.model.named_parameters()},
                          requires_grad={n: p.requires_grad for n, p in self.model.named_parameters()},
                          values=rollout.scalar_head(self.model.value_model, rows, mask),
                          rewards=rollout.scalar_head(self.reward_model, rows, mask))

    ppo.PPOTrainer.__init__ = init
    try:
        run("ppo", ["--config", str(lora_run["recipes"] / "ppo-lora.yaml"), "--output_dir", str(output),
                    *ONE_BASE_FLAGS])
    finally:
        ppo.PPOTrainer.__init__ = original
    return {**record, "output": output}


def test_one_base_lora_ppo_trains_both_adapters_and_keeps_reference_and_reward(one_base_run, lora_run):
    """Both trained adapters and the value head get a gradient at every step and move; the reward adapter and the
    base do not, so the reference (every adapter off) is still the SFT model and the reward adapter still scores as
    the merged reward model; the value model started as the reward model; activation checkpointing gives the
    gradients that a plain backward pass gives."""
    from pipeline import padding_free, rollout

    trainer, before = one_base_run["trainer"], one_base_run["before"]
    model = trainer.model
    trainable = {n for n, trains in one_base_run["requires_grad"].items() if trains}
    lora = {n for n in before if "lora_" in n}
    assert trainable == {n for n in lora if ".default." in n or ".ppo_value." in n} | {"value_model.score.weight"}
    assert {n for n in lora if ".ppo_reward." in n}  # the frozen reward adapter, on the same base
    assert len(one_base_run["no_gradient"]) == ONE_BASE_STEPS and not any(one_base_run["no_gradient"])
    after = dict(model.named_parameters())
    assert [n for n in trainable if torch.equal(after[n], before[n])] == []  # all of them trained
    assert [n for n in before if n not in trainable and not torch.equal(after[n], before[n])] == []
    assert {n for n, p in after.items() if p.requires_grad} == trainable  # and still would

    rows, mask = _rows()
    torch.testing.assert_close(one_base_run["values"], one_base_run["rewards"], atol=0, rtol=0)
    sft = AutoModelForCausalLM.from_pretrained(lora_run["outputs"] / "sft").eval()
    reward = AutoModelForSequenceClassification.from_pretrained(lora_run["outputs"] / "reward").eval()
    with torch.no_grad():
        with trainer._reference() as reference:
            torch.testing.assert_close(rollout.forward(reference, rows, mask).logits,
                                       rollout.forward(sft, rows, mask).logits)
        scores = rollout.sequence_scores(trainer.reward_model, rows, mask, 4)
        torch.testing.assert_close(scores, rollout.sequence_scores(reward, rows, mask, 4))
        torch.testing.assert_close(rollout.scalar_head(trainer.reward_model, rows, mask), one_base_run["rewards"])
        assert not torch.allclose(rollout.scalar_head(model.value_model, rows, mask), one_base_run["values"])

    def gradients(checkpointing: bool) -> dict:
        model.zero_grad()
        model.activation_checkpointing_enable() if checkpointing else model.activation_checkpointing_disable()
        logits, values, _ = model(layout=padding_free.layout(rows, mask, "packed"), where=mask)
        (logits.pow(2).mean() + values.pow(2).mean()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model.train()
    recomputed, plain = gradients(True), gradients(False)
    assert all(plain[n].abs().sum() > 0 for n in plain)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], msg=name)


def test_one_base_lora_ppo_resumes_after_sigkill_as_if_uninterrupted(one_base_run, lora_run, tmp_path):
    """Killed after a checkpoint taken in the middle of an update (its rollouts, both adapters, the value head,
    optimizer and RNG states), the same command ends where the uninterrupted run ended: the same logged values at
    every step, the same policy adapter, value adapter and head."""
    import random

    from test_resume import kill_after_a_checkpoint, logged, saved_steps

    interrupted = tmp_path / "ppo"
    command = ["scripts/ppo.py", "--config", str(lora_run["recipes"] / "ppo-lora.yaml"), "--output_dir",
               str(interrupted), *ONE_BASE_FLAGS]
    kill_after_a_checkpoint(command, interrupted, random.Random(os.getpid()))
    saved = saved_steps(interrupted)
    assert saved and saved[-1] % 4 and (interrupted / f"checkpoint-{saved[-1]}" / "rollouts").is_dir()  # mid-update
    resumed = run_python(*command)
    assert f"resuming from {interrupted / f'checkpoint-{saved[-1]}'}" in resumed.stdout + resumed.stderr
    expected, got = logged(one_base_run["output"], ONE_BASE_LOGGED), logged(interrupted, ONE_BASE_LOGGED)
    assert list(got) == list(expected) == list(range(1, ONE_BASE_STEPS + 1))
    for step, values in expected.items():
        for key, value in values.items():
            assert got[step][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, key)
    for adapter in ("adapter", "adapter/value_model"):
        want = load_file(one_base_run["output"] / adapter / "adapter_model.safetensors")
        have = load_file(interrupted / adapter / "adapter_model.safetensors")
        assert set(have) == set(want)
        for key in want:
            torch.testing.assert_close(have[key], want[key], rtol=1e-4, atol=1e-6, msg=key)


def test_one_base_lora_ppo_output_merges_and_loads_in_plain_transformers(one_base_run, lora_run, tmp_path):
    """The output folder as without one base model: the merged policy and value_model/ (the value adapter merged)
    load in plain transformers; adapter/ holds the policy's adapter and adapter/value_model the value adapter with
    its head (a reward model's adapter on the SFT model), which `merge` turns into the same checkpoints, and which
    score as the trained value model did."""
    from pipeline import cli, rollout

    out, trainer = one_base_run["output"], one_base_run["trainer"]
    config = json.loads((out / "adapter" / "value_model" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    assert config["base_model_name_or_path"] == str(lora_run["outputs"] / "sft")
    results = _results(out)
    value_numel = _lora_numel(out / "adapter" / "value_model")
    assert results["policy_trainable_parameters"] == _lora_numel(out / "adapter") == value_numel
    head = trainer.model.value_model.score.weight.numel()
    assert results["trainable_parameters"] == 2 * value_numel + head
    for adapter, stage_folder, loader in ((out / "adapter", out, AutoModelForCausalLM),
                                          (out / "adapter" / "value_model", out / "value_model",
                                           AutoModelForSequenceClassification)):
        cli.main(["merge", str(adapter), str(tmp_path / adapter.name)])
        merged = loader.from_pretrained(tmp_path / adapter.name).state_dict()
        stage = loader.from_pretrained(stage_folder).state_dict()
        assert merged.keys() == stage.keys()
        for key in merged:
            torch.testing.assert_close(merged[key], stage[key], msg=key)
    assert not any("lora_" in key for key in merged)
    rows, mask = _rows()
    value = AutoModelForSequenceClassification.from_pretrained(out / "value_model").eval()
    with torch.no_grad():
        torch.testing.assert_close(rollout.scalar_head(value, rows, mask),
                                   rollout.scalar_head(trainer.model.value_model, rows, mask), atol=1e-5, rtol=1e-4)


def test_one_base_checkpoint_resumed_with_the_other_layout_is_refused(one_base_run, lora_run, tmp_path, capsys):
    """A checkpoint whose value model is an adapter, resumed with share_base_model: false (a whole value model):
    one line, exit 2, before anything is trained (docs/errors.md)."""
    import shutil

    from pipeline.stages import run

    output = tmp_path / "ppo"
    checkpoint = output / f"checkpoint-{ONE_BASE_STEPS}"
    shutil.copytree(one_base_run["output"] / checkpoint.name, checkpoint)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run("ppo", ["--config", str(lora_run["recipes"] / "ppo-lora.yaml"), "--output_dir", str(output),
                    *ONE_BASE_FLAGS, "--share_base_model", "false"])
    assert stopped.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: ppo: {checkpoint} holds the value model as an adapter on the policy's base model "
                           "(LoRA with share_base_model: true), and this run has it whole (share_base_model: false, "
                           "or no LoRA): resume with the settings it was saved with, or start in a new output_dir")
    assert not (output / "results.json").exists() and sorted(p.name for p in checkpoint.parent.iterdir()) == [
        checkpoint.name, "pipeline_stage.json"]


def test_merge_command_writes_a_plain_checkpoint(lora_run, tmp_path, capsys):
    run_python("-m", "pipeline", "merge", lora_run["outputs"] / "reward" / "adapter", tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    stage = AutoModelForSequenceClassification.from_pretrained(lora_run["outputs"] / "reward")
    for (name, a), (_, b) in zip(merged.state_dict().items(), stage.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").pad_token == "<|pad|>"
    wrong = run_python("-m", "pipeline", "merge", lora_run["outputs"] / "reward", tmp_path / "x", check=False)
    assert wrong.returncode == 2 and "is not a LoRA adapter folder" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    # a second merge into the same folder is refused, its files untouched (in-process: the same entry point)
    from pipeline import cli

    before = {p.name: p.read_bytes() for p in (tmp_path / "merged").iterdir() if p.is_file()}
    capsys.readouterr()  # what the loads above printed (progress bars)
    with pytest.raises(SystemExit) as stopped:
        cli.main(["merge", str(lora_run["outputs"] / "sft" / "adapter"), str(tmp_path / "merged")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: '{tmp_path / 'merged'}' already holds files (") and "\n" not in err
    assert "merge writes a new folder; give it one that does not exist or is empty" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "merged").iterdir() if p.is_file()} == before


def test_pretrain_with_lora_keeps_its_base_and_adapter(tiny_run, tmp_path):
    """Pretraining from scratch with LoRA: the new model's random weights are the adapter's base (base/)."""
    out = tmp_path / "pretrain"
    run_python("scripts/pretrain.py", "--config", tiny_run["recipes"] / "pretrain.yaml", "--use_peft", "true",
               "--max_steps", "3", "--output_dir", out, "--report_to", "none")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(out / "base")
    merged, base = AutoModelForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out / "base")
    assert any((a - b).abs().max() > 0 for a, b in zip(merged.state_dict().values(), base.state_dict().values()))
    assert _results(out)["trainable_parameters"] == _lora_numel(out / "adapter")


def test_lora_recipes_parse():
    from pipeline.config import parse

    for folder in ("tiny", "gpt2-hh"):
        for stage in LORA_STAGES:
            # bf16 needs a GPU: switched off from the command line here, as in test_recipes.py
            argv = ["--config", str(ROOT / "recipes" / folder / f"{stage}-lora.yaml")] + (
                ["--bf16", "false"] if folder == "gpt2-hh" else [])
            _, training_args, model_args = parse(stage, argv)
            assert model_args.use_peft and model_args.lora_r > 0 and model_args.lora_target_modules
            assert "lora" in training_args.output_dir
            if stage == "reward":
                assert model_args.lora_task_type == "SEQ_CLS"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine 4-bit loading is allowed")
def test_4bit_loading_on_cpu_fails_in_one_line(tiny_run, tmp_path):
    result = run_python("scripts/sft.py", "--config", tiny_run["recipes"] / "sft.yaml", "--use_peft", "true",
                        "--load_in_4bit", "true", "--output_dir", tmp_path / "sft", check=False)
    assert result.returncode == 2
    assert "4-bit loading needs a CUDA GPU and bitsandbytes" in result.stderr
    assert "Traceback" not in result.stderr


def _bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.skipif(not torch.cuda.is_available() or not _bitsandbytes(), reason="4-bit needs a CUDA GPU and bitsandbytes")
def test_qlora_sft_on_gpu(tiny_run, tmp_path):
    out = tmp_path / "sft"
    run_python("scripts/sft.py", "--config", tiny_run["recipes"] / "sft.yaml", "--use_peft", "true",
               "--load_in_4bit", "true", "--dtype", "bfloat16", "--use_cpu", "false", "--bf16", "true",
               "--output_dir", out, "--report_to", "none")
    assert (out / "adapter" / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)  # the merged export: full precision, no bitsandbytes needed
    assert not getattr(model, "is_loaded_in_4bit", False)
