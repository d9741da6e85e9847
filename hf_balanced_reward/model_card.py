"""README.md model card for a trained reward model: what it was trained from and on, for how long, what it scores
and how to use it (a folder of LoRA adapters says so, with code that loads it from any directory); and the files of
a saved model that are pushed to the Hub with it.

A card publishes no local paths: a base model or dataset on this machine is named by its folder or file name, or by
its place inside an installed Python package (`package:NAME/DIR`, the form the CLI accepts)."""

import json
import os
import re

from huggingface_hub import ModelCard, ModelCardData

from .paths import HUB_ID, base_model_label, dataset_label, describe_path, public_name  # noqa: F401

CARD = """---
{metadata}
---

# {title}

{summary}

## Training

| setting | value |
|---|---|
{training_rows}

## Evaluation

{evaluation}

## Use

{use}
"""

EXAMPLE = "Question: how do I boil an egg? Answer: Put it in boiling water for eight minutes."

USE_MODEL = """{where}```python
from transformers import pipeline

reward = pipeline("text-classification", model="{model}", function_to_apply="none")
print(reward("{example}")[0]["score"])  # higher: preferred
```

As the reward of trl's GRPO, scoring each completion exactly as training did:

```python
from hf_balanced_reward import reward_function
from trl import GRPOConfig, GRPOTrainer

trainer = GRPOTrainer(model=policy, reward_funcs=reward_function("{model}"), args=GRPOConfig(...),
                      train_dataset=prompts)
```

(`reward_funcs="{model}"` also works, but trl tokenizes without special tokens: for a tokenizer that adds BOS its
rewards differ from training's.) To rerank or filter: `hf-balanced-reward score --model {model} --dataset D --output
OUT.jsonl`.

As the reward model of trl's PPO: `AutoModelForSequenceClassification.from_pretrained("{model}", num_labels=1)`.
"""

PEFT_CODE = """The adapters with peft, from any directory (the base model named explicitly, so nothing depends on
where training ran):

```python
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

{base_line}
base = AutoModelForSequenceClassification.from_pretrained(base_model, num_labels=1)
model = PeftModel.from_pretrained(base, "{model}").merge_and_unload()  # adapters folded in: a plain model
tokenizer = AutoTokenizer.from_pretrained("{model}")
reward = pipeline("text-classification", model=model, tokenizer=tokenizer, function_to_apply="none")
print(reward("{example}")[0]["score"])  # higher: preferred
```"""

MERGED_CODE = """The merged model in `{model}/merged` (the adapters folded into the base weights) needs neither peft
nor the base model:

```python
from transformers import pipeline

reward = pipeline("text-classification", model="{model}/merged", function_to_apply="none")
```"""

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


# --- the card ---------------------------------------------------------------------------------------------------

def card_metadata(base_model: str | None, loss_type: str, model_tags=(), datasets=(), adapter: bool = False) -> str:
    tags = ["reward-model", "hf_balanced_reward", loss_type] + (["lora", "peft"] if adapter else [])
    hub = [name for name in datasets if name and HUB_ID.match(name) and not os.path.exists(name)]
    data = ModelCardData(
        library_name="peft" if adapter else "transformers",
        pipeline_tag="text-classification",
        tags=tags + [t for t in model_tags if t not in tags],  # the model's own (trl's, a user's add_model_tags)
        base_model=base_model if describe_path(base_model)[0] == "hub" else None,
        datasets=hub or None,
    )
    return data.to_yaml()


def number(value: float) -> str:
    """0.18, 3, 1.5: two significant digits below 1 (never rounded up to 1), at most two decimals above."""
    return f"{min(float(f'{value:.2g}'), 0.99):g}" if value < 1 else f"{value:.2f}".rstrip("0").rstrip(".")


def length_rows(args, state) -> list[tuple[str, object]]:
    """Steps and epochs as trained (`trainer.state`), not as planned in the arguments."""
    step, epoch = getattr(state, "global_step", None), getattr(state, "epoch", None)
    if not step:
        planned = f"max_steps {args.max_steps}" if args.max_steps > 0 else f"{number(args.num_train_epochs)} epochs"
        return [("training length (as set; the steps run were not recorded)", planned)]
    planned = getattr(state, "max_steps", None) or 0
    rows = [("training steps", step if planned <= step else f"{step} (of {planned} planned)")]
    if epoch is not None:
        rows.append(("epochs", number(epoch) + (" (less than one pass over the training data)" if epoch < 1 else "")))
    return rows


def adapter_settings(adapter: dict) -> str:
    targets = adapter.get("target_modules")
    targets = ", ".join(sorted(targets)) if isinstance(targets, (list, set, tuple)) else targets
    return f"r {adapter.get('r')}, alpha {adapter.get('lora_alpha')}, on {targets}; the reward head trained in full"


def evaluation_section(metrics: dict, report: dict | None, plots: dict[str, str], data: str | None = None) -> str:
    """The last evaluation as a table; the `evaluate` command's report and plots when they sit beside the model.
    `data`: the evaluation data's name (`dataset_label`)."""
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
    lines = ([f"On {data}:", ""] if data else []) + ["| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value:.4f} |" if isinstance(value, float) else f"| {name} | {value} |"
              for name, value in rows if value is not None]
    # The report's probes (the same pairs as the table above), else the last eval's.
    lines += probe_table((report or {}).get("probes") or {
        k.removeprefix("eval_"): v for k, v in metrics.items() if k.startswith(("eval_probe_", "probe_"))})
    lines += attribute_table(source)
    lines += [f"\n![{name}]({path})" for name, path in plots.items()]
    return "\n".join(lines)


def attribute_table(source: dict) -> list[str]:
    """A multi-attribute model's per-attribute metrics (`attribute_training.evaluation_metrics`) as a table, one row
    per attribute; [] for any other model."""
    names = [k.removeprefix("pearson_") for k in source if k.startswith("pearson_")]
    if not names:
        return []

    def shown(value):
        return f"{value:.4f}" if isinstance(value, float) else "n/a" if value is None else str(value)

    lines = ["", "Per attribute, against the expert scores of every evaluated response, and pair accuracy over the "
             "pairs whose expert scores differ on that attribute (the accuracy above is the combined reward's, on the "
             "overall preference):", "", "| attribute | Pearson | Spearman | Kendall | pair accuracy | pairs |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {name} | " + " | ".join(shown(source.get(f"{metric}_{name}")) for metric in
                                         ("pearson", "spearman", "kendall", "pair_accuracy", "pairs")) + " |"
              for name in names]
    return lines


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


def use_section(output_dir: str, repo: str | None, base_model: str | None, adapter: dict | None) -> str:
    """How to load and call the model; for adapters, code that loads them wherever it runs."""
    model = repo or os.path.basename(os.path.abspath(output_dir))
    where = "" if repo else f"Below, `{model}` stands for this folder: give its path (or, once pushed, its Hub id)."
    if adapter is None:
        return USE_MODEL.format(where=where + "\n\n" if where else "", model=model, example=EXAMPLE)
    kind, public = describe_path(base_model)
    if kind == "hub":
        base_line = f'base_model = "{public}"'
    elif kind == "package":
        base_line = ("from hf_balanced_reward.paths import resolve_model_path  # package:NAME/DIR -> its folder\n"
                     f'base_model = resolve_model_path("{public}")')
    else:
        base_line = f'base_model = "{public or "BASE_MODEL"}"  # the base model\'s folder: give its path'
    merged = not repo and os.path.isfile(os.path.join(output_dir, "merged", "config.json"))
    paragraphs = [f"This folder holds **LoRA adapters** and the trained reward head, not a full model: they load on "
                  f"top of the base model, {base_model_label(base_model)}. {where}".rstrip()]
    if merged:
        paragraphs.append(MERGED_CODE.format(model=model))
    elif not repo:
        paragraphs.append("`trainer.save_merged_model(DIR)` (the CLI's `--use_peft` runs write it to `merged/`) saves "
                          "the adapters folded into the base weights: a model that loads with plain transformers.")
    paragraphs.append(PEFT_CODE.format(base_line=base_line, model=model, example=EXAMPLE))
    saved_base = adapter.get("base_model_name_or_path") or ""
    if describe_path(saved_base)[0] == "hub":
        paragraphs.append(f'`AutoPeftModelForSequenceClassification.from_pretrained("{model}", num_labels=1)` also '
                          "works anywhere: adapter_config.json names the base model by its Hub id.")
    else:
        saved_as = ("its path on the machine that trained it" if os.path.isabs(saved_base) else
                    "a path relative to the directory training ran in")
        paragraphs.append(f"adapter_config.json names the base model by {saved_as}, so "
                          f'`AutoPeftModelForSequenceClassification.from_pretrained("{model}")` and '
                          f'`pipeline(model="{model}")` find it only there; elsewhere, name the base model as above, '
                          "or set `base_model_name_or_path` in adapter_config.json to its Hub id or absolute path.")
    paragraphs.append("As the reward of trl's GRPO, scoring each completion exactly as training did: "
                      "`GRPOTrainer(..., reward_funcs=hf_balanced_reward.reward_function(model, tokenizer))`, with "
                      "`model` and `tokenizer` from above. To rerank or filter (`hf-balanced-reward score`) or as the "
                      "reward model of trl's PPO, use the merged model" + (f" (`{model}/merged`)." if merged else "."))
    return "\n\n".join(paragraphs)


def write_model_card(output_dir: str, args, base_model: str | None, metrics: dict, data_report: dict,
                     repo: str | None = None, balance: dict | None = None, normalization: dict | None = None,
                     model_tags=(), state=None, datasets: dict[str, str] | None = None) -> str:
    """Write `output_dir/README.md`; returns its path. `metrics` are the last eval metrics (eval_* keys);
    `balance` is the balanced loss's summary (fitted length slopes, unit weights); `normalization` the reward
    standardisation folded into the head (`normalize_rewards`); `state` the trainer's `TrainerState` (steps and
    epochs as trained); `datasets` each dataset's name as the card shows it, by role ('train', 'eval' or an eval
    set's name), made with `dataset_label`."""
    datasets = {role: name for role, name in (datasets or {}).items() if name}
    report_path = os.path.join(output_dir, "eval_report.json")
    report = None
    if os.path.isfile(report_path):
        with open(report_path, encoding="utf-8") as f:
            report = json.load(f)
    adapter = None
    if os.path.isfile(os.path.join(output_dir, "adapter_config.json")):
        with open(os.path.join(output_dir, "adapter_config.json"), encoding="utf-8") as f:
            adapter = json.load(f)
    train = data_report.get("train", {})
    settings = [("base model", base_model_label(base_model))]
    settings += [("training data" if role == "train" else "evaluation data" if role == "eval" else
                  f"evaluation data ({role})", name) for role, name in datasets.items()]
    settings += [
        ("loss", args.loss_type),
        ("loss options", json.dumps(args.loss_kwargs) if args.loss_kwargs else "defaults"),
        ("groups from", args.group_column or "none (one group)"),
        ("reward centring coefficient", args.center_rewards_coefficient or "off"),
        ("max_length", saved_config(output_dir).get("reward_max_length") or args.max_length),  # as cut
        *length_rows(args, state),
        ("learning rate", args.learning_rate),
        ("batch size per device", args.per_device_train_batch_size),
        ("training lists" if "lists" in train else "training responses" if "responses" in train else
         "training pairs", train.get("lists", train.get("responses", train.get("pairs", "unknown")))),
        ("rows dropped", sum(train.get("dropped", {}).values()) if train else "unknown"),
    ]
    if getattr(args, "attributes", None):
        settings.append(("attributes (head outputs) and reward_weights", ", ".join(
            f"{name} {weight:g}" for name, weight in zip(args.attributes, args.reward_weights))))
        if args.export_combined:
            settings.append(("one-output model of the weighted sum", "`combined/` beside this model"))
    if adapter is not None:
        settings.append(("LoRA adapters", adapter_settings(adapter)))
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
    public = public_name(base_model)
    title = ("LoRA adapters of a reward model" if adapter is not None else "Reward model") + (
        f": {public.removeprefix('package:')}" if public else "") + f" trained with the {args.loss_type} loss"
    summary = ("A reward model: it reads a prompt and a response and returns one number, higher for the response "
               f"people prefer. Trained with `hf_balanced_reward` ({loss_line}).")
    summary += f" Base model: {base_model_label(base_model)}." if public else ""
    summary += f" Training data: {datasets['train']}." if "train" in datasets else ""
    eval_data = dataset_label(report.get("dataset")) if report else datasets.get("eval")
    text = CARD.format(
        metadata=card_metadata(base_model, args.loss_type, model_tags, datasets.values(), adapter is not None).strip(),
        title=title,
        summary=summary,
        training_rows="\n".join(f"| {name} | {value} |" for name, value in settings),
        evaluation=evaluation_section(metrics, report, report_plots(output_dir, report), eval_data),
        use=use_section(output_dir, repo, base_model, adapter).rstrip()
        + "\n\nThe model scores the text's last token; texts are scored as rendered"
        + (", with the eos token appended." if args.append_eos_token else " (no eos token appended)."),
    )
    path = os.path.join(output_dir, "README.md")
    ModelCard(text).save(path)
    return path


def saved_config(output_dir: str) -> dict:
    """The saved model's config.json (it holds `reward_max_length`, the cut training used; an adapter folder has
    none, its merged model has), or {}."""
    for path in (os.path.join(output_dir, "config.json"), os.path.join(output_dir, "merged", "config.json")):
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
    return {}


def report_plots(output_dir: str, report: dict | None) -> dict[str, str]:
    """The report's plots that are in `output_dir` (their paths are relative to it)."""
    return {name: path for name, path in (report or {}).get("plots", {}).items()
            if os.path.isfile(os.path.join(output_dir, path))}


EVALUATION = re.compile(r"(\n## Evaluation\n\n)(.*?)(\n\n## Use\n)", re.S)


def refresh_evaluation(output_dir: str, report: dict | None = None) -> str | None:
    """Rewrite the evaluation section of the card in `output_dir` from an `evaluate` report (default: the folder's
    eval_report.json); the rest of the card stays as training wrote it. The report's plots are linked when they are
    in `output_dir` (paths relative to it); `report["dataset"]`, when present, is the evaluation data's name as given
    (a hub id or path). Returns the card's path, or None when the folder has no card written by this package."""
    path = os.path.join(output_dir, "README.md")
    if report is None and os.path.isfile(os.path.join(output_dir, "eval_report.json")):
        with open(os.path.join(output_dir, "eval_report.json"), encoding="utf-8") as f:
            report = json.load(f)
    if not report or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not EVALUATION.search(text):
        return None
    section = evaluation_section({}, report, report_plots(output_dir, report), dataset_label(report.get("dataset")))
    text = EVALUATION.sub(lambda match: match.group(1) + section + match.group(3), text, count=1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def write_trainer_card(trainer, output_dir: str, repo: str | None = None) -> str:
    """`write_model_card` with what the trainer knows: its last eval metrics, data report, balanced loss summary,
    reward normalisation, Hub tags, state and dataset names."""
    evals = [log for log in trainer.state.log_history if any(k.startswith("eval_") for k in log)]
    balance = trainer.balance.summary() if trainer.balance is not None else None
    config = trainer.accelerator.unwrap_model(trainer.model).config
    return write_model_card(output_dir, trainer.args, trainer.base_model_name, evals[-1] if evals else {},
                            trainer.data_report, repo, balance, getattr(config, "reward_normalization", None),
                            getattr(trainer.model, "model_tags", None) or (), state=trainer.state,
                            datasets=trainer.dataset_names)


def push_output_dir(trainer, commit_message: str, blocking: bool, token: str | None, revision: str | None):
    """The trainer's push_to_hub: save, write the card, upload exactly `hub_files` of output_dir to hub_model_id."""
    from huggingface_hub import HfApi

    if trainer.hub_model_id is None:
        trainer.init_hf_repo(token=token)
    trainer.save_model(_internal_call=True)
    if not trainer.is_world_process_zero():
        return None
    trainer.create_model_card()
    args = trainer.args
    return HfApi().upload_folder(
        repo_id=trainer.hub_model_id, folder_path=args.output_dir, commit_message=commit_message,
        token=token or args.hub_token, revision=revision or args.hub_revision,
        allow_patterns=hub_files(args.output_dir), run_as_future=not blocking,
    )
