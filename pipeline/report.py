"""The run report: PNG plots of every stage's training curves and one Markdown summary page.

After `python -m pipeline run`, the run folder holds one folder per stage (`pretrain/`, `sft/`, `reward/`,
`ppo/`), each with `trainer_state.json` (its `log_history`: the metrics logged per step) and `results.json`,
and the run's `results.json` (stage -> final metrics + `wall_seconds`, and `wall_seconds_total`).
`write_report(run_dir)` turns them into `run_dir/report/`:

  lm_loss.png        pretrain and SFT training loss per step (+ held-out loss)
  reward_model.png   reward-model loss, accuracy and margin per step (+ held-out accuracy and margin)
  ppo_training.png   PPO per update: reward-model score, KL to the reference, entropy, value loss
  gold_scores.png    SFT vs PPO policy: gold (oracle) and reward-model scores, win rates, KL
  report.md          the results table, the plots, the gold score in its parts, SFT-vs-stage-3 samples

Whatever is missing (a stage, a metric, a log) is left out; a plot with nothing to show is not written.

    python -m pipeline.report RUN_DIR [--stage_dir STAGE=DIR ...] [--results FILE]
"""

import argparse
import json
import math
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from .names import CEILING, STAGE3, STAGES  # noqa: E402
GOLD_TERMS = ("sentiment", "asked_title", "other_titles", "repeated_sentences", "unfinished", "rambling", "empty")
PLOT_FILES = ("lm_loss.png", "reward_model.png", "ppo_training.png", "gold_scores.png", "overoptimization.png")
# The headline metrics of each stage, in this order; for stage 3 every other metric follows (except samples).
HEADLINE = {
    "pretrain": ["eval_perplexity"],
    "sft": ["eval_perplexity"],
    "reward": ["eval_accuracy", "eval_title_only_accuracy", "eval_repeat_only_accuracy", "eval_margin"],
    **{stage: ["gold_score_sft", f"gold_score_{stage}", "gold_win_rate_vs_sft", "title_only_rate_sft",
               f"title_only_rate_{stage}", "repeat_rate_sft", f"repeat_rate_{stage}", "rm_score_sft",
               f"rm_score_{stage}", "rm_win_rate_vs_sft", "kl_to_sft", "eos_rate_sft", f"eos_rate_{stage}",
               "response_length_sft", f"response_length_{stage}"]
       for stage in STAGE3},
    CEILING: ["gold_score_ppo", "gold_win_rate_vs_sft", "title_only_rate_ppo", "repeat_rate_ppo", "kl_to_sft"],
}
STYLE = {"font.size": 12, "axes.titlesize": 13, "axes.labelsize": 12, "legend.fontsize": 11,
         "xtick.labelsize": 11, "ytick.labelsize": 11, "figure.titlesize": 15, "axes.grid": True,
         "grid.alpha": 0.3}
COLORS = {"pretrain": "tab:blue", "sft": "tab:orange", "reward": "tab:purple", "ppo": "tab:green", "eval": "tab:red"}
DPI = 110


# ---------------------------------------------------------------------------------------------- reading

def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _checkpoint_number(path: Path) -> int:
    suffix = path.parent.name.rsplit("-", 1)[-1]
    return int(suffix) if suffix.isdigit() else -1


def read_trainer_state(stage_dir: Path) -> dict:
    """`stage_dir/trainer_state.json`, else the newest `checkpoint-N/trainer_state.json`, else {}."""
    stage_dir = Path(stage_dir)
    state = _read_json(stage_dir / "trainer_state.json")
    if not state:
        checkpoints = sorted(stage_dir.glob("checkpoint-*/trainer_state.json"), key=_checkpoint_number)
        state = _read_json(checkpoints[-1]) if checkpoints else {}
    if not isinstance(state.get("log_history"), list):
        state["log_history"] = []
    return state


def series(log_history: list, key: str, x_key: str = "step") -> tuple[list, list]:
    """(x, y) of every log entry holding numbers for both `x_key` and `key`."""
    points = [(entry[x_key], entry[key]) for entry in log_history
              if isinstance(entry, dict) and _is_number(entry.get(x_key)) and _is_number(entry.get(key))]
    return [x for x, _ in points], [y for _, y in points]


def _last_step(state: dict) -> float | None:
    if _is_number(state.get("global_step")) and state["global_step"] > 0:
        return state["global_step"]
    steps = [e["step"] for e in state.get("log_history", []) if isinstance(e, dict) and _is_number(e.get("step"))]
    return max(steps) if steps else None


# --------------------------------------------------------------------------------------------- plotting

def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _legend(ax) -> None:
    if len(ax.get_legend_handles_labels()[1]) > 1:
        ax.legend(loc="best")


def _plot_line(ax, x, y, label, **kwargs) -> None:
    # a marker per point when there are few, so one or two logged values still show
    kwargs = {"marker": "o" if len(x) <= 12 else None, "markersize": 4, "linewidth": 1.8, **kwargs}
    ax.plot(x, y, label=label, **kwargs)


def _short(value: float) -> str:
    return f"{value:.3f}" if value == 0 or abs(value) >= 0.01 else f"{value:.2e}"


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="gray", fontsize=12)


def _training_curve(ax, state: dict, key: str, summary_key: str | None, label: str, color: str) -> bool:
    """The per-step `key`; if none was logged (training shorter than logging_steps), the run's mean
    (`summary_key`, e.g. train_loss) as a flat segment over the steps it averages. True if anything drawn."""
    log = state.get("log_history", [])
    x, y = series(log, key)
    if x:
        _plot_line(ax, x, y, label, color=color)
        return True
    mean = next((e[summary_key] for e in reversed(log) if isinstance(e, dict) and _is_number(e.get(summary_key))),
                None) if summary_key else None
    last = _last_step(state)
    if mean is None or last is None:
        return False
    ax.plot([0, last], [mean, mean], color=color, linewidth=1.8, linestyle="-.",
            label=f"{label} (mean of steps 1–{last:g})")
    return True


def plot_lm_loss(states: Mapping[str, dict], results: Mapping[str, dict], path: Path) -> Path | None:
    """Pretrain and SFT training loss per step (one panel each), held-out loss as points."""
    stages = []
    for stage in ("pretrain", "sft"):
        log = states.get(stage, {}).get("log_history", [])
        ex, ey = series(log, "eval_loss")
        final, last = results.get(stage, {}).get("eval_loss"), _last_step(states.get(stage, {}))
        if _is_number(final) and last is not None and last not in ex:
            ex, ey = ex + [last], ey + [final]  # the held-out loss after training, if not logged already
        has_train = bool(series(log, "loss")[0]) or any(isinstance(e, dict) and _is_number(e.get("train_loss"))
                                                      for e in log)
        if has_train or ex:
            stages.append((stage, ex, ey))
    if not stages:
        return None
    titles = {"pretrain": "Pretraining (plain text)", "sft": "Supervised fine-tuning (demonstrations)"}
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(stages), figsize=(7.5 * len(stages), 5.5), squeeze=False)
        for ax, (stage, ex, ey) in zip(axes[0], stages):
            _training_curve(ax, states[stage], "loss", "train_loss", "training loss", COLORS[stage])
            if ex:
                ax.scatter(ex, ey, s=80, marker="D", color=COLORS["eval"], edgecolor="black", zorder=3,
                           label="held-out loss" + (f": {_short(ey[-1])}" if len(ex) == 1 else ""))
            ax.set_xlim(left=0)
            ax.set_title(titles[stage])
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("cross-entropy (nats per token)")
            _legend(ax)
        fig.suptitle("Language-model loss")
        fig.tight_layout()
        return _save(fig, path)


def plot_reward_model(state: dict, results: dict, path: Path) -> Path | None:
    """Reward-model loss, accuracy and margin per step, with the held-out values as reference lines."""
    log = state.get("log_history", [])
    panels = [("loss", "train_loss", "eval_loss", "Bradley-Terry loss", "loss (nats per pair)"),
              ("accuracy", None, "eval_accuracy", "Pairwise accuracy", "accuracy (fraction of pairs)"),
              ("margin", None, "eval_margin", "Reward margin", "chosen − rejected (reward units)")]
    if not any(series(log, key)[0] or _is_number(results.get(eval_key)) for key, _, eval_key, _, _ in panels):
        return None
    last = _last_step(state)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
        for ax, (key, summary_key, eval_key, title, ylabel) in zip(axes, panels):
            drawn = _training_curve(ax, state, key, summary_key, "training batches", COLORS["reward"])
            if _is_number(results.get(eval_key)):
                ax.axhline(results[eval_key], color=COLORS["eval"], linestyle="--", linewidth=1.8,
                           label=f"held-out: {_short(results[eval_key])}")
                drawn = True
            if key == "accuracy":
                ax.axhline(0.5, color="gray", linestyle=":", linewidth=1.5, label="chance: 0.5")
                ax.set_ylim(0, 1.02)
            if not drawn:
                _no_data(ax, f"no {key} logged")
            ax.set_xlim(0, last * 1.05 if last else None)
            ax.set_title(title)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(ylabel)
            _legend(ax)
        fig.suptitle("Reward model training (preference pairs)")
        fig.tight_layout()
        return _save(fig, path)


def plot_ppo_training(state: dict, path: Path) -> Path | None:
    """PPO per update, against episodes: reward-model score, KL, entropy, value loss."""
    log = state.get("log_history", [])
    keys = ("objective/scores", "objective/rlhf_reward", "objective/kl", "objective/entropy", "policy/entropy_avg",
            "loss/value_avg")
    x_key = "episode" if any(series(log, key, "episode")[0] for key in keys) else "step"
    if not any(series(log, key, x_key)[0] for key in keys):
        return None
    xlabel = "episodes (prompts seen)" if x_key == "episode" else "PPO update"
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(2, 2, figsize=(14, 9.5))
        score_ax, kl_ax, entropy_ax, value_ax = axes.flat

        for key, label, style in (("objective/scores", "reward-model score", "-"),
                                  ("objective/rlhf_reward", "RLHF reward (score − KL penalty)", "--")):
            x, y = series(log, key, x_key)
            if x:
                _plot_line(score_ax, x, y, label, linestyle=style, color="C0" if style == "-" else "C1")
        score_ax.set(title="Reward of the rollouts", ylabel="score (reward-model units)")

        x, y = series(log, "objective/kl", x_key)
        if x:
            _plot_line(kl_ax, x, y, "KL, summed over the response", color="C3")
        kl_ax.set(title="KL to the reference (SFT) policy", ylabel="KL (nats per response)")

        # per token (left axis) and per response (right axis): an order of magnitude apart
        x_tok, y_tok = series(log, "policy/entropy_avg", x_key)
        x_resp, y_resp = series(log, "objective/entropy", x_key)
        if x_tok:
            _plot_line(entropy_ax, x_tok, y_tok, "training batches, per token (left axis)", color="C4")
            entropy_ax.set_ylabel("entropy (nats per token)")
        if x_resp:
            resp_ax = entropy_ax.twinx() if x_tok else entropy_ax
            _plot_line(resp_ax, x_resp, y_resp, "rollouts, per response" + (" (right axis)" if x_tok else ""),
                       color="C5", linestyle="--")
            resp_ax.set_ylabel("entropy (nats per response)")
            if resp_ax is not entropy_ax:
                resp_ax.grid(False)
                handles = [h for a in (entropy_ax, resp_ax) for h in a.get_legend_handles_labels()[0]]
                entropy_ax.legend(handles, [h.get_label() for h in handles], loc="best")
        entropy_ax.set_title("Policy entropy")

        x, y = series(log, "loss/value_avg", x_key)
        if x:
            _plot_line(value_ax, x, y, "value loss", color="C2")
        value_ax.set(title="Value-function loss", ylabel="loss (squared reward units)")

        for ax in axes.flat:
            if not ax.lines:
                _no_data(ax, "not logged")
                ax.set_yticks([])
            ax.set_xlabel(xlabel)
            ax.set_xlim(left=0)
            if ax.get_legend() is None:
                _legend(ax)
        fig.suptitle("PPO training, per update")
        fig.tight_layout()
        return _save(fig, path)


def plot_gold_scores(ppo: dict, path: Path) -> Path | None:
    """SFT vs PPO policy on held-out prompts: gold (oracle) score and reward-model score, side by side."""
    panels = [(name, ppo[f"{prefix}_score_sft"] if _is_number(ppo.get(f"{prefix}_score_sft")) else None,
               ppo[f"{prefix}_score_ppo"] if _is_number(ppo.get(f"{prefix}_score_ppo")) else None,
               ppo.get(f"{prefix}_win_rate_vs_sft"))
              for prefix, name in (("gold", "Gold score (oracle)"), ("rm", "Reward-model score"))]
    panels = [p for p in panels if p[1] is not None or p[2] is not None]
    if not panels:
        return None
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.5), squeeze=False)
        for ax, (name, sft, ppo_score, win_rate) in zip(axes[0], panels):
            labels = [label for label, value in (("SFT policy", sft), ("PPO policy", ppo_score)) if value is not None]
            values = [value for value in (sft, ppo_score) if value is not None]
            colors = [COLORS["sft"] if label.startswith("SFT") else COLORS["ppo"] for label in labels]
            bars = ax.bar(labels, values, color=colors, width=0.55, edgecolor="black")
            ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=3, fontsize=12)
            ax.axhline(0, color="black", linewidth=0.8)
            low, high = min(0, *values), max(0, *values)
            margin = 0.18 * (high - low or 1)
            ax.set_ylim(low - (margin if low < 0 else 0), high + margin)
            if _is_number(win_rate):
                name += f"\nPPO beats SFT in {100 * win_rate:.1f}% of answer pairs"
            ax.set_title(name)
            ax.set_ylabel("mean score per answer (arbitrary units)")
            ax.set_xlabel("policy")
            ax.grid(axis="x", visible=False)
        title = "SFT vs PPO policy on held-out prompts"
        if _is_number(ppo.get("kl_to_sft")):
            title += f"\nKL(PPO ‖ SFT) = {ppo['kl_to_sft']:.2f} nats per answer"
        fig.suptitle(title)
        fig.tight_layout()
        return _save(fig, path)


def curves(results: Mapping[str, dict]) -> dict[str, list[dict]]:
    """stage -> its over-optimisation curve (pipeline.monitor: points with step, kl_to_sft, gold and RM scores)."""
    found = {}
    for stage in (*STAGE3, CEILING):
        curve = results.get(stage, {}).get("curve") if isinstance(results.get(stage), dict) else None
        points = [p for p in curve if isinstance(p, dict) and _is_number(p.get("kl_to_sft"))] \
            if isinstance(curve, list) else []
        if len(points) > 1:
            found[stage] = points
    return found


def plot_overoptimization(results: Mapping[str, dict], path: Path) -> Path | None:
    """Gold and reward-model score of held-out answers against KL to the SFT policy, one line per stage-3 run with a
    curve (`curve_steps`): where the proxy keeps rising and the gold turns down, the policy is exploiting the reward
    model (Gao et al. 2022)."""
    found = curves(results)
    if not found:
        return None
    panels = [(key, label) for key, label in (("gold_score", "gold score (oracle)"),
                                              ("rm_score", "reward-model score (the proxy)"),
                                              ("response_length", "answer length (tokens)"))
              if any(_is_number(p.get(key)) for points in found.values() for p in points)]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 5.2), squeeze=False)
        for ax, (key, label) in zip(axes[0], panels):
            for index, (stage, points) in enumerate(found.items()):
                xy = [(p["kl_to_sft"], p[key]) for p in points if _is_number(p.get(key))]
                if not xy:
                    continue
                ax.plot(*zip(*xy), marker="o", markersize=4, color=f"C{index}",
                        label="PPO, oracle reward" if stage == CEILING else stage.upper())
                ax.annotate("end", xy[-1], textcoords="offset points", xytext=(4, 4), fontsize=9)
            ax.set_xlabel("KL to the SFT policy (nats per answer)")
            ax.set_title(label)
            _legend(ax)
        fig.suptitle("The over-optimisation curve: held-out answers at each evaluation of the run")
        fig.tight_layout()
        return _save(fig, path)


def alarm_lines(results: Mapping[str, dict]) -> list[str]:
    """Which reward-hacking alarms fired in each online stage, at which step, and the curve's gold peak."""
    lines = []
    for stage in (*STAGE3, CEILING):
        metrics = results.get(stage)
        if not isinstance(metrics, dict) or not isinstance(metrics.get("alarms"), list):
            continue
        steps = metrics.get("alarm_steps") if isinstance(metrics.get("alarm_steps"), dict) else {}
        fired = ", ".join(f"{md_cell(name)} (step {steps.get(name, '?')})" for name in metrics["alarms"]) or "none"
        peak = ""
        if _is_number(metrics.get("gold_score_peak")):
            final = metrics.get("gold_score_ppo" if stage == CEILING else f"gold_score_{stage}")
            peak = (f"; gold peaked at {_fmt(metrics['gold_score_peak'])} (step {metrics.get('gold_score_peak_step')})"
                    + (f" and ended at {_fmt(final)}" if _is_number(final) else ""))
        lines.append(f"- {'ppo-oracle' if stage == CEILING else stage}: {fired}{peak}")
    if not lines:
        return []
    return ["## Reward-hacking alarms", "", "Signs that need no oracle (docs/overoptimization.md): answers longer than "
            "the SFT policy's, a reward that correlates with length, an ensemble of reward models that disagrees.",
            "", *lines, ""]


# ------------------------------------------------------------------------------------------- markdown

def md_cell(value) -> str:
    """Text safe inside a Markdown table cell: backslashes and pipes escaped, newlines as <br>."""
    text = str(value).strip().replace("\\", "\\\\").replace("|", "\\|")
    return "<br>".join(line.strip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"))


def _fmt(value, key: str = "") -> str:
    if isinstance(value, float) and key.startswith("wall_seconds"):
        return f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:.4g}" if value and abs(value) < 0.01 else f"{value:.3f}"
    return str(value)


WALL = ("wall_seconds", "side_by_side_with")  # a stage's wall time, and the stages that ran beside it (pipeline run)


def results_rows(results: Mapping[str, dict]) -> list[tuple[str, str, str]]:
    """(stage, metric, value) for the headline metrics, every PPO metric but samples, and the wall times; the values
    of a stage whose figures are stale (results["stale"], written by `pipeline run`) end with " (stale)"."""
    rows = []
    stale = results.get("stale") if isinstance(results.get("stale"), dict) else {}
    mark = lambda stage: " (stale)" if stage in stale else ""  # noqa: E731
    for stage in (*STAGES, CEILING):
        metrics = results.get(stage)
        if not isinstance(metrics, dict):
            continue
        keys = [k for k in HEADLINE[stage] if k in metrics]
        if stage in STAGE3:
            keys += sorted(k for k in metrics if k not in keys and k not in ("samples", *WALL))
        keys += [k for k in WALL if k in metrics]
        rows += [(stage, key, _fmt(metrics[key], key) + mark(stage)) for key in keys
                 if _is_number(metrics[key]) or isinstance(metrics[key], str)]
    evaluation = results.get("eval") if isinstance(results.get("eval"), dict) else {}
    reward_model = evaluation.get("reward_model", {})
    for key in ("accuracy", "mean_margin", "score_mean", "score_std"):
        if _is_number(reward_model.get(key)):
            rows.append(("eval", f"reward_model.{key} (vs {reward_model.get('reference', 'labels')})",
                         _fmt(reward_model[key]) + mark("reward")))
    for stage, value in evaluation.get("perplexity", {}).items():
        rows.append(("eval", f"perplexity.{stage} (held-out pretraining text)", _fmt(value) + mark(stage)))
    for stage, by_k in evaluation.get("few_shot_sentiment", {}).items():
        rows += [("eval", f"few_shot_sentiment.{stage}.{k}", _fmt(v) + mark(stage)) for k, v in by_k.items()]
    if _is_number(results.get("wall_seconds_total")):
        rows.append(("total", "wall_seconds_total", _fmt(results["wall_seconds_total"], "wall_seconds_total")))
    return rows


PLOT_CAPTIONS = {
    "lm_loss.png": ("Language-model loss", "Training loss of pretraining and SFT per optimizer step; "
                    "diamonds are held-out losses. A dash-dotted line is the mean training loss of a run too "
                    "short to log per step."),
    "reward_model.png": ("Reward model", "Loss, pairwise accuracy and margin on the training batches; dashed "
                         "lines are the held-out values."),
    "ppo_training.png": ("PPO training", "Per PPO update: the reward-model score of the rollouts, the KL to "
                         "the SFT policy, the policy's entropy and the value-function loss."),
    "gold_scores.png": ("SFT vs PPO", "Mean score of the SFT and PPO policies' answers to held-out prompts, by "
                        "the gold oracle and by the learned reward model."),
    "overoptimization.png": ("Over-optimisation", "Held-out answers at each evaluation during training (curve_steps), "
                             "against KL to the SFT policy: where the reward model's score keeps rising and the gold "
                             "score turns down, the policy is exploiting the reward model."),
}


def render_markdown(run_dir: Path, results: Mapping[str, dict], plots: list[Path]) -> str:
    lines = [f"# RLHF run report: {run_dir.resolve().name}", "",
             f"Run folder: `{run_dir}`. Stages: "
             f"{', '.join(s for s in (*STAGES, CEILING) if s in results) or 'none found'}.", ""]
    rows = results_rows(results)
    lines += ["## Results", ""]
    if rows:
        lines += ["| stage | metric | value |", "|---|---|---:|"]
        lines += [f"| {md_cell(s)} | {md_cell(k)} | {md_cell(v)} |" for s, k, v in rows]
        stale = results.get("stale") if isinstance(results.get("stale"), dict) else {}
        if stale:
            lines += ["", "**Stale figures** (marked \"(stale)\": a stage they read was run again after them):", ""]
            lines += [f"- {md_cell(stage)}: {md_cell(why)}" for stage, why in stale.items()]
    else:
        lines.append("No results found.")
    lines.append("")
    if plots:
        lines += ["## Plots", ""]
        for plot in plots:
            title, caption = PLOT_CAPTIONS.get(plot.name, (plot.stem, ""))
            lines += [f"### {title}", "", caption, "", f"![{title}]({plot.name})", ""]
    lines += ceiling_lines(results)
    lines += alarm_lines(results)
    lines += gold_terms_table(results)
    lines += few_shot_lines(results)
    for stage in STAGE3:
        samples = results.get(stage, {}).get("samples") if isinstance(results.get(stage), dict) else None
        samples = [s for s in samples if isinstance(s, dict)] if isinstance(samples, list) else []
        if samples:
            name = stage.upper()
            stale = stage in results.get("stale", {}) if isinstance(results.get("stale"), dict) else False
            lines += [f"## Samples: SFT and {name}" + (" (stale)" if stale else ""), "",
                      f"Answers of the SFT and {name} policies to the same held-out prompt"
                      + (" (stale: from a run before a stage it reads was run again)." if stale else "."), "",
                      f"| prompt | SFT answer | {name} answer |", "|---|---|---|"]
            lines += [f"| {md_cell(s.get('prompt', ''))} | {md_cell(s.get('sft', ''))} | {md_cell(s.get(stage, ''))} |"
                      for s in samples]
            lines.append("")
    return "\n".join(lines)


def ceiling_lines(results: Mapping[str, dict]) -> list[str]:
    """PPO through the learned reward model against PPO on the oracle itself (the ceiling), on the gold score."""
    ppo, ceiling = results.get("ppo"), results.get(CEILING)
    if not (isinstance(ppo, dict) and isinstance(ceiling, dict)
            and _is_number(ppo.get("gold_score_ppo")) and _is_number(ceiling.get("gold_score_ppo"))):
        return []
    learned, best = ppo["gold_score_ppo"], ceiling["gold_score_ppo"]
    gap = round(best - learned, 3)  # as printed
    if gap > 0:
        reading = f", a gap of {_fmt(gap)}: what learning the reward from noisy raters costs"
    else:  # one PPO run on the oracle is a reference, not a bound: a good reward model can match it
        reading = ((f", {_fmt(-gap)} above it" if gap < 0 else ", the same score")
                   + ": on this budget the learned reward model cost nothing measurable (the oracle run is one PPO "
                   "run of the same budget, not a bound)")
    return ["## The ceiling: PPO on the oracle itself", "",
            f"The same PPO recipe with the gold oracle as its reward (`{CEILING}`) reaches a gold score of "
            f"{_fmt(best)}; through the learned reward model PPO reaches {_fmt(learned)}{reading}. KL to the SFT "
            f"policy: {_fmt(ceiling.get('kl_to_sft', ''))} (oracle) and {_fmt(ppo.get('kl_to_sft', ''))} "
            "(learned).", ""]


def gold_terms_table(results: Mapping[str, dict]) -> list[str]:
    """The gold score in its parts for the SFT policy and every stage-3 policy evaluated against it: the mean of
    each term of the oracle (they sum to the gold score) and how often an answer names the asked title alone."""
    columns = [(stage, f"_{stage}") for stage in STAGE3 if isinstance(results.get(stage), dict)
               and _is_number(results[stage].get(f"gold_sentiment_{stage}"))]
    if columns and isinstance(results.get(CEILING), dict) and _is_number(results[CEILING].get("gold_sentiment_ppo")):
        columns.append((CEILING, "_ppo"))
    if not columns:
        return []
    sft_from = results[columns[0][0]]
    keys = [f"gold_{term}" for term in GOLD_TERMS] + ["gold_score", "title_only_rate", "repeat_rate"]
    lines = ["## The gold score in its parts", "", "The mean of each term of the oracle over the held-out answers "
             "(the terms sum to the gold score), how often an answer names the asked title and no other, and how often "
             "it repeats a sentence.", "",
             "| term | SFT | " + " | ".join("PPO, oracle reward" if stage == CEILING else stage.upper()
                                            for stage, _ in columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for key in keys:
        cells = [_fmt(sft_from.get(f"{key}_sft", ""))] + [_fmt(results[stage].get(key + suffix, ""))
                                                           for stage, suffix in columns]
        lines.append(f"| {key.removeprefix('gold_')} | " + " | ".join(cells) + " |")
    return lines + [""]


def few_shot_lines(results: Mapping[str, dict]) -> list[str]:
    """Zero-, one- and few-shot accuracy of every policy against the majority class, and whether any k rises above
    it by more than two standard errors of the majority's accuracy on that many examples."""
    evaluation = results.get("eval") if isinstance(results.get("eval"), dict) else {}
    by_stage = {stage: by_k for stage, by_k in evaluation.get("few_shot_sentiment", {}).items()
                if isinstance(by_k, dict) and _is_number(by_k.get("majority")) and _is_number(by_k.get("examples"))}
    if not by_stage:
        return []
    shots = sorted({k for by_k in by_stage.values() for k in by_k if k.endswith("_shot")}, key=lambda k: int(k[:-5]))
    lines = ["## In-context learning", "", "GPT-2/GPT-3-style prompting, no gradient: is a held-out review positive or "
             "negative, answered by the likelier label after k demonstrations? A model that reads nothing scores the "
             "majority class; above it means more than two standard errors above.", "",
             "| policy | " + " | ".join(k.replace("_", "-") for k in shots) + " | majority | above the majority? |",
             "|---|" + "---:|" * (len(shots) + 1) + "---|"]
    for stage in sorted(by_stage, key=lambda s: STAGES.index(s) if s in STAGES else len(STAGES)):
        by_k = by_stage[stage]
        majority, n = by_k["majority"], by_k["examples"]
        bar = majority + 2 * math.sqrt(majority * (1 - majority) / n)
        above = [k.replace("_", "-") for k in shots if _is_number(by_k.get(k)) and by_k[k] > bar]
        lines.append(f"| {stage} | " + " | ".join(_fmt(by_k.get(k, "")) for k in shots)
                     + f" | {_fmt(majority)} | {'yes: ' + ', '.join(above) if above else 'no'} |")
    return lines + [""]


# ------------------------------------------------------------------------------------------------ entry

def write_report(run_dir, stage_dirs: Mapping[str, str | Path] | None = None, results_path=None) -> Path:
    """Write `run_dir/report/` (the PNG plots and `report.md`); returns the path of `report.md`.

    run_dir: the run folder holding `results.json` and, by default, the stage folders `pretrain/`, `sft/`,
        `reward/`, `ppo/`.
    stage_dirs: stage -> output folder, for stages whose folders are elsewhere (the others default to
        `run_dir/<stage>`).
    results_path: the run's results file, if not `run_dir/results.json`.
    A stage's own `results.json` fills in for a stage missing from the run's results.
    """
    run_dir = Path(run_dir)
    dirs = {stage: run_dir / stage for stage in STAGES}
    dirs.update({stage: Path(folder) for stage, folder in (stage_dirs or {}).items() if stage in STAGES})
    results = _read_json(Path(results_path) if results_path else run_dir / "results.json")
    for stage in STAGES:
        if not isinstance(results.get(stage), dict):
            stage_results = _read_json(dirs[stage] / "results.json")
            if stage_results:
                results[stage] = stage_results
            else:
                results.pop(stage, None)
    states = {stage: read_trainer_state(dirs[stage]) for stage in STAGES}

    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    for name in PLOT_FILES:  # a rerun must not leave a stale plot that this run has no data for
        (out / name).unlink(missing_ok=True)
    plots = [
        plot_lm_loss(states, results, out / "lm_loss.png"),
        plot_reward_model(states["reward"], results.get("reward", {}), out / "reward_model.png"),
        plot_ppo_training(states["ppo"], out / "ppo_training.png"),
        plot_gold_scores(results.get("ppo", {}), out / "gold_scores.png"),
        plot_overoptimization(results, out / "overoptimization.png"),
    ]
    report = out / "report.md"
    report.write_text(render_markdown(run_dir, results, [p for p in plots if p is not None]))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.report",
                                     description="Write RUN_DIR/report/: training plots and a summary page.")
    parser.add_argument("run_dir", help="the run folder (holding results.json and the stage folders)")
    parser.add_argument("--stage_dir", action="append", default=[], metavar="STAGE=DIR",
                        help="a stage's output folder when it is not RUN_DIR/STAGE (repeatable)")
    parser.add_argument("--results", help="the run's results file (default: RUN_DIR/results.json)")
    args = parser.parse_args(argv)
    stage_dirs = {}
    for item in args.stage_dir:
        stage, sep, folder = item.partition("=")
        if not sep or stage not in STAGES:
            parser.error(f"--stage_dir expects STAGE=DIR with STAGE one of {', '.join(STAGES)}, got '{item}'")
        stage_dirs[stage] = folder
    if not Path(args.run_dir).is_dir():
        parser.error(f"run folder '{args.run_dir}' does not exist")
    print(write_report(args.run_dir, stage_dirs, args.results))


if __name__ == "__main__":
    main()
