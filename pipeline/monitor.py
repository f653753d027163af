"""Watching a stage-3 run for reward hacking: alarms that need no oracle, the over-optimisation curve, and the
best held-out step.

- `Alarms`, fed every rollout batch of an online stage (PPO, GRPO, RLOO), on any data:
  - `length_drift`: the answers' mean length over the SFT policy's (the run's first rollouts, before any update);
  - `reward_length_correlation`: Pearson's correlation, within the batch, of the reward model's score with the
    answer's length: a reward model that pays for length;
  - `ensemble_disagreement`: how much the reward models of an ensemble (the reward stage's `ensemble_size`)
    disagree about the batch's answers (the mean over answers of the members' spread, each member's score
    standardised on the first rollouts), over the same figure on the first rollouts.
  Each is logged every batch (`alarm/<name>`); one that stays past its threshold for `PATIENCE` batches in a row
  fires: one warning line, and its name and step in the stage's results (`alarms`, `alarm_steps`).
- `Monitor`, a TrainerCallback: every `curve_steps` optimizer steps it evaluates the policy on held-out prompts
  (gold score where an oracle exists, reward-model score, the held-out reward models' score, KL to the SFT policy,
  length): the over-optimisation curve. With `keep_best`, the policy of the best held-out reward is kept and put
  back when training ends, so the stage's model is that step's. Its state goes into every checkpoint
  (`monitor.json`), so a resumed run keeps its curve, baseline and alarms.

Defaults for the thresholds were set on the embedded worlds (docs/overoptimization.md): quiet on recipes/tiny's
PPO, firing early in recipes/tiny-biased's.
"""

import json
import logging
import math
import os

import torch
from transformers import TrainerCallback

logger = logging.getLogger("pipeline")

THRESHOLDS = {"length_drift": 1.5, "reward_length_correlation": 0.5, "ensemble_disagreement": 1.2}
PATIENCE = 3  # batches in a row past a threshold before its alarm fires
STATE_FILE = "monitor.json"  # in every checkpoint
BEST_FILE = "best_policy.pt"  # in output_dir, with keep_best: the trainable weights of the best step
MEANING = {
    "length_drift": "answers are {value:.2f}x as long as the SFT policy's",
    "reward_length_correlation": "the reward model's score correlates {value:.2f} with answer length",
    "ensemble_disagreement": "the reward ensemble disagrees {value:.2f}x as much as on the SFT policy's answers",
}


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson's correlation of two 1-D tensors; nan where either is constant."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = (x.square().sum() * y.square().sum()).sqrt()
    return float((x * y).sum() / denominator) if denominator > 0 else math.nan


class Alarms:
    """Oracle-free signs of reward hacking, from one rollout batch at a time (see the module's docstring)."""

    def __init__(self, thresholds: dict | None = None, patience: int = PATIENCE):
        self.thresholds = {**THRESHOLDS, **(thresholds or {})}
        self.patience = patience
        self.baseline: dict = {}  # from the first batch: sft_length, member_mean/member_std, disagreement
        self.streak = dict.fromkeys(self.thresholds, 0)
        self.fired: dict[str, int] = {}  # name -> the step it fired at
        self.verbose = True  # the warning line (the main process's)

    def observe(self, step: int, lengths: torch.Tensor, rm_scores: torch.Tensor | None = None,
                member_scores: torch.Tensor | None = None) -> dict[str, float]:
        """One batch: `lengths` of its answers (tokens), the reward model's `rm_scores`, and `member_scores`
        [members, answers] of an ensemble. Returns the figures to log (alarm/<name>)."""
        lengths = lengths.detach().float().cpu()
        if not self.baseline:
            self.baseline["sft_length"] = max(float(lengths.mean()), 1e-6)
        values = {"length_drift": float(lengths.mean()) / self.baseline["sft_length"]}
        if rm_scores is not None and len(lengths) > 2:
            values["reward_length_correlation"] = pearson(rm_scores.detach().float().cpu(), lengths)
        if member_scores is not None and len(member_scores) > 1:
            scores = member_scores.detach().double().cpu()
            if "member_mean" not in self.baseline:
                self.baseline["member_mean"] = scores.mean(1).tolist()
                self.baseline["member_std"] = scores.std(1).clamp_min(1e-6).tolist()
            z = (scores - torch.tensor(self.baseline["member_mean"])[:, None]) / torch.tensor(
                self.baseline["member_std"])[:, None]
            spread = float(z.std(0).mean())
            self.baseline.setdefault("disagreement", max(spread, 1e-6))
            values["ensemble_disagreement"] = spread / self.baseline["disagreement"]
        for name, value in values.items():
            if math.isnan(value):
                continue
            self.streak[name] = self.streak.get(name, 0) + 1 if value > self.thresholds[name] else 0
            if self.streak[name] >= self.patience and name not in self.fired:
                self.fired[name] = step
                if self.verbose:
                    logger.warning(f"alarm {name} at step {step}: {MEANING[name].format(value=value)} (threshold "
                               f"{self.thresholds[name]:g}, {self.patience} batches in a row): the policy may be "
                                   "buying reward the reward model gives wrongly (docs/overoptimization.md)")
        # nan (all answers of one length: no correlation) is left out, not logged as a gap the loggers warn about
        return {f"alarm/{name}": value for name, value in values.items() if not math.isnan(value)}

    def state_dict(self) -> dict:
        return {"baseline": self.baseline, "streak": self.streak, "fired": self.fired}

    def load_state_dict(self, state: dict) -> None:
        self.baseline, self.fired = dict(state.get("baseline", {})), dict(state.get("fired", {}))
        self.streak = {**dict.fromkeys(self.thresholds, 0), **state.get("streak", {})}

    def results(self) -> dict:
        return {"alarms": sorted(self.fired, key=self.fired.get), "alarm_steps": dict(self.fired),
                "alarm_thresholds": dict(self.thresholds)}


class Monitor(TrainerCallback):
    """The alarms' state, the over-optimisation curve and the best held-out step of one stage-3 run.

    evaluate(): the policy now, on held-out prompts -> {"gold_score", "rm_score", "heldout_rm_score",
    "kl_to_sft", "response_length"} (what it has); policy(): the trained policy as a module (for keep_best)."""

    def __init__(self, output_dir: str, alarms: Alarms | None = None, curve_steps: int = 0, evaluate=None,
                 policy=None, keep_best: bool = False, is_main_process: bool = True):
        if keep_best and not curve_steps:
            raise ValueError("keep_best needs curve_steps > 0: the best step is chosen among the curve's evaluations")
        self.output_dir, self.alarms, self.curve_steps = output_dir, alarms or Alarms(), curve_steps
        self.evaluate, self.policy, self.keep_best = evaluate, policy, keep_best
        self.is_main_process = is_main_process
        self.curve: list[dict] = []
        self.best: dict | None = None  # the curve point of the best held-out reward

    # ---- the curve
    def add_point(self, step: int) -> dict:
        policy = self.policy() if self.policy is not None else None
        was_training = policy.training if policy is not None else False
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            point = {"step": step, **self.evaluate()}
        if policy is not None:
            policy.train(was_training)
        self.curve.append(point)
        selection = selection_score(point)
        if self.keep_best and selection is not None and (self.best is None or selection > selection_score(self.best)):
            self.best = point
            if self.is_main_process:
                trainable = {name: p.detach().to("cpu", copy=True) for name, p in policy.named_parameters()
                             if p.requires_grad}
                torch.save(trainable, os.path.join(self.output_dir, BEST_FILE))
        shown = ", ".join(f"{key} {point[key]:.3f}" for key in ("gold_score", "rm_score", "heldout_rm_score",
                                                                 "kl_to_sft", "response_length") if key in point)
        logger.info(f"over-optimisation curve, step {step}: {shown}")
        return point

    def on_train_begin(self, args, state, control, **kwargs):
        if self.curve_steps and not self.curve and state.global_step == 0:
            self.add_point(0)  # the SFT policy: KL 0

    def on_step_end(self, args, state, control, **kwargs):
        if self.curve_steps and state.global_step % self.curve_steps == 0:
            self.add_point(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.curve_steps and (not self.curve or self.curve[-1]["step"] != state.global_step):
            self.add_point(state.global_step)  # the end, whatever curve_steps
        if self.keep_best and self.best is not None:
            self.restore_best()

    def restore_best(self) -> None:
        """Put the best step's trainable weights back into the policy (every process reads the file)."""
        from accelerate import PartialState

        PartialState().wait_for_everyone()
        policy = self.policy()
        saved = torch.load(os.path.join(self.output_dir, BEST_FILE), map_location="cpu", weights_only=True)
        with torch.no_grad():
            for name, parameter in policy.named_parameters():
                if name in saved:
                    parameter.copy_(saved[name].to(parameter.device, parameter.dtype))
        logger.info(f"keep_best: the policy of step {self.best['step']} (held-out reward "
                    f"{selection_score(self.best):.3f}) is the stage's model")

    # ---- checkpoints
    def state_dict(self) -> dict:
        return {"alarms": self.alarms.state_dict(), "curve": self.curve, "best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.alarms.load_state_dict(state.get("alarms", {}))
        self.curve, self.best = list(state.get("curve", [])), state.get("best")

    def write(self, checkpoint: str) -> None:
        """Into a checkpoint folder, before the trainer marks it complete (the trainers' _save_checkpoint)."""
        with open(os.path.join(checkpoint, STATE_FILE), "w") as f:
            json.dump(self.state_dict(), f)

    def resume(self, checkpoint: str | None) -> None:
        path = os.path.join(checkpoint, STATE_FILE) if checkpoint else None
        if path and os.path.isfile(path):
            with open(path) as f:
                self.load_state_dict(json.load(f))

    def results(self) -> dict:
        """What the stage's results.json gets: the alarms, the curve, the gold score's peak over the curve, the
        best step."""
        out = self.alarms.results()
        if self.curve:
            out["curve"] = self.curve
            golds = [p["gold_score"] for p in self.curve if "gold_score" in p]
            if golds:
                peak = max(self.curve, key=lambda p: p.get("gold_score", -math.inf))
                out.update(gold_score_peak=peak["gold_score"], gold_score_peak_step=peak["step"],
                           gold_score_peak_kl=peak.get("kl_to_sft"))
        if self.keep_best and self.best is not None:
            out["best_step"] = self.best["step"]
        return out


def selection_score(point: dict) -> float | None:
    """What keep_best maximises: the held-out reward models' score where there are some, else the trained-against
    reward model's on held-out prompts. Never the gold score: a user has no oracle."""
    return point.get("heldout_rm_score", point.get("rm_score"))
