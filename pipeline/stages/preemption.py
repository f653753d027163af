"""Preemption: SIGTERM (what Slurm, Kubernetes and spot machines send before they take a node), SIGUSR1 (Slurm's
early warning, `--signal=USR1@120`) and Ctrl-C (SIGINT) cost at most the step in flight.

While a stage trains, the first such signal only sets a flag: at the end of the optimizer step in flight every
process agrees to stop (under DDP or DeepSpeed the flag is reduced across processes at each step boundary, so they
all stop at the same step even when the signal reached them at different moments), transformers writes a checkpoint
there (PPO's mid-update rollouts included) and the stage exits with 128 + the signal's number (143 for SIGTERM, 138
for SIGUSR1, 130 for Ctrl-C) after one line saying where the checkpoint is. The same command resumes from it.
A second signal, or one that arrives while nothing is training (loading, evaluation), stops at once."""

import os
import signal
import sys

import torch
from transformers import TrainerCallback

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preempted(BaseException):
    """A stage stopped by a signal. BaseException, as KeyboardInterrupt is: raised from a signal handler anywhere,
    it must not be caught by code that handles ordinary errors. `checkpoint`: the one written at the step
    boundary (None when the signal came while nothing trained)."""

    def __init__(self, signum: int, checkpoint: str | None = None, step: int | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.checkpoint, self.step = signum, checkpoint, step

    @property
    def name(self) -> str:
        return "Ctrl-C" if self.signum == signal.SIGINT else signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _State:
    pid = None  # the stage's process: the workers it forks (datasets' map, data loaders) inherit the handler
    received: int | None = None  # the first signal received
    training = False  # between on_train_begin and the end of the step where the stop was agreed
    stage = "stage"


def _main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _handler(signum, frame):
    if os.getpid() != _State.pid:  # a worker the stage forked: the stage itself stops (or checkpoints) the run
        if _State.training:  # a data loader's worker: it goes on serving batches until the step boundary
            return
        os._exit(128 + signum)  # datasets' map workers (num_proc): end quietly, no traceback of their own
    first = _State.received is None
    if first:
        _State.received = signum
    if _State.training and first:
        if _main_process():
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            print(f"{_State.stage}: {name} received: writing a checkpoint at the end of the step in flight, then "
                  "stopping (send it again to stop at once)", file=sys.stderr, flush=True)
        return
    raise Preempted(_State.received)


def install(stage: str) -> dict:
    """Catch the preemption signals (main thread only); returns the handlers they had, for `restore`."""
    _State.stage, _State.received, _State.training, _State.pid = stage, None, False, os.getpid()
    return {signum: signal.signal(signum, _handler) for signum in SIGNALS}


def restore(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def received() -> int | None:
    return _State.received


def training_ended() -> None:
    """Training left early (no on_train_end): a signal from now on stops the stage at once."""
    _State.training = False


def _agreed(signum: int | None, args) -> int | None:
    """The signal any process has received (the highest number if several): a max-reduction over the processes at
    the step boundary, which they all reach, so that they stop at the same step."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1:
        device = args.device if torch.distributed.get_backend() == "nccl" else "cpu"
        value = torch.tensor([signum or 0], device=device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return int(value.item()) or None
    return signum


class StopOnSignal(TrainerCallback):
    """Turns a received signal into transformers' own save-and-stop at the next step boundary."""

    def __init__(self):
        self.stopped_at: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        _State.training = True

    def on_step_end(self, args, state, control, **kwargs):
        agreed = _agreed(_State.received, args)
        if agreed:
            _State.received = _State.received or agreed  # another process's signal: stop as it does
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        _State.training = False
