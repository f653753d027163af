"""Entry point for `accelerate launch scripts/pretrain.py --config recipes/<name>/pretrain.yaml [--field value ...]`."""

from pipeline.stages import run

if __name__ == "__main__":
    run("pretrain")
