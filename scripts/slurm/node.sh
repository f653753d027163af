#!/bin/bash
# One machine's share of a stage: `accelerate launch "$@"` in the background, with the preemption signals this
# script receives (SIGUSR1, SIGTERM, SIGINT; srun forwards Slurm's to it) sent on to the stage's own processes,
# the launcher's children. The launcher is not signalled: torch's launcher would kill its workers 30 s later,
# maybe before the step in flight has ended and its checkpoint is written (docs/reliability.md, Preemption).
#   bash scripts/slurm/node.sh --config_file recipes/accelerate/ddp.yaml scripts/sft.py --config recipes/tiny/sft.yaml
# Exits with the launcher's status.
set -u
PYTHON=${PYTHON:-.venv/bin/python}
"$PYTHON" -m accelerate.commands.launch "$@" &
launcher=$!
forward() { pkill "-$1" -P "$launcher" || true; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
trap 'forward INT' INT
# `wait` returns early when a trap runs: wait again until the launcher has ended
while wait "$launcher"; status=$?; kill -0 "$launcher" 2>/dev/null; do :; done
exit "$status"
