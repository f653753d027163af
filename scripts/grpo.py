"""Entry point for `accelerate launch scripts/grpo.py --config recipes/<name>/grpo.yaml [--field value ...]`."""

from pipeline.stages import run

if __name__ == "__main__":
    run("grpo")
