"""The run report (pipeline/report.py) on hand-made run folders: no training, a few seconds."""

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
from PIL import Image

from pipeline.report import PLOT_FILES, md_cell, write_report

ROOT = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

SAMPLES = [
    {"prompt": "Write a review of The Wild Lantern.", "sft": " It was fine | or not.",
     "ppo": " The Wild Lantern is a charming romance.\nI loved it."},
    {"prompt": "What did you think of The Iron Empire?", "sft": " I saw it last week.", "ppo": " A superb western."},
]
PPO_RESULTS = {
    "gold_score_sft": -1.6625, "gold_score_ppo": 0.4296875, "gold_win_rate_vs_sft": 0.8859375,
    "rm_score_sft": -0.0390453, "rm_score_ppo": 2.4516673, "rm_win_rate_vs_sft": 0.9875,
    "kl_to_sft": 5.1055970, "eos_rate_sft": 1.0, "eos_rate_ppo": 0.96875, "response_length_sft": 16.340625,
    "response_length_ppo": 19.55625, "eval_prompts": 320, "num_processes": 1, "samples": SAMPLES,
}
PPO_RESULTS.update(  # the over-optimisation curve (curve_steps) and the alarms that fired (pipeline.monitor)
    curve=[{"step": 0, "gold_score": -1.66, "rm_score": -0.04, "kl_to_sft": 0.0, "response_length": 16.3},
           {"step": 20, "gold_score": 0.9, "rm_score": 2.1, "kl_to_sft": 3.2, "response_length": 18.0},
           {"step": 40, "gold_score": 0.43, "rm_score": 2.45, "kl_to_sft": 5.1, "response_length": 19.6}],
    gold_score_peak=0.9, gold_score_peak_step=20, alarms=["length_drift"], alarm_steps={"length_drift": 7})
GOLD_KEYS = ("gold_score_sft", "gold_score_ppo", "gold_win_rate_vs_sft", "gold_score_peak", "gold_score_peak_step")


def lm_log(steps=8, start=4.0, eval_every=None):
    log = []
    for step in range(1, steps + 1):
        log.append({"loss": start / step, "step": step * 5, "epoch": step / steps, "mean_token_accuracy": 0.1 * step})
        if eval_every and step % eval_every == 0:
            log.append({"eval_loss": start / step + 0.1, "step": step * 5, "epoch": step / steps})
    log.append({"train_loss": 1.5, "train_runtime": 12.0, "step": steps * 5, "epoch": 1.0})
    return log


def reward_log(steps=8):
    return [{"loss": 0.7 - 0.03 * s, "accuracy": 0.5 + 0.04 * s, "margin": 0.2 * s, "step": s * 25, "epoch": s / steps}
            for s in range(1, steps + 1)] + [{"train_loss": 0.5, "step": steps * 25}]


def ppo_log(updates=6, batch=16):
    return [{"objective/scores": 0.1 * u, "objective/rlhf_reward": 0.1 * u - 0.02 * u, "objective/kl": 0.4 * u,
             "objective/entropy": 30.0 - u, "policy/entropy_avg": 1.9 - 0.05 * u, "loss/value_avg": 1.0 / u,
             "loss/policy_avg": -0.01 * u, "episode": u * batch, "step": u, "epoch": u / updates}
            for u in range(1, updates + 1)]


def write_stage(run_dir: Path, stage: str, log_history: list, results: dict, folder: Path | None = None) -> Path:
    folder = folder or run_dir / stage
    folder.mkdir(parents=True, exist_ok=True)
    steps = [e["step"] for e in log_history if "step" in e]
    state = {"log_history": log_history, "global_step": max(steps, default=0), "epoch": 1.0, "max_steps": 0}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def make_run(run_dir: Path, stages=("pretrain", "sft", "reward", "ppo"), ppo_results=None) -> dict:
    stage_data = {
        "pretrain": (lm_log(eval_every=4), {"eval_loss": 1.11, "eval_perplexity": 3.0400787}),
        "sft": (lm_log(start=1.5), {"eval_loss": 1.25, "eval_perplexity": 3.4914474}),
        "reward": (reward_log(), {"eval_accuracy": 0.8640325, "eval_margin": 1.7369197, "eval_loss": 0.327}),
        "ppo": (ppo_log(), dict(PPO_RESULTS if ppo_results is None else ppo_results)),
    }
    results = {}
    for number, stage in enumerate(stages):
        log, stage_results = stage_data[stage]
        write_stage(run_dir, stage, log, stage_results)
        results[stage] = {**stage_results, "wall_seconds": 10.0 * (number + 1) + 0.5}
    results["wall_seconds_total"] = 123.4
    (run_dir / "results.json").write_text(json.dumps(results))
    return results


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert width > 200 and height > 200
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 0, f"{path.name} is blank"


def test_full_run_writes_every_plot_and_the_summary(tmp_path):
    make_run(tmp_path)
    report = write_report(tmp_path)

    assert report == tmp_path / "report" / "report.md"
    for name in PLOT_FILES:
        assert_png(tmp_path / "report" / name)
    text = report.read_text()
    assert text.startswith("# ")
    for stage, metric, value in [("pretrain", "eval_perplexity", "3.040"), ("sft", "eval_perplexity", "3.491"),
                                 ("reward", "eval_accuracy", "0.864"), ("reward", "eval_margin", "1.737"),
                                 ("ppo", "gold_score_sft", "-1.663"), ("ppo", "gold_score_ppo", "0.430"),
                                 ("ppo", "gold_win_rate_vs_sft", "0.886"), ("ppo", "rm_score_ppo", "2.452"),
                                 ("ppo", "kl_to_sft", "5.106"), ("ppo", "eos_rate_ppo", "0.969"),
                                 ("ppo", "response_length_ppo", "19.556"), ("ppo", "eval_prompts", "320"),
                                 ("pretrain", "wall_seconds", "10.5"), ("ppo", "wall_seconds", "40.5"),
                                 ("total", "wall_seconds_total", "123.4")]:
        assert f"| {stage} | {metric} | {value} |" in text, (stage, metric, value)
    assert "samples |" not in text  # the samples are a table of their own, not a metric row
    assert "- ppo: length_drift (step 7); gold peaked at 0.900 (step 20) and ended at 0.430" in text
    for name in PLOT_FILES:
        assert f"]({name})" in text
    # the samples table: one row per sample, `|` escaped, newlines kept inside the cell
    assert "| prompt | SFT answer | PPO answer |" in text
    assert ("| Write a review of The Wild Lantern. | It was fine \\| or not. | "
            "The Wild Lantern is a charming romance.<br>I loved it. |") in text
    assert "| What did you think of The Iron Empire? | I saw it last week. | A superb western. |" in text
    for line in text.splitlines():
        if line.startswith("| Write a review"):
            assert line.replace("\\|", "").count("|") == 4  # exactly three cells


def test_missing_stages_and_keys_are_skipped(tmp_path):
    no_gold = {k: v for k, v in PPO_RESULTS.items() if k not in GOLD_KEYS}
    make_run(tmp_path, stages=("sft", "reward", "ppo"), ppo_results=no_gold)
    # a stage's log may miss keys too: no margin logged, a NaN, an entry with no step
    (tmp_path / "reward" / "trainer_state.json").write_text(json.dumps({"log_history": [
        {"loss": 0.7, "accuracy": 0.55, "step": 25}, {"loss": float("nan"), "accuracy": 0.6, "step": 50},
        {"loss": 0.6}, {"train_loss": 0.65, "step": 50}]}))
    report = write_report(tmp_path)

    for name in PLOT_FILES:
        assert_png(tmp_path / "report" / name)  # lm_loss from SFT alone, gold_scores from the reward model alone
    text = report.read_text()
    assert "| sft | eval_perplexity | 3.491 |" in text
    assert "| pretrain |" not in text
    assert "| ppo | gold_" not in text
    assert "| ppo | rm_win_rate_vs_sft | 0.988 |" in text


def test_only_ppo_without_a_log(tmp_path):
    """A results file with PPO metrics but no trainer_state.json anywhere: the bars and the table only."""
    (tmp_path / "results.json").write_text(json.dumps({"ppo": {"rm_score_sft": 0.1, "rm_score_ppo": 0.7}}))
    report = write_report(tmp_path)
    written = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert written == ["gold_scores.png"]
    assert_png(tmp_path / "report" / "gold_scores.png")
    text = report.read_text()
    assert "| ppo | rm_score_ppo | 0.700 |" in text
    assert "](ppo_training.png)" not in text and "## Samples" not in text


def test_empty_run_folder(tmp_path):
    report = write_report(tmp_path)
    assert report.exists() and "No results found." in report.read_text()
    assert not list((tmp_path / "report").glob("*.png"))


def test_broken_and_odd_inputs_do_not_crash(tmp_path):
    (tmp_path / "results.json").write_text("{not json")
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "trainer_state.json").write_text("[1, 2]")
    (tmp_path / "ppo").mkdir()
    (tmp_path / "ppo" / "results.json").write_text(json.dumps(
        {"rm_score_sft": "n/a", "kl_to_sft": None, "samples": [{"prompt": "p"}, "junk"]}))
    (tmp_path / "ppo" / "trainer_state.json").write_text(json.dumps({"log_history": [{"objective/kl": 1.0}, 7]}))
    text = write_report(tmp_path).read_text()
    assert "| p |  |  |" in text  # a sample missing its answers still gets a row


def test_stage_folders_elsewhere_and_checkpoint_fallback(tmp_path):
    run_dir, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    make_run(run_dir, stages=("sft", "reward", "ppo"))
    (run_dir / "reward").rename(elsewhere)
    # a stage folder from an older run: its log only in the newest checkpoint
    state = (run_dir / "sft" / "trainer_state.json").read_text()
    for step in (9, 40):
        (run_dir / "sft" / f"checkpoint-{step}").mkdir()
        (run_dir / "sft" / f"checkpoint-{step}" / "trainer_state.json").write_text(
            state if step == 40 else json.dumps({"log_history": []}))
    (run_dir / "sft" / "trainer_state.json").unlink()

    write_report(run_dir, {"reward": elsewhere})
    for name in PLOT_FILES:
        assert_png(run_dir / "report" / name)


def test_rerun_removes_stale_plots(tmp_path):
    make_run(tmp_path)
    write_report(tmp_path)
    for stage in ("pretrain", "sft"):
        (tmp_path / stage / "trainer_state.json").unlink()
    results = json.loads((tmp_path / "results.json").read_text())
    del results["pretrain"], results["sft"]
    (tmp_path / "results.json").write_text(json.dumps(results))
    text = write_report(tmp_path).read_text()
    assert not (tmp_path / "report" / "lm_loss.png").exists()
    assert "lm_loss.png" not in text


@pytest.mark.parametrize("raw, cell", [
    ("a | b", "a \\| b"), ("line one\nline two", "line one<br>line two"), ("  padded \r\n", "padded"),
    ("back\\slash|", "back\\\\slash\\|"), (3.5, "3.5"),
])
def test_md_cell(raw, cell):
    assert md_cell(raw) == cell


def test_command_line(tmp_path):
    make_run(tmp_path, stages=("reward",))
    result = subprocess.run([sys.executable, "-m", "pipeline.report", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "report" / "report.md")
    assert_png(tmp_path / "report" / "reward_model.png")
    missing = subprocess.run([sys.executable, "-m", "pipeline.report", str(tmp_path / "nope")], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_the_oracle_ceiling_and_its_gap_to_ppo(tmp_path):
    """With the ceiling run (PPO on the oracle) beside PPO, the report gives both gold scores, the gap, and the
    ceiling's column in the table of the gold terms; without it, neither appears."""
    terms = {f"gold_{t}{s}": v for s in ("_sft", "_ppo") for t, v in
             (("sentiment", 0.5), ("asked_title", 0.4), ("other_titles", -0.1), ("repeated_sentences", 0.0),
              ("unfinished", 0.0), ("empty", 0.0))}
    results = make_run(tmp_path, ppo_results={**PPO_RESULTS, **terms, "title_only_rate_ppo": 0.7})
    results["ppo-oracle"] = {**PPO_RESULTS, **terms, "gold_score_ppo": 3.25, "kl_to_sft": 7.5, "wall_seconds": 5.0}
    (tmp_path / "results.json").write_text(json.dumps(results))
    text = write_report(tmp_path).read_text()
    assert "reaches a gold score of 3.250; through the learned reward model PPO reaches 0.430, a gap of 2.820" in text
    assert "| term | SFT | PPO | PPO, oracle reward |" in text
    assert "| ppo-oracle | gold_score_ppo | 3.250 |" in text
    results["ppo-oracle"]["gold_score_ppo"] = 0.4  # below the learned reward model's PPO: no "gap" then
    (tmp_path / "results.json").write_text(json.dumps(results))
    text = write_report(tmp_path).read_text()
    assert ("reaches a gold score of 0.400; through the learned reward model PPO reaches 0.430, 0.030 above it: "
            "on this budget the learned reward model cost nothing measurable") in text
    assert "a gap of" not in text
    results["ppo-oracle"]["gold_score_ppo"] = 0.4298  # 0.430 as printed
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert "PPO reaches 0.430, the same score: on this budget" in write_report(tmp_path).read_text()
    del results["ppo-oracle"]
    (tmp_path / "results.json").write_text(json.dumps(results))
    text = write_report(tmp_path).read_text()
    assert "## The ceiling" not in text and "oracle reward" not in text


def test_in_context_learning_is_judged_against_the_majority_class(tmp_path):
    """The few-shot table says 'above the majority' only for a k more than two standard errors above it (400
    examples at a majority of 0.55: the bar is 0.55 + 2 x 0.0249 = 0.5997), and orders policies as the stages run."""
    results = make_run(tmp_path)
    results["eval"] = {"few_shot_sentiment": {
        "ppo": {"0_shot": 0.55, "1_shot": 0.59, "4_shot": 0.61, "chance": 0.5, "majority": 0.55, "examples": 400},
        "pretrain": {"0_shot": 0.55, "1_shot": 0.56, "4_shot": 0.5, "chance": 0.5, "majority": 0.55, "examples": 400},
        "sft": {"0_shot": 0.7, "chance": 0.5},  # an older eval.json without the majority: left out
    }}
    (tmp_path / "results.json").write_text(json.dumps(results))
    text = write_report(tmp_path).read_text()
    table = text[text.index("## In-context learning"):]
    assert "| policy | 0-shot | 1-shot | 4-shot | majority | above the majority? |" in table
    assert table.index("| pretrain |") < table.index("| ppo |")
    assert "| pretrain | 0.550 | 0.560 | 0.500 | 0.550 | no |" in table
    assert "| ppo | 0.550 | 0.590 | 0.610 | 0.550 | yes: 4-shot |" in table
    assert "| sft |" not in table
    del results["eval"]
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert "## In-context learning" not in write_report(tmp_path).read_text()
