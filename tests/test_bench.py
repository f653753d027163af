"""`make bench` in its smoke mode (`bench/run.py --quick`): every configuration runs, ours and bare TRL train the
same thing, and Markdown and JSON like bench/results/stages.* are written with the expected rows. The figures of
a quick run mean nothing; the real benchmark is `make bench`, not a test. (PPO is not in bench/run.py: TRL 1.16 has no
PPOTrainer; bench/ppo_vs_trl112.py compares ours with TRL 1.12's in its own environment.)"""

import json

from conftest import run_python


def test_quick_bench_writes_the_table_and_json(tmp_path):
    md, js = tmp_path / "stages.md", tmp_path / "stages.json"
    run_python("bench/run.py", "--quick", "--fresh-models", "--md", md, "--json", js, timeout=600)
    summary = json.loads(js.read_text())
    text = md.read_text()
    assert summary["mode"] == "quick"

    names = {section: [row["name"] for row in data["rows"]] for section, data in summary["sections"].items()}
    assert names["sft"][:2] == ["ours", "bare TRL"]
    assert [n for n in names["sft"] if "packing bfd" in n] and [n for n in names["sft"] if "wrapped" in n]
    assert names["sft-varlen"][0] == "ours" and [n for n in names["sft-varlen"] if "packing bfd flat" in n]
    assert names["reward"] == ["ours", "bare TRL"]
    assert set(names) == {"sft", "sft-varlen", "reward"}
    for section, rows in names.items():
        for name in rows:
            assert f"| {name} |" in text
        if "bare TRL" not in rows:  # sft-varlen: packing layouts against the recipe, no bare script
            continue
        comparison = summary["sections"][section]["ours_vs_bare"]
        assert comparison["same_work"], section  # same tokens / pairs / episodes and the same loss or score
        assert comparison["config_differences"] == [], section  # the same TRL config

    sft = {row["name"]: row for row in summary["sections"]["sft"]["rows"]}
    assert sft["ours"]["tokens_per_s"]["median"] > 0 and sft["ours"]["peak_rss_mb"]["median"] > 100
    assert sft["ours"]["heldout_loss"] == sft["bare TRL"]["heldout_loss"]  # the same training, the same model

    check = summary["padding_free_check"]["sdpa"]  # both packed layouts equal padded; without the block mask not
    assert check["max_abs_diff_padding_free"] < 1e-4 < check["max_abs_diff_without_block_mask"]
    assert check["max_abs_diff_rows"] < 1e-4
    varlen = {row["name"]: row for row in summary["sections"]["sft-varlen"]["rows"]}
    # the packed rows and the flattened batch train on the same tokens, and count them alike
    assert len({row["tokens"]["median"] for name, row in varlen.items() if "bfd" in name}) == 1

    rerun = {row["name"]: row for row in summary["rerun"]["rows"]}
    assert set(rerun) == {"ours", "bare TRL"} and "## Data preparation: a first run and its rerun" in text
    # with the cache on, a rerun loads the checked and tokenized data instead of preparing it again
    assert rerun["ours"]["rerun_setup_s"]["median"] < rerun["ours"]["first_setup_s"]["median"]

    targets = [t["target"] for t in summary["targets"]]
    assert len(targets) == 7 and not any("ppo" in t for t in targets)
    assert [t for t in targets if "variable-length data" in t]
    for heading in ("## Machine and software", "## Targets", "## SFT", "## Reward model",
                    "## PPO: against TRL 1.12, in ppo.md", "## GPU rows: not measured"):
        assert heading in text


def test_startup_bench_writes_its_table(tmp_path):
    """bench/startup.py in one run: the table names every command with its figures (which it does not judge here:
    the measurement is `make bench`'s)."""
    md, js = tmp_path / "startup.md", tmp_path / "startup.json"
    run_python("bench/startup.py", "--quick", "--md", md, "--json", js, timeout=300)
    table = md.read_text()
    for command in ("python -m pipeline --help", "python -m pipeline ls"):
        assert f"| `{command}` |" in table
    assert all(len(values) == 1 for values in json.loads(js.read_text())["seconds"].values())


def test_lm_head_bench_trains_the_same_loss_both_ways(tmp_path):
    """bench/lm_head.py in its smoke mode: both settings train, the table has a row each, and the two losses agree
    to rounding (the whole logits compute TRL's loss; only the speed is the benchmark's to measure)."""
    md, js = tmp_path / "lm_head.md", tmp_path / "lm_head.json"
    run_python("bench/lm_head.py", "--quick", "--md", md, "--json", js, timeout=300)
    results = json.loads(js.read_text())["results"]
    assert set(results) == {"tiled", "auto"}
    tiled, whole = results["tiled"][0], results["auto"][0]
    assert tiled["steps_per_s"] > 0 and whole["steps_per_s"] > 0
    assert abs(tiled["train_loss"] - whole["train_loss"]) < 1e-3 * tiled["train_loss"]
    assert abs(tiled["eval_loss"] - whole["eval_loss"]) < 1e-3 * tiled["eval_loss"]
    table = md.read_text()
    assert "| `tiled` |" in table and "| `auto` |" in table


def test_jobs_bench_runs_both_settings_on_the_same_work(tiny_run, tmp_path):
    """bench/jobs.py in its smoke mode, from the tiny run's SFT policy and reward model: ppo and ppo-oracle one after
    the other and side by side, a row each, the same gold scores to rounding (only the wall time is the
    benchmark's to measure); a run folder without the models is named."""
    md, js = tmp_path / "jobs.md", tmp_path / "jobs.json"
    run_python("bench/jobs.py", "--quick", "--run", tiny_run["outputs"], "--md", md, "--json", js, timeout=600)
    results = json.loads(js.read_text())["results"]
    assert set(results) == {"1", "2"}
    one, two = results["1"][0], results["2"][0]
    assert one["wall_seconds_total"] > 0 and two["wall_seconds_total"] > 0
    for stage in ("ppo", "ppo-oracle"):
        assert abs(one[f"{stage}_gold_score"] - two[f"{stage}_gold_score"]) < 0.05, stage
    table = md.read_text()
    assert "| 1 |" in table and "| 2 |" in table
    missing = run_python("bench/jobs.py", "--run", tmp_path / "nothing", check=False)
    assert missing.returncode != 0 and "has no sft or reward model" in missing.stderr


def test_gpu_bench_smoke_runs_every_row_on_the_cpu(tmp_path):
    """`make bench-gpu` (bench/gpu.py) at tiny sizes on the CPU, so that it does not rot while no GPU is lent: every
    row runs, padded PPO computes padding and padding-free PPO far less of it, and the table says it is a smoke run."""
    md, js = tmp_path / "gpu.md", tmp_path / "gpu.json"
    run_python("bench/gpu.py", "--smoke", "--md", md, "--json", js, timeout=600)
    summary = json.loads(js.read_text())
    rows = {row["row"]: row for row in summary["rows"]}
    assert set(rows) == {"sft", "ppo-padded", "ppo", "ppo-lora"}  # no flash-attn on the CPU
    assert rows["sft"]["tokens_per_s"] > 0 and rows["sft"]["mfu"] is None  # no peak FLOPs for a CPU
    assert rows["ppo-padded"]["padding_free"] == "padded" and rows["ppo"]["padding_free"] == "packed"
    assert rows["ppo"]["padding_fraction"] < 0.5 * rows["ppo-padded"]["padding_fraction"]
    assert all(row["sequences_per_s"] > 0 for name, row in rows.items() if name != "sft")
    assert "its figures mean nothing" in md.read_text() and "| `ppo-lora` |" in md.read_text()


def test_group_bench_runs_trls_log_probs_and_ours_and_writes_its_table(tiny_run, tmp_path):
    """bench/group.py in its smoke mode, from the tiny run's models: both settings train GRPO, and ours computes
    less padding than TRL's padded rows."""
    md, js = tmp_path / "group.md", tmp_path / "group.json"
    run_python("bench/group.py", "--quick", "--steps", "2", "--eval-prompts", "2", "--models", tiny_run["outputs"],
               "--md", md, "--json", js, timeout=300)
    rows = json.loads(js.read_text())["tiny"]["stages"]["grpo"]["rows"]
    assert rows["ours"]["padding_fraction"]["median"] < rows["trl"]["padding_fraction"]["median"]
    assert all(rows[s]["train_s"]["median"] > 0 and rows[s]["log_probs_grad_s"]["median"] > 0 for s in rows)
    assert "| train() s |" in md.read_text() and "## GRPO" in md.read_text()


def test_reward_long_bench_trains_the_same_pairs_padded_and_padding_free(tmp_path):
    """bench/reward_long.py in its smoke mode: both settings train the reward stage on the same pairs (the same real
    tokens), padding-free computes far less padding, and the table is written."""
    md, js = tmp_path / "reward_long.md", tmp_path / "reward_long.json"
    run_python("bench/reward_long.py", "--quick", "--md", md, "--json", js, timeout=300)
    runs = {run["setting"]: run for run in json.loads(js.read_text())["runs"]}
    assert runs["off"]["tokens"]["real"] == runs["auto"]["tokens"]["real"] > 0
    assert runs["auto"]["padding_fraction"] < 0.5 * runs["off"]["padding_fraction"]
    assert all(run["train_s"] > 0 for run in runs.values())
    assert "| train() s |" in md.read_text() and "padding-free is **" in md.read_text()
