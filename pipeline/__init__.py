"""An RLHF pipeline (pretrain -> SFT -> reward model -> PPO) over TRL, for GPT-2-style models."""

import os

# PPO lives in trl.experimental in TRL 1.12 (its last release with PPOTrainer); we depend on it knowingly.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

__version__ = "0.1.0"
