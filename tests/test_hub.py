"""Publishing to the Hub: the real huggingface_hub client against a local fake Hub (tests/fake_hub.py).

What arrives (and byte-equal to the local files), the model card's metadata, the resolved recipe, that the
token is written nowhere, and that a failed push (401, 500, server down) prints one line, exits 3 and leaves
the output folder untouched.
"""

import hashlib
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from transformers import AutoModelForSequenceClassification

from conftest import run_python
from fake_hub import FakeHub
from pipeline import hub
from pipeline.config import parse

TOKEN = "secret-token-123"
ENV_TOKEN = "env-token-456"


@pytest.fixture
def fake_hub():
    with FakeHub() as server:
        yield server
    assert not server.running


@pytest.fixture
def hub_env(fake_hub, monkeypatch, tmp_path):
    """In-process pushes go to the fake Hub, with a token in HF_TOKEN and nothing else on this machine."""
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.endpoint)
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("PIPELINE_DEBUG", raising=False)
    return fake_hub


def stage_env(fake_hub, tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "PIPELINE_DEBUG")}
    return {**env, "HF_ENDPOINT": fake_hub.endpoint, "HF_HOME": str(tmp_path / "hf_home"),
            "NO_PROXY": "127.0.0.1,localhost", "HF_HUB_DISABLE_TELEMETRY": "1"}


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def pushable(folder: Path) -> dict[str, bytes]:
    """What must arrive: every file except checkpoint-*/, runs/, training_args.bin, the stage file and the run's
    lock file."""
    return {path: content for path, content in local_files(folder).items()
            if not path.startswith(("checkpoint-", "runs/"))
            and not path.endswith(("training_args.bin", "pipeline_stage.json", ".pipeline.lock"))}


def metadata(readme: bytes | Path) -> dict:
    text = readme.read_text() if isinstance(readme, Path) else readme.decode()
    return ModelCard(text).data.to_dict()


def model_index_metrics(meta: dict) -> dict:
    return {m["type"]: m["value"] for result in meta["model-index"][0]["results"] for m in result["metrics"]}


def published_copy(source: Path, dest: Path, repo_id: str) -> Path:
    """A copy of a stage output whose recipe.yaml says it was pushed to `repo_id` (as a chain that pushes
    every stage leaves it), without its checkpoints."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("checkpoint-*"))
    recipe = yaml.safe_load((dest / "recipe.yaml").read_text())
    recipe.update(push_to_hub=True, hub_model_id=repo_id)
    (dest / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return dest


# --------------------------------------------------------------------------- a stage run with push_to_hub

def test_sft_stage_pushes_its_output_folder(tiny_run, fake_hub, tmp_path):
    base = published_copy(tiny_run["outputs"] / "pretrain", tmp_path / "pretrain", "user/tiny-pretrain")
    out = tmp_path / "sft"
    result = run_python("scripts/sft.py", "--config", tiny_run["recipes"] / "sft.yaml", "--max_steps", 2,
                        "--save_steps", 2, "--output_dir", out, "--model_name_or_path", base,
                        "--push_to_hub", "true", "--hub_model_id", "user/tiny-sft", "--hub_token", TOKEN,
                        env=stage_env(fake_hub, tmp_path), timeout=600)
    assert f"pushed {out} to user/tiny-sft" in result.stdout

    # what arrived: the whole folder but checkpoints and training_args.bin, byte for byte
    arrived = fake_hub.files("user/tiny-sft")
    assert (out / "checkpoint-2").is_dir() and (out / "training_args.bin").exists()
    assert arrived == pushable(out)
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja", "README.md", "recipe.yaml", "results.json",
                 "trainer_state.json"):
        assert name in arrived, name
    assert not any(p.startswith("checkpoint-") or p.endswith("training_args.bin") for p in arrived)
    assert fake_hub.unknown_requests() == []
    assert fake_hub.tokens() == {TOKEN}  # the recipe's hub_token was used for every request

    # the token is nowhere: not in what was uploaded, not in any local file, not in the logs
    secret = TOKEN.encode()
    assert not [p for p, content in arrived.items() if secret in content]
    assert not [p for p, content in local_files(out).items() if secret in content]
    assert TOKEN not in result.stdout and TOKEN not in result.stderr

    # the card: model-index with the stage's results, base_model (the pushed pretrain repo), tags
    meta = metadata(arrived["README.md"])
    results = yaml.safe_load(arrived["results.json"])
    metrics = model_index_metrics(meta)
    assert metrics["eval_loss"] == pytest.approx(results["eval_loss"])
    assert metrics["eval_perplexity"] == pytest.approx(results["eval_perplexity"])
    assert metrics["train_loss"] == pytest.approx(results["train_loss"])
    assert "eval_runtime" not in metrics and "num_processes" not in metrics
    assert meta["model-index"][0]["name"] == "tiny-sft"
    assert meta["base_model"] == "user/tiny-pretrain"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"sft", "trl", "pipeline"} <= set(meta["tags"])
    assert "datasets" not in meta  # embedded:sft is generated by the project, not a Hub dataset
    body = arrived["README.md"].decode()
    assert "generated by the project" in body and "embedded:sft" in body
    assert "| learning_rate |" in body and "| max_length | 64 |" in body and "| seed | 42 |" in body
    assert 'AutoModelForCausalLM.from_pretrained("user/tiny-sft")' in body

    # the resolved recipe: every field, no token, and it parses back to the same run
    recipe = yaml.safe_load(arrived["recipe.yaml"])
    assert "hub_token" not in recipe
    assert recipe["push_to_hub"] is True and recipe["hub_model_id"] == "user/tiny-sft"
    assert recipe["max_steps"] == 2 and recipe["output_dir"] == str(out)
    reparsed = parse("sft", ["--config", str(out / "recipe.yaml")])
    assert hub.resolved_recipe(*reparsed) == recipe


@pytest.mark.parametrize("stage", ["grpo", "dpo"])
def test_stage3_stage_pushes_its_folder_with_its_card(tiny_run, fake_hub, tmp_path, stage):
    out = tmp_path / stage
    result = run_python(f"scripts/{stage}.py", "--config", tiny_run["recipes"] / f"{stage}.yaml", "--max_steps", 2,
                        "--output_dir", out, "--push_to_hub", "true", "--hub_model_id", f"user/tiny-{stage}",
                        "--hub_token", TOKEN, env=stage_env(fake_hub, tmp_path), timeout=600)
    assert f"pushed {out} to user/tiny-{stage}" in result.stdout
    arrived = fake_hub.files(f"user/tiny-{stage}")
    assert arrived == pushable(out)
    meta = metadata(arrived["README.md"])
    results = yaml.safe_load(arrived["results.json"])
    metrics = model_index_metrics(meta)
    for key in ("gold_win_rate_vs_sft", f"gold_score_{stage}", f"rm_score_{stage}", "kl_to_sft",
                f"gold_asked_title_{stage}"):
        assert metrics[key] == pytest.approx(results[key]), key
    assert {stage, "trl", "pipeline"} <= set(meta["tags"])
    assert 'AutoModelForCausalLM.from_pretrained("' + f"user/tiny-{stage}" + '")' in arrived["README.md"].decode()
    assert fake_hub.unknown_requests() == [] and TOKEN not in result.stdout + result.stderr


def test_failed_push_exits_3_with_one_line_and_keeps_the_results(tiny_run, fake_hub, tmp_path):
    fake_hub.fail_with = 401
    out = tmp_path / "sft"
    result = run_python("scripts/sft.py", "--config", tiny_run["recipes"] / "sft.yaml", "--max_steps", 1,
                        "--output_dir", out, "--push_to_hub", "true", "--hub_model_id", "user/tiny-sft",
                        "--hub_token", TOKEN, env=stage_env(fake_hub, tmp_path), check=False, timeout=600)
    assert result.returncode == hub.PUSH_FAILED, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: push of {out} to user/tiny-sft failed (401 Unauthorized: Invalid credentials in "
                      "Authorization header); the checkpoint is intact, check the token (HF_TOKEN or `hf auth "
                      f"login`) and retry with: python -m pipeline push {out} --repo_id user/tiny-sft"]
    assert "Traceback" not in result.stderr
    assert TOKEN not in result.stdout + result.stderr
    for name in ("model.safetensors", "results.json", "README.md", "recipe.yaml", "tokenizer.json"):
        assert (out / name).exists(), name
    assert not [p for p, content in local_files(out).items() if TOKEN.encode() in content]
    assert fake_hub.files("user/tiny-sft") == {}


# --------------------------------------------------------------------------- pushing a folder

def test_push_folder_sends_ppo_with_its_value_model(tiny_run, fake_hub, tmp_path):
    folder = tmp_path / "ppo"
    shutil.copytree(tiny_run["outputs"] / "ppo", folder)
    (folder / "checkpoint-4").mkdir(exist_ok=True)  # the tiny PPO recipe saves checkpoints itself
    (folder / "checkpoint-4" / "model.safetensors").write_bytes(b"old weights")
    (folder / "runs" / "Jan01").mkdir(parents=True)
    (folder / "runs" / "Jan01" / "events.out.tfevents").write_bytes(b"tensorboard")
    assert (folder / "training_args.bin").exists()
    before = digest(folder)

    url = hub.push_folder(str(folder), "user/tiny-ppo", token=TOKEN, endpoint=fake_hub.endpoint)
    assert url.startswith(f"{fake_hub.endpoint}/user/tiny-ppo/commit/")
    arrived = fake_hub.files("user/tiny-ppo")
    assert arrived == pushable(folder)
    assert {"value_model/config.json", "value_model/model.safetensors", "model.safetensors", "README.md",
            "recipe.yaml", "tokenizer.json"} <= set(arrived)
    assert not any(p.startswith(("checkpoint-", "runs/")) or p.endswith(("training_args.bin", "pipeline_stage.json"))
                   for p in arrived)
    assert digest(folder) == before
    assert len(fake_hub.commits) == 1 and fake_hub.unknown_requests() == []

    meta = metadata(arrived["README.md"])
    results = yaml.safe_load(arrived["results.json"])
    metrics = model_index_metrics(meta)
    for key in ("gold_win_rate_vs_sft", "gold_score_ppo", "rm_score_ppo", "kl_to_sft"):
        assert metrics[key] == pytest.approx(results[key]), key
    assert "samples" not in metrics and "eval_prompts" not in metrics
    assert {"ppo", "rlhf"} <= set(meta["tags"])
    body = arrived["README.md"].decode()
    assert 'subfolder="value_model"' in body and "| kl_coef |" in body and "| response_length | 16 |" in body
    # the value model loads the way the card says
    value_model = AutoModelForSequenceClassification.from_pretrained(folder, subfolder="value_model")
    assert value_model.config.num_labels == 1


def test_cards_of_pretrain_and_reward(tiny_run):
    pretrain = metadata(tiny_run["outputs"] / "pretrain" / "README.md")
    assert "base_model" not in pretrain  # trained from scratch
    assert "eval_perplexity" in model_index_metrics(pretrain)
    reward_card = (tiny_run["outputs"] / "reward" / "README.md").read_text()
    reward = metadata(tiny_run["outputs"] / "reward" / "README.md")
    assert reward["pipeline_tag"] == "text-classification"
    assert "eval_accuracy" in model_index_metrics(reward)
    assert "AutoModelForSequenceClassification" in reward_card
    assert "base_model" not in reward  # its base is a local SFT folder that was not pushed
    assert f"the local checkpoint `{tiny_run['outputs'] / 'sft'}` (not on the Hub)" in reward_card
    for stage in ("pretrain", "sft", "reward", "ppo"):
        recipe = yaml.safe_load((tiny_run["outputs"] / stage / "recipe.yaml").read_text())
        assert "hub_token" not in recipe and recipe["push_to_hub"] is False


def test_the_cards_loading_code_runs(tiny_run):
    for stage in ("reward", "ppo"):  # a policy with its value model, and a reward model
        card = (tiny_run["outputs"] / stage / "README.md").read_text()
        code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
        assert f'from_pretrained("{tiny_run["outputs"] / stage}"' in code  # not pushed: the local folder
        namespace = {}
        exec(code, namespace)
        if stage == "reward":
            assert isinstance(namespace["reward"], float)
        else:
            assert namespace["value_model"].config.num_labels == 1 and namespace["output"].shape[0] == 1


def test_push_command_uses_hf_token_revision_and_private(tiny_run, hub_env, tmp_path, capsys):
    folder = tmp_path / "reward"
    shutil.copytree(tiny_run["outputs"] / "reward", folder)
    assert hub.push_command(str(folder), "user/tiny-rm", revision="dev", private=True) == 0
    assert hub.push_command(str(folder), "user/tiny-rm", revision="dev", private=True) == 0  # the repo exists now
    out, err = capsys.readouterr()
    assert out.count(f"pushed {folder} to user/tiny-rm") == 2 and err == ""
    assert hub_env.files("user/tiny-rm", "dev") == pushable(folder)
    assert hub_env.files("user/tiny-rm", "main") == {}
    assert hub_env.repos["user/tiny-rm"]["private"] is True
    assert hub_env.tokens() == {ENV_TOKEN}
    assert ENV_TOKEN not in out + err


@pytest.mark.parametrize("failure", ["401", "500", "down", "500 at commit"])
def test_failed_push_prints_one_line_and_leaves_the_folder_unchanged(tiny_run, hub_env, tmp_path, capsys, failure):
    folder = tmp_path / "sft"
    shutil.copytree(tiny_run["outputs"] / "sft", folder)
    before = digest(folder)
    if failure == "down":
        hub_env.stop()
    else:
        hub_env.fail_with = int(failure.split()[0])
        hub_env.fail_on = "commit" if "commit" in failure else None

    code = hub.push_command(str(folder), "user/tiny-sft", revision="v1")
    out, err = capsys.readouterr()
    assert code == hub.PUSH_FAILED == 3
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"error: push of {folder} to user/tiny-sft failed (")
    assert line.endswith(f"retry with: python -m pipeline push {folder} --repo_id user/tiny-sft --revision v1")
    expected_cause = {"401": "401 Unauthorized", "500": "500 Internal Server Error",
                      "down": f"cannot reach {hub_env.endpoint}", "500 at commit": "500 Internal Server Error"}
    assert f"({expected_cause[failure]}" in line
    assert "the checkpoint is intact" in line
    assert ENV_TOKEN not in out + err
    assert digest(folder) == before
    assert hub_env.files("user/tiny-sft", "v1") == {}


def test_push_command_on_a_missing_folder(tmp_path, capsys):
    assert hub.push_command(str(tmp_path / "nope"), "user/x") == 2
    assert "is not a folder" in capsys.readouterr().err


# --------------------------------------------------------------------------- the pieces

def test_take_push_request_clears_the_trainer_push_and_the_token():
    _, training_args, _ = parse("sft", ["--config", "recipes/tiny/sft.yaml", "--push_to_hub", "true",
                                        "--hub_model_id", "user/x", "--hub_token", TOKEN, "--hub_revision", "r1",
                                        "--hub_private_repo", "true"])
    request = hub.take_push_request(training_args)
    assert (request.repo_id, request.token, request.private, request.revision) == ("user/x", TOKEN, True, "r1")
    assert training_args.push_to_hub is False and training_args.hub_token is None
    assert TOKEN not in repr(request)
    _, plain, _ = parse("sft", ["--config", "recipes/tiny/sft.yaml", "--hub_token", TOKEN])
    assert hub.take_push_request(plain) is None and plain.hub_token is None
    _, bad, _ = parse("sft", ["--config", "recipes/tiny/sft.yaml", "--push_to_hub", "true", "--hub_model_id", "a/b/c"])
    with pytest.raises(ValueError):
        hub.take_push_request(bad)  # fails before training, not after


@pytest.mark.parametrize("stage", ["pretrain", "reward", "ppo"])
def test_resolved_recipe_round_trips(stage, tmp_path):
    parsed = parse(stage, ["--config", f"recipes/tiny/{stage}.yaml", "--hub_token", TOKEN])
    recipe = hub.resolved_recipe(*parsed, secrets=(TOKEN,))
    assert "hub_token" not in recipe and TOKEN not in yaml.safe_dump(recipe)
    assert recipe.get("stop_token", "eos") == "eos"  # a setting named *_token is kept
    path = hub.write_recipe(str(tmp_path), recipe, stage)
    assert hub.resolved_recipe(*parse(stage, ["--config", path])) == recipe


def test_files_to_push_skips_checkpoints_runs_and_training_args(tmp_path):
    for path in ("config.json", "value_model/config.json", "checkpoint-10/config.json", "runs/x/events",
                 "training_args.bin", "README.md"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x")
    assert hub.files_to_push(str(tmp_path)) == ["README.md", "config.json", "value_model/config.json"]
