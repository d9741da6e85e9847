"""Score every pair of a dataset with a saved reward model: `eval_report.json` and its plots (for lists: the ranking
metrics, overall and per group).

Scoring goes through `BalancedRewardTrainer.predict` and the metrics through `pair_metrics`, the same code as
`trainer.evaluate()`, so the command and the trainer agree on the same model and data. The exploit probes
(`probes.exploit_probes`) score the same pairs' texts through `scoring`, as training rendered and cut them.
"""

import json
import logging
import os

import numpy as np
from transformers import AutoConfig

from . import plots
from .balancing import LENGTH_CELLS, length_cells
from .config import BalancedRewardConfig
from .data import ROW_COLUMN, numbered, pair_texts
from .metrics import calibration, metric_name, pair_metrics, wilson_interval
from .model_card import refresh_evaluation
from .paths import resolve_model_path
from .probes import exploit_probes, model_reward
from .ranking import decisive_pairs, padded, ranking_metrics

logger = logging.getLogger(__name__)

PLOTS = {"margins": "margin_histogram.png", "calibration": "calibration.png", "groups": "group_accuracy.png",
         "length_cells": "length_cell_accuracy.png"}


def evaluate_model(model: str, dataset, output_dir: str, group_column: str | None = None,
                   max_length: int | None = None, batch_size: int = 32, on_bad_rows: str = "skip",
                   length_calibration: bool = True, probes: bool = True, long_responses: str = "cut",
                   dataset_name: str | None = None) -> dict:
    """Score `dataset` with the reward model at `model` (a folder or hub id); write the report, plots and
    `predictions.jsonl` (one line per scored pair, by the dataset's row number).

    `long_responses` "cut" (default) scores a pair whose response alone is longer than max_length as a client would
    (each text cut to its last tokens, counted in the report); "drop" leaves it out, as training does.
    `length_calibration` adds accuracy after post-hoc length calibration (`metrics.length_calibrated`). `probes`
    adds `report["probes"]`, the exploit probes (`probes.exploit_probes`, about 12 texts scored per pair) on the
    scored pairs' texts; not for lists, nor for data given as token ids only. Written into the model's own folder,
    the report also refreshes the model card's evaluation section (`dataset_name` names the data there)."""
    from .trainer import BalancedRewardTrainer  # the trainer imports this module's siblings; keep start-up light

    model = resolve_model_path(model)
    # Render and cut texts as training did (saved with the model), so the numbers match its card.
    saved = AutoConfig.from_pretrained(model)
    if max_length is None:
        max_length = getattr(saved, "reward_max_length", None)
    attributes, loaded = attribute_setup(model, saved, dataset)
    args = BalancedRewardConfig(
        output_dir=output_dir, per_device_eval_batch_size=batch_size, group_column=group_column,
        max_length=max_length, on_bad_rows=on_bad_rows, report_to="none", disable_dropout=True,
        append_eos_token=bool(getattr(saved, "reward_append_eos_token", False)), long_responses=long_responses,
        **attributes,
    )
    dataset = numbered(dataset)  # the row numbers travel through preparation to predictions.jsonl
    trainer = BalancedRewardTrainer(model=loaded or model, args=args, eval_dataset=dataset)
    # Longest pairs first, in batches of similar length: little padding, and a slow batch shows up at once.
    prepared = trainer.eval_dataset.sort("length", reverse=True)
    output = trainer.predict(prepared, metric_key_prefix="eval")
    group_ids, ranks, mask, lengths, *expert = output.label_ids
    per_attribute = {}
    if attributes:  # each attribute against the expert scores, over the distinct responses
        per_attribute = attribute_report(output.predictions[2], *expert, mask == 1, attributes, output_dir)
    rewards, ranks, mask = padded(output.predictions[0], ranks, mask == 1)
    group_ids = np.asarray(group_ids).reshape(-1)
    chosen, rejected, pair_rows, (chosen_lengths, rejected_lengths) = decisive_pairs(rewards, ranks, mask, lengths)
    if rewards.shape[1] != 2 or len(pair_rows) != len(rewards):  # lists, single responses, or pairs with ties
        return write_list_report(rewards, ranks, mask, group_ids, trainer, model, output_dir, dataset_name,
                                 per_attribute)
    lengths = np.stack([chosen_lengths, rejected_lengths], axis=1)
    report = build_report(chosen, rejected, group_ids, trainer.group_names, chosen_lengths, rejected_lengths,
                          length_calibration)
    report["model"], report["data"], report["max_length"] = model, trainer.data_report.get("eval"), trainer.max_length
    report["dataset"] = dataset_name
    report.update(per_attribute)
    rows = prepared[ROW_COLUMN]
    write_predictions(os.path.join(output_dir, "predictions.jsonl"), rows, chosen, rejected,
                      [trainer.group_names[g] for g in np.asarray(group_ids).reshape(-1)], lengths)
    texts = pair_texts(dataset, sorted(rows), group_column) if probes else None
    if texts is not None:
        reward = model_reward(trainer.model, trainer.processing_class, trainer.max_length,
                              trainer.args.append_eos_token, batch_size)
        report["probes"] = exploit_probes(reward, *texts)
    elif probes:
        logger.warning("exploit probes skipped: the dataset has no 'chosen' / 'rejected' texts (token ids only).")
    os.makedirs(os.path.join(output_dir, "plots"), exist_ok=True)
    paths = {name: os.path.join(output_dir, "plots", file) for name, file in PLOTS.items()}
    plots.margin_histogram(np.asarray(chosen) - np.asarray(rejected), paths["margins"])
    plots.calibration_curve(report["calibration"], report["calibration_error"], paths["calibration"])
    plots.group_accuracy_bars(report["groups"], report["accuracy"], report.get("length_baseline_accuracy"),
                              paths["groups"])
    plots.length_cell_bars(report["length_cells"], report.get("length_balanced_accuracy"), paths["length_cells"])
    report["plots"] = {name: os.path.relpath(path, output_dir) for name, path in paths.items()}
    report["plots"].update(per_attribute.get("plots", {}))
    with open(os.path.join(output_dir, "eval_report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    refresh_card(output_dir, model, report)
    return report


def attribute_setup(model: str, saved, dataset) -> tuple[dict, object | None]:
    """(config options, model object or None) for evaluating `model`. A multi-attribute model on data with its
    attribute columns: its names and weights as the run's `attributes`, so every attribute is scored against the
    data's; on data without them, its combined one-output model (`attributes.combine_head`), evaluated as any reward
    model. Any other model: nothing to add."""
    from .attributes import attribute_columns
    from .scoring import SAVED_ATTRIBUTES, is_attribute_model

    if not is_attribute_model(saved):
        return {}, None
    names, weights = (getattr(saved, SAVED_ATTRIBUTES)[key] for key in ("names", "weights"))
    columns = dataset.column_names
    if all(attribute_columns(columns, name) for name in names):
        return {"attributes": names, "reward_weights": weights, "loss_type": "regression"}, None
    from transformers import AutoModelForSequenceClassification

    from .attributes import combine_head

    missing = [name for name in names if not attribute_columns(columns, name)]
    logger.warning(f"the data has no scores for attribute(s) {', '.join(missing)}: evaluating the combined reward "
                   f"only (weights {weights}).")
    return {}, combine_head(AutoModelForSequenceClassification.from_pretrained(model, dtype="float32"), weights)


def attribute_report(predicted, expert, keys, mask, attributes: dict, output_dir: str) -> dict:
    """Per attribute: the correlations and pair accuracy of `attribute_training.evaluation_metrics` (each response
    once) and a plot of predicted against expert score."""
    from .attribute_training import distinct_responses, evaluation_metrics

    names = attributes["attributes"]
    report = evaluation_metrics(predicted, expert, mask, names, keys)
    report["attribute_weights"] = dict(zip(names, attributes["reward_weights"]))
    path = os.path.join(output_dir, "plots", "attribute_scatter.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    plots.attribute_scatter(*distinct_responses(predicted, expert, mask, keys)[:2], names, report, path)
    report["plots"] = {"attributes": os.path.relpath(path, output_dir)}
    return report


def refresh_card(output_dir: str, model: str, report: dict) -> None:
    """A report written into the model's own folder becomes the card's evaluation section."""
    if os.path.realpath(output_dir) == os.path.realpath(model):
        refresh_evaluation(output_dir, report)


def write_predictions(path: str, rows, chosen, rejected, groups, lengths) -> None:
    """One JSON line per scored pair, in row order: its rewards, their difference, response lengths in tokens, its
    length cell and whether the chosen response scored higher; for looking at the errors."""
    cells = length_cells(lengths[:, 0], lengths[:, 1])
    lines = []
    for k in np.argsort(rows, kind="stable"):
        lines.append(json.dumps({
            "row": int(rows[k]), "group": groups[k], "chosen_reward": float(chosen[k]),
            "rejected_reward": float(rejected[k]), "margin": float(chosen[k] - rejected[k]),
            "chosen_length": int(lengths[k, 0]), "rejected_length": int(lengths[k, 1]),
            "length_cell": LENGTH_CELLS[cells[k]], "correct": bool(chosen[k] > rejected[k]),
        }))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def write_list_report(rewards, ranks, mask, group_ids, trainer, model: str, output_dir: str,
                      dataset_name: str | None = None, per_attribute: dict | None = None) -> dict:
    """The report of a dataset of lists: `ranking_metrics` overall and per group (`trainer.evaluate()`'s metrics,
    with counts), and a multi-attribute model's `per_attribute` figures (for single scored responses, the only
    ones). The pair plots (margins, calibration, length cells) have no list counterpart and are not drawn."""
    per_attribute = dict(per_attribute or {})
    report = ranking_metrics(rewards, ranks, mask)
    if "pairwise_accuracy" in report:  # under the name pair evaluations use
        report["accuracy"] = report["pairwise_accuracy"]
    names = trainer.group_names or ["all"]
    report["groups"] = {names[g]: ranking_metrics(rewards[group_ids == g], ranks[group_ids == g], mask[group_ids == g])
                        for g in np.unique(group_ids)}
    if len(names) > 1:
        report.update({f"accuracy_{metric_name(group)}": in_group["pairwise_accuracy"]
                       for group, in_group in report["groups"].items() if "pairwise_accuracy" in in_group})
    report.update(model=model, data=trainer.data_report.get("eval"), max_length=trainer.max_length,
                  plots=per_attribute.pop("plots", {}), dataset=dataset_name, **per_attribute)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "eval_report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    refresh_card(output_dir, model, report)
    return report


def accuracy_with_interval(correct: np.ndarray) -> dict:
    low, high = wilson_interval(float(correct.sum()), len(correct))
    return {"pairs": len(correct), "accuracy": float(correct.mean()), "ci_low": low, "ci_high": high}


def build_report(chosen, rejected, group_ids, group_names, chosen_lengths, rejected_lengths,
                 length_calibration: bool = True) -> dict:
    """`pair_metrics` plus what a file can hold and a log line cannot: per-group and per-cell details, calibration
    bins."""
    chosen, rejected = np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64)
    group_ids = np.asarray(group_ids).reshape(-1)
    names = group_names or ["all"]
    report = pair_metrics(chosen, rejected, group_ids, names, chosen_lengths, rejected_lengths, length_calibration)
    correct = chosen > rejected
    cells = length_cells(chosen_lengths, rejected_lengths)
    report["groups"], report["length_cells"] = {}, {}
    for group_id in np.unique(group_ids):
        in_group = group_ids == group_id
        report["groups"][names[group_id]] = accuracy_with_interval(correct[in_group])
        for cell, cell_name in enumerate(LENGTH_CELLS):
            if (in_group & (cells == cell)).any():
                report["length_cells"][f"{names[group_id]} / {cell_name}"] = accuracy_with_interval(
                    correct[in_group & (cells == cell)])
    report["calibration"] = calibration(chosen - rejected, correct)[1]
    return report
