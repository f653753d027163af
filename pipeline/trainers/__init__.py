"""Trainers TRL does not ship: PPO (deleted from TRL in 1.13), on transformers' Trainer loop."""
