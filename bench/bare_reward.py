"""The bare-TRL baseline for reward modelling: load, RewardTrainer(model, args, train_dataset,
processing_class), train, save. Same model, data file and RewardConfig fields as the pipeline's stage."""

from datasets import load_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl import RewardConfig, RewardTrainer


def main(model_path: str, data_file: str, config: dict) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1)
    dataset = load_dataset("json", data_files=data_file, split="train")
    args = RewardConfig(**config)
    trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(args.output_dir)
