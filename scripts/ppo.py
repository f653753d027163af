"""Entry point for `accelerate launch scripts/ppo.py --config recipes/<name>/ppo.yaml [--field value ...]`."""

from pipeline.stages import run

if __name__ == "__main__":
    run("ppo")
