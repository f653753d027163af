# Set-up is part of every target: a virtual environment in .venv, made once and reused.
# CPU by default (the torch==2.13.0 CPU wheel). On a GPU machine: make setup TORCH=torch (or a CUDA index).
VENV   ?= .venv
PYTHON ?= python3
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python

.PHONY: setup demo test compare clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo: setup
	$(PY) -m pipeline run recipes/tiny

test: setup
	$(PY) -m pytest -q tests

# PPO, GRPO, RLOO, DPO and oracle-reward PPO from the demo's SFT policy and reward model, 3 seeds each:
# COMPARISON.md, COMPARISON.json and docs/comparison/*.png
compare: setup
	$(PY) -m pipeline compare

# The stages against bare TRL scripts, side by side: BENCHMARKS.md and .json; then PPO against TRL 1.12's
# PPOTrainer (its own venv, bench/.venv-trl112, made on the first run), 3 seeds each: BENCHMARKS_PPO.md and .json;
# then the command line's start-up time: BENCHMARKS_STARTUP.md and .json; then TRL's tiled LM head against the
# whole logits in the tiny pretraining stage: BENCHMARKS_LM_HEAD.md and .json; then ppo and ppo-oracle one
# after the other against side by side, from the demo's models (made first if missing): BENCHMARKS_JOBS.md
.PHONY: bench
bench: setup
	$(PY) bench/run.py
	$(PY) bench/ppo_vs_trl112.py
	$(PY) bench/startup.py
	$(PY) bench/lm_head.py
	test -f outputs/tiny/reward/config.json || $(MAKE) demo
	$(PY) bench/jobs.py

clean:
	rm -rf outputs
