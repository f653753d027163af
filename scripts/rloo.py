"""Entry point for `accelerate launch scripts/rloo.py --config recipes/<name>/rloo.yaml [--field value ...]`."""

from pipeline.stages import run

if __name__ == "__main__":
    run("rloo")
