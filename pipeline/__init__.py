"""An RLHF pipeline (pretrain -> SFT -> reward model -> PPO) over TRL, for GPT-2-style models."""

import os
import warnings

# TRL's configs still set `gradient_checkpointing`, which transformers 5 renamed; nothing for a user to fix.
warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated", category=FutureWarning)
# TRL's trainers still ask models `is_gradient_checkpointing`, which transformers 5 renamed: nor is this
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

__version__ = "0.1.0"
