"""The text the commands print: `train`'s before/after table, `evaluate`'s report lines and `compare`'s table.

Only the standard library at import: `compare` answers without torch or transformers.
"""

import json
import os

from .errors import UsageError

# What `compare` shows first: the summaries that tell a length-biased model from one that is not.
SHORTCUT_METRICS = ("accuracy", "length_balanced_accuracy", "length_conflicting_accuracy",
                    "within_group_length_correlation", "balanced_accuracy", "worst_group_accuracy")
# Then the exploit probes (`probes.exploit_probes`), when the runs logged them (`exploit_probes: true`).
PROBE_METRICS = ("probe_accuracy_without_prompt", "probe_prompt_use", "probe_on_topic_random", "probe_on_topic_nearest",
                 "probe_padding_rise_rate", "probe_padding_mean_rise")


def format_table(before: dict | None, after: dict | None) -> str:
    after = after or {}
    keys = [k for k in (after or before) if k.startswith("eval_") and not k.endswith(("runtime", "per_second"))]
    keys = [k for k in keys if k not in ("eval_epoch", "eval_model_preparation_time")]
    header = f"{'metric':<36}" + (f"{'before':>10}" if before else "") + f"{'after':>10}"
    rows = [header, "-" * len(header)]

    def cell(value) -> str:  # counts (pairs, ties) as integers, everything else to 4 decimals
        return f"{value:>10d}" if isinstance(value, int) else f"{value:>10.4f}"

    for key in keys:
        row = f"{key[len('eval_'):]:<36}"
        if before:
            row += cell(before.get(key, float("nan")))
        rows.append(row + cell(after.get(key, float("nan"))))
    return "\n".join(rows)


def pair_report_lines(report: dict, output_dir: str) -> str:
    """What `evaluate` prints for a pair eval set: accuracy, the shortcut figures, groups and probes."""
    low, high = report["accuracy_ci_low"], report["accuracy_ci_high"]
    lines = [f"{report['pairs']} pairs: accuracy {report['accuracy']:.4f} (95% CI {low:.4f}-{high:.4f}), "
             f"ties {report['ties']}"]
    dropped = report["data"]["dropped"]
    if dropped:
        lines.append(f"{sum(dropped.values())} rows not scored: " + "; ".join(f"{n} x {r}" for r, n in dropped.items()))
    if report["data"].get("responses_cut"):
        lines.append(f"{report['data']['responses_cut']} pairs have a response longer than max_length="
                     f"{report['max_length']}: scored with each text cut to its last tokens, as `score` and `pipeline` "
                     "cut it (--long_responses drop leaves them out)")
    if "length_baseline_accuracy" in report:
        lines.append(f"always prefer the longer response: {report['length_baseline_accuracy']:.4f}; "
                     f"reward-length correlation {report.get('reward_length_correlation', float('nan')):.3f}")
    lines.append(f"balanced accuracy {report['balanced_accuracy']:.4f}, worst group {report['worst_group_accuracy']:.4f}"
                 f", calibration error {report['calibration_error']:.4f}")
    shortcut = [f"{label} {report[key]:.4f}" for label, key in (
        ("length-balanced accuracy", "length_balanced_accuracy"),
        ("length-conflicting accuracy", "length_conflicting_accuracy"),
        ("within-group |reward-length rank correlation|", "within_group_length_correlation"),
        ("length-calibrated accuracy", "calibrated_accuracy")) if key in report]
    if shortcut:
        lines.append(", ".join(shortcut))
    lines += [f"  {name}: {g['accuracy']:.4f} of {g['pairs']}" for name, g in report["groups"].items()]
    if report.get("probes"):
        lines += probe_lines(report["probes"])
    lines += attribute_lines(report)
    lines.append(f"Report, plots and per-pair predictions.jsonl in {os.path.abspath(output_dir)}")
    return "\n".join(lines)


def probe_lines(probes: dict) -> list[str]:
    """Two lines of the exploit probes' headline figures (`probes.exploit_probes`)."""
    from .probes import FILLERS  # imports scikit-learn: only when there are probes to show

    def figure(key):
        return f"{probes[key]:.4f}" if key in probes else "n/a"

    kinds = ", ".join(f"{kind} {figure(f'probe_padding_rise_rate_{kind}')}" for kind in FILLERS)
    return [f"exploit probes: accuracy {figure('probe_accuracy')}, without the prompt "
            f"{figure('probe_accuracy_without_prompt')} (prompt use {figure('probe_prompt_use')}); chosen beats another "
            f"prompt's chosen: random {figure('probe_on_topic_random')}, nearest {figure('probe_on_topic_nearest')}",
            f"padding raises the reward in {figure('probe_padding_rise_rate')} of cases ({kinds}), by "
            f"{figure('probe_padding_mean_rise')} reward sd on average"]


def attribute_lines(report: dict) -> list[str]:
    """A multi-attribute model's figures, one line per attribute (`attribute_training.evaluation_metrics`)."""
    if "attribute_weights" not in report:
        return []
    from .metrics import metric_name  # numpy: only with attributes to show

    lines = ["per attribute (its weight in the reward), each response once: correlations with the expert scores, and "
             "pair accuracy over the pairs whose expert scores differ:"]
    for name, weight in report["attribute_weights"].items():
        key = metric_name(name)
        figures = {m: f"{report[f'{m}_{key}']:.4f}" for m in ("pearson", "spearman", "kendall", "pair_accuracy")}
        lines.append(f"  {name} ({weight:g}): Pearson {figures['pearson']}, Spearman {figures['spearman']}, Kendall "
                     f"{figures['kendall']} over {report[f'scored_{key}']} responses; pair accuracy "
                     f"{figures['pair_accuracy']} of {report[f'pairs_{key}']}")
    return lines


def list_report_lines(report: dict, output_dir: str) -> str:
    """What `evaluate` prints for a list eval set: the ranking figures, ties and groups."""

    def figure(metrics, key):
        return f"{metrics[key]:.4f}" if key in metrics else "n/a"

    lines = [f"{report['lists']} lists, {report['pairs']} ranked pairs: pairwise accuracy "
             f"{figure(report, 'pairwise_accuracy')}, Kendall tau {figure(report, 'kendall_tau')}, Spearman rho "
             f"{figure(report, 'spearman_rho')}, top-1 accuracy {figure(report, 'top1_accuracy')}"]
    if not report["lists"] and "attribute_weights" in report:  # single scored responses: nothing to rank
        lines = [f"{report['data']['responses']} scored responses"]
    if report["tied_pairs"]:
        lines.append(f"{report['tied_pairs']} tied pairs: tie accuracy {report['tie_accuracy']:.4f} (within "
                     f"{report['tie_tolerance']}), mean reward gap tied {report['tie_reward_gap']:.4f} vs decisive "
                     f"{figure(report, 'decisive_reward_gap')}")
    dropped = report["data"]["dropped"]
    if dropped:
        lines.append(f"{sum(dropped.values())} rows not scored: " + "; ".join(f"{n} x {r}" for r, n in dropped.items()))
    if len(report["groups"]) > 1:
        lines += [f"  {name}: pairwise accuracy {figure(g, 'pairwise_accuracy')}, Kendall tau {figure(g, 'kendall_tau')}"
                  f" over {g['lists']} lists" for name, g in report["groups"].items()]
    lines += attribute_lines(report)
    lines.append(f"Report in {os.path.abspath(output_dir)}")
    return "\n".join(lines)


def compare(run_dirs: list[str]) -> str:
    """Final evaluation metrics of finished `train` runs side by side: the shortcut summaries, then accuracy per
    group and length cell. Reads each run's eval_results.json."""
    if len(run_dirs) < 1:
        raise UsageError("compare needs at least one run folder (the output_dir of a train run with an eval set).")
    results = []
    for run_dir in run_dirs:
        path = os.path.join(run_dir, "eval_results.json")
        if not os.path.isfile(path):
            raise UsageError(f"'{run_dir}' has no eval_results.json: give the output_dir of a finished train run "
                             "that had an eval set.")
        try:
            with open(path, encoding="utf-8") as f:
                results.append(json.load(f))
        except json.JSONDecodeError as err:
            raise UsageError(f"'{path}' is not valid JSON ({err.msg} at line {err.lineno}): the run may have been "
                             "stopped while writing it; evaluate the saved model again with `evaluate` to rebuild "
                             "its figures.") from None
    cells = sorted({k for r in results for k in r if k.endswith(("_chosen_longer", "_chosen_shorter"))})
    keys = [f"eval_{k}" for k in SHORTCUT_METRICS + PROBE_METRICS] + cells
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    width = max(12, *(len(n) + 2 for n in names))
    rows = [f"{'metric':<44}" + "".join(f"{n:>{width}}" for n in names)]
    rows.append("-" * len(rows[0]))
    for key in keys:
        if any(key in r for r in results):
            rows.append(f"{key[len('eval_'):]:<44}" + "".join(
                f"{r[key]:>{width}.4f}" if key in r else f"{'-':>{width}}" for r in results))
    return "\n".join(rows)
