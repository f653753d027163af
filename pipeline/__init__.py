"""An RLHF pipeline (pretrain -> SFT -> reward model -> PPO) over TRL, for GPT-2-style models."""

import os
import warnings

# PPO lives in trl.experimental in TRL 1.12 (its last release with PPOTrainer); we depend on it knowingly.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

# TRL 1.12's configs still set `gradient_checkpointing`, which transformers 5 renamed; nothing for a user to fix.
warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated", category=FutureWarning)

__version__ = "0.1.0"
