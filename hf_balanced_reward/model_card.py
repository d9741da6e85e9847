"""README.md model card for a trained reward model: what it was trained on, how, what it scores, how to use it;
and the files of a saved model that are pushed to the Hub with it."""

import json
import os
import re

from huggingface_hub import ModelCard, ModelCardData

TEMPLATE = """---
{metadata}
---

# {name}

A reward model: it reads a prompt and a response and returns one number, higher for the response people
prefer. Trained on human preferences with `hf_balanced_reward` ({loss_line}).

## Training

| setting | value |
|---|---|
{training_rows}

## Evaluation

{evaluation}

## Use

```python
from transformers import pipeline

reward = pipeline("text-classification", model="{repo}", function_to_apply="none")
print(reward("{example}")[0]["score"])  # higher: preferred
```

As the reward of trl's GRPO, scoring each completion exactly as training did:

```python
from hf_balanced_reward import reward_function
from trl import GRPOConfig, GRPOTrainer

trainer = GRPOTrainer(model=policy, reward_funcs=reward_function("{repo}"), args=GRPOConfig(...),
                      train_dataset=prompts)
```

(`reward_funcs="{repo}"` also works, but trl tokenizes without special tokens: for a tokenizer that adds BOS its
rewards differ from training's.) To rerank or filter: `hf-balanced-reward score --model {repo} --dataset D --output
OUT.jsonl`.

As the reward model of trl's PPO: `AutoModelForSequenceClassification.from_pretrained("{repo}", num_labels=1)`.
The model scores the text's last token; texts are scored as rendered{eos_note}.
"""

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

# Files a saved reward model needs to load (weights, config, tokenizer) plus its card and plots: what is pushed.
HUB_FILES = re.compile(
    r"(config\.json|generation_config\.json|[^/]*\.safetensors|[^/]*\.safetensors\.index\.json|adapter_config\.json|"
    r"tokenizer[^/]*|special_tokens_map\.json|added_tokens\.json|vocab\.[^/]*|merges\.txt|[^/]*\.model|"
    r"chat_template\.jinja|README\.md|plots/[^/]*\.png)"
)


def hub_files(folder: str) -> list[str]:
    """The files of a saved model that load it, plus its card and plots; not args pickles, logs or checkpoints."""
    found = []
    for root, _, files in os.walk(folder):
        for name in files:
            relative = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if HUB_FILES.fullmatch(relative):
                found.append(relative)
    return sorted(found)


def public_name(name_or_path: str | None) -> str | None:
    """A hub id as it is; a local path as its folder's name, so that a pushed card publishes no local paths."""
    if not name_or_path or (HUB_ID.match(name_or_path) and not os.path.exists(name_or_path)):
        return name_or_path
    return os.path.basename(os.path.normpath(name_or_path))


def card_metadata(base_model: str | None, loss_type: str, model_tags=()) -> str:
    tags = ["reward-model", "hf_balanced_reward", loss_type]
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-classification",
        tags=tags + [t for t in model_tags if t not in tags],  # the model's own (trl's, a user's add_model_tags)
        base_model=base_model if base_model and HUB_ID.match(base_model) and not os.path.exists(base_model) else None,
    )
    return data.to_yaml()


def evaluation_section(metrics: dict, report: dict | None, plots: dict[str, str]) -> str:
    """The last evaluation as a table; the `evaluate` command's report and plots when they sit beside the model."""
    source = report or {k[len("eval_"):]: v for k, v in metrics.items() if k.startswith("eval_")}
    if not source:
        return "No evaluation was run with this model; `hf-balanced-reward evaluate --model DIR --dataset FILE` adds one."
    rows = [("lists", source.get("lists")), ("pairs", source.get("pairs")), ("accuracy", source.get("accuracy"))]
    if "accuracy_ci_low" in source:
        rows.append(("accuracy, 95% interval", f"{source['accuracy_ci_low']:.4f} - {source['accuracy_ci_high']:.4f}"))
    rows += [(name, source.get(key)) for name, key in (
        ("always prefer the longer response", "length_baseline_accuracy"),
        ("balanced accuracy (mean over groups)", "balanced_accuracy"),
        ("length-balanced accuracy (mean over group x length cells)", "length_balanced_accuracy"),
        ("length-conflicting accuracy (pairs against their group's length direction)", "length_conflicting_accuracy"),
        ("within-group reward-length rank correlation (mean absolute)", "within_group_length_correlation"),
        ("accuracy after post-hoc length calibration", "calibrated_accuracy"),
        ("worst-group accuracy", "worst_group_accuracy"),
        ("mean margin r(chosen) - r(rejected)", "margin"),
        ("reward-length correlation", "reward_length_correlation"),
        ("calibration error (ECE)", "calibration_error"),
        ("ties", "ties"),
        ("Kendall tau per list (mean)", "kendall_tau"),  # an eval set of lists: its ranking metrics
        ("Spearman rho per list (mean)", "spearman_rho"),
        ("top-1 accuracy", "top1_accuracy"),
        ("tie accuracy (labelled ties scored within the tolerance)", "tie_accuracy"),
    )]
    rows += [(f"accuracy: {k[len('accuracy_'):]}", v) for k, v in source.items()
             if k.startswith("accuracy_") and not k.startswith("accuracy_ci")]
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value:.4f} |" if isinstance(value, float) else f"| {name} | {value} |"
              for name, value in rows if value is not None]
    # The report's probes (the same pairs as the table above), else the last eval's.
    lines += probe_table((report or {}).get("probes") or {
        k.removeprefix("eval_"): v for k, v in metrics.items() if k.startswith(("eval_probe_", "probe_"))})
    lines += [f"\n![{name}]({path})" for name, path in plots.items()]
    return "\n".join(lines)


# The exploit probes' headline figures (`probes.exploit_probes`; docs/evaluation.md), each with what it means.
PROBE_ROWS = (
    ("probe_accuracy", "accuracy on the probed pairs"),
    ("probe_accuracy_without_prompt", "accuracy with the prompt removed"),
    ("probe_prompt_use", "how much the prompt helps (the difference; near 0: the model barely reads it)"),
    ("probe_on_topic_random", "chosen beats another prompt's chosen response (near 1: answers must be on topic)"),
    ("probe_on_topic_nearest", "the same against the most similar prompt's response (harder)"),
    ("probe_padding_rise_rate", "share of responses whose reward rises when filler is appended (near 0 is good)"),
    ("probe_padding_mean_rise", "mean rise from that filler, in reward standard deviations"),
    ("probe_padding_rise_rate_pleasantry", "rise rate for a closing pleasantry"),
    ("probe_padding_rise_rate_restatement", "rise rate for a restatement of the question"),
    ("probe_padding_rise_rate_repetition", "rise rate for a repetition of the response's first sentence"),
)


def probe_table(probes: dict) -> list[str]:
    """The probes the evaluation measured, one row each; nothing when none were."""
    rows = [f"| {key[len('probe_'):]} | {probes[key]:.4f} | {meaning} |" for key, meaning in PROBE_ROWS if key in probes]
    if not rows:
        return []
    return ["", "Exploit probes: what an RL policy could exploit (no labels used; see the package's "
            "docs/evaluation.md).", "", "| probe | value | what it means |", "|---|---|---|", *rows]


def write_model_card(output_dir: str, args, base_model: str | None, metrics: dict, data_report: dict,
                     repo: str | None = None, balance: dict | None = None, normalization: dict | None = None,
                     model_tags=()) -> str:
    """Write `output_dir/README.md`; returns its path. `metrics` are the last eval metrics (eval_* keys);
    `balance` is the balanced loss's summary (fitted length slopes, unit weights); `normalization` the reward
    standardisation folded into the head (`normalize_rewards`)."""
    report_path = os.path.join(output_dir, "eval_report.json")
    report = None
    if os.path.isfile(report_path):
        with open(report_path, encoding="utf-8") as f:
            report = json.load(f)
    plots = {name: path for name, path in (report or {}).get("plots", {}).items()
             if os.path.isfile(os.path.join(output_dir, path))}
    train = data_report.get("train", {})
    settings = [
        ("base model", public_name(base_model) or "unknown"),
        ("loss", args.loss_type),
        ("loss options", json.dumps(args.loss_kwargs) if args.loss_kwargs else "defaults"),
        ("groups from", args.group_column or "none (one group)"),
        ("reward centring coefficient", args.center_rewards_coefficient or "off"),
        ("max_length", args.max_length),
        ("epochs", args.num_train_epochs),
        ("learning rate", args.learning_rate),
        ("batch size per device", args.per_device_train_batch_size),
        ("training lists" if "lists" in train else "training pairs", train.get("lists", train.get("pairs", "unknown"))),
        ("rows dropped", sum(train.get("dropped", {}).values()) if train else "unknown"),
    ]
    if normalization:
        settings.append(("rewards standardised after training (folded into the head)",
                         f"mean {normalization['mean']:.4f}, std {normalization['std']:.4f} on {normalization['pairs']} "
                         "pairs" + ("" if normalization["shift_folded"] else "; scale only: the head has no bias")))
    if balance:
        slopes = ", ".join(f"{group} {slope:+.3f}" for group, slope in balance["length_slopes"].items())
        settings.append(("length slope per group, fitted before training (used by the length expert in training "
                         "only; the model's rewards do not include it)", slopes))
        weights = ", ".join(f"{unit} {u['weight']:.3f} ({u['pairs']} pairs)" for unit, u in balance["units"].items())
        settings.append(("pair weight per group / length cell, at the end of training", weights))
    loss_line = f"loss `{args.loss_type}`" + (f" with {json.dumps(args.loss_kwargs)}" if args.loss_kwargs else "")
    text = TEMPLATE.format(
        metadata=card_metadata(base_model, args.loss_type, model_tags).strip(),
        name=f"{os.path.basename(os.path.abspath(output_dir))} (reward model)",
        loss_line=loss_line,
        training_rows="\n".join(f"| {name} | {value} |" for name, value in settings),
        evaluation=evaluation_section(metrics, report, plots),
        repo=repo or public_name(os.path.abspath(output_dir)),
        example="Question: how do I boil an egg? Answer: Put it in boiling water for eight minutes.",
        eos_note=", with the eos token appended" if args.append_eos_token else " (no eos token appended)",
    )
    path = os.path.join(output_dir, "README.md")
    ModelCard(text).save(path)
    return path
