"""Entry point for `accelerate launch scripts/dpo.py --config recipes/<name>/dpo.yaml [--field value ...]`."""

from pipeline.stages import run

if __name__ == "__main__":
    run("dpo")
