"""Entry point for `accelerate launch scripts/reward.py --config recipes/<name>/reward.yaml [--field value ...]`."""

from pipeline.stages import run

if __name__ == "__main__":
    run("reward")
