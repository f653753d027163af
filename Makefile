# Set-up is part of every target: a virtual environment in .venv, made once and reused.
# CPU by default (the torch==2.13.0 CPU wheel). On a GPU machine: make setup TORCH=torch (or a CUDA index).
VENV   ?= .venv
PYTHON ?= python3
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python

LOCK    = requirements/lock.txt

.PHONY: setup demo test compare clean lock test-latest test-families

# The exact versions CI last passed with (requirements/lock.txt, as pip constraints; torch is not in it, TORCH
# picks it). setup.cfg keeps the ranges users may install into.
setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(LOCK) "$(TORCH)"
	$(PY) -m pip install --quiet -c $(LOCK) -e ".[dev]"
	touch $@

# requirements/lock.txt again from what .venv holds now (after upgrading it and make test passing there):
# pip freeze --all less pip, the project itself, torch and torch's GPU packages (nvidia-*, triton, cuda-*)
lock:
	$(PY) -m pip freeze --all --exclude-editable > $(LOCK).freeze
	{ echo "# The exact versions CI last passed with (make test on a clean clone, Python 3.11, CPU torch)."; \
	  echo "# make setup installs from it (pip -c); setup.cfg keeps the ranges users may install into."; \
	  echo "# torch is not here: the Makefile's TORCH picks it (torch==2.13.0 CPU by default, a CUDA build on GPUs)."; \
	  echo "# Regenerate with make lock, from .venv (docs/development.md, Tested versions)."; \
	  grep -v -i -E '^(pip|rlhf-pipeline|torch|triton|pytorch-triton|nvidia-[a-z0-9._-]*|cuda-[a-z0-9._-]*)==' $(LOCK).freeze; \
	} > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm $(LOCK).freeze

# The fast tests against the newest releases, in their own venv (.venv-latest), without the lock: the CPU torch
# (TORCH) and the newest of everything else. Run it before moving the lock and when transformers or TRL release.
VENV_LATEST  = .venv-latest
PY_LATEST    = $(VENV_LATEST)/bin/python
LATEST_TESTS = tests/test_any_model.py tests/test_recipes.py tests/test_models.py tests/test_ppo_math.py tests/test_lora.py tests/test_rl.py
test-latest:
	test -x $(PY_LATEST) || $(PYTHON) -m venv $(VENV_LATEST)
	$(PY_LATEST) -m pip install --quiet --upgrade pip
	$(PY_LATEST) -m pip install --quiet --upgrade --upgrade-strategy eager "$(TORCH)" -e ".[dev]"
	$(PY_LATEST) -c "from importlib.metadata import version; \
	  [print(p, version(p)) for p in 'torch transformers trl accelerate datasets peft deepspeed'.split()]"
	$(PY_LATEST) -m pytest -q -x $(LATEST_TESTS)

# The family matrix (tests/test_families.py, docs/families.md): tiny random Llama, Qwen, Mistral, GPT-NeoX, OPT,
# Gemma and Phi models through every stage; make test runs only the families in tests/families.py's CI_FAMILIES
test-families: setup
	RUN_ALL_FAMILIES=1 $(PY) -m pytest -q tests/test_families.py

demo: setup
	$(PY) -m pipeline run recipes/tiny

test: setup
	$(PY) -m pytest -q tests

# PPO, GRPO, RLOO, DPO and oracle-reward PPO from the demo's SFT policy and reward model, 3 seeds each:
# bench/results/comparison.md and .json, and docs/comparison/*.png
compare: setup
	$(PY) -m pipeline compare

# The biased world (docs/overoptimization.md): raters who over-reward length, the chain and its over-optimisation
# curve (outputs/tiny-biased/results.json and report/); then PPO, its defences, GRPO, RLOO and DPO there, 3 seeds each:
# bench/results/comparison-biased.md and .json, docs/comparison-biased/*.png
.PHONY: demo-biased compare-biased
demo-biased: setup
	$(PY) -m pipeline run recipes/tiny-biased

compare-biased: setup
	$(PY) -m pipeline compare --recipes recipes/tiny-biased --output_dir outputs/compare-biased \
	  --markdown bench/results/comparison-biased.md --plots_dir docs/comparison-biased

# Every result goes to bench/results/ (a .md and a .json each). The stages against bare TRL scripts, side by
# side: stages.md; then PPO against TRL 1.12's PPOTrainer (its own venv, bench/.venv-trl112, made on the first
# run), 3 seeds each, on the demo's recipe and at hh-rlhf's long shapes: ppo.md; PPO's peak memory at 124M, LoRA on
# one base model against full: ppo_memory.md (and ppo.json's memory_124m); then the command line's start-up time:
# startup.md; then TRL's tiled LM head against the whole logits in the tiny pretraining stage: lm_head.md; then
# ppo and ppo-oracle one after the other against side by side, from the demo's models (made first if missing):
# jobs.md; then GRPO and RLOO with TRL 1.16's generation and log-probability passes against the stage's, on
# the demo and at hh-rlhf's shapes: group.md; then the reward stage at hh-rlhf's shapes, padded against
# padding-free: reward_long.md
.PHONY: bench
bench: setup
	$(PY) bench/run.py
	$(PY) bench/ppo_vs_trl112.py
	$(PY) bench/ppo_long.py
	$(PY) bench/ppo_memory.py --all --json bench/results/ppo_memory.json --md bench/results/ppo_memory.md \
	  --ppo-json bench/results/ppo.json
	$(PY) bench/startup.py
	$(PY) bench/lm_head.py
	test -f outputs/tiny/reward/config.json || $(MAKE) demo
	$(PY) bench/jobs.py
	$(PY) bench/group.py
	$(PY) bench/group.py --long
	$(PY) bench/reward_long.py

# The GPU table (bench/results/gpu.md and .json): GPT-2 124M SFT tokens/s and MFU in bf16, PPO sequences/s padded
# and padding-free, peak GPU memory of full and LoRA PPO, flash attention where installed. On a GPU machine (make
# setup TORCH=torch first); `python bench/gpu.py --smoke` runs it on the CPU at tiny sizes (tests/test_bench.py)
.PHONY: bench-gpu
bench-gpu: setup
	$(PY) bench/gpu.py

clean:
	rm -rf outputs
