"""Entry point for `accelerate launch scripts/sft.py --config recipes/<name>/sft.yaml [--field value ...]`."""

from pipeline.stages import run

if __name__ == "__main__":
    run("sft")
