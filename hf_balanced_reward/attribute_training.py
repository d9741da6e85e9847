"""Training and evaluating a multi-attribute reward model (`attributes` in the config): what the trainer hands on to
when its loss is an attribute loss (`losses.ATTRIBUTE_LOSS_NAMES`).

The targets travel with the rows: `with_attribute_scores` checks the attribute columns (`attributes.
check_attribute_values`, before tokenisation, rows named as the user's) and adds `attribute_scores`, one list of A
scores per completion in the row's completion order (a pair: chosen, then rejected); the collator stacks them into
[rows, Kmax, A], NaN in padded slots. The head gives rewards [rows, K, A] (`forward.score_attributes`);
`row_losses` here turns them into one loss per row; `combined` folds them with `reward_weights` into the one reward
[rows, K] that every pair and list metric reads, so accuracy is the combined reward's on the overall preference.
`evaluation_metrics` adds each attribute's correlations with the expert scores and its pair accuracy.
"""

import copy
import hashlib
import json
import logging
import os

import numpy as np
import torch
from accelerate.utils import is_peft_model

from .attributes import attribute_metrics, check_attribute_values, save_combined
from .errors import ConfigError, DataError
from .forward import score_attributes
from .losses import LOSSES
from .preparation import ATTRIBUTE_COLUMN, KEY_COLUMN  # per prepared row: K lists of A floats, K content hashes

logger = logging.getLogger(__name__)

COMBINED_DIR = "combined"  # export_combined writes the one-output model to output_dir/combined
BAD_SCORES = "attribute score not a finite number"  # the report's reason for rows dropped by on_bad_rows: skip


# Data -----------------------------------------------------------------------------------------------------------


def is_single_responses(dataset) -> bool:
    """Rows that score one response each: `prompt` and `response`, no pairs or lists."""
    columns = set(dataset.column_names)
    return {"prompt", "response"} <= columns and not columns & {"chosen", "rejected", "completions", "chosen_ids"}


def content_key(prompt, response) -> int:
    """A 63-bit hash of a completion's prompt and response (text, messages or token ids): the same response in two
    rows, as a SummEval summary in several pairs, is one response to the per-attribute metrics."""
    text = json.dumps([prompt, response], sort_keys=True, default=str)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


def with_attribute_scores(dataset, args, name: str) -> tuple:
    """(dataset with `attribute_scores` and `completion_keys`, rows dropped): the attribute columns checked (a
    missing column or a value that is not a finite number is refused naming the row, column and value, or the row
    dropped with on_bad_rows: skip), then each row's scores and content keys gathered per completion."""
    from datasets import IterableDataset

    if isinstance(dataset, IterableDataset):
        raise ConfigError(f"attributes: the {name} dataset is streamed; attribute scores are checked over the whole "
                          "set before training, so load it in memory (streaming: false).")
    columns = dataset.column_names
    single = is_single_responses(dataset)
    if "completions" not in columns and not single and not ({"chosen", "rejected"} <= set(columns)
                                                            or {"chosen_ids", "rejected_ids"} <= set(columns)):
        raise DataError(f"attributes: the {name} dataset has no pairs ('chosen', 'rejected'), lists ('completions') "
                        f"or scored responses ('prompt', 'response'); its columns are {columns}.")
    if single and args.loss_type != "regression":
        raise DataError(f"the {name} dataset scores one response per row ('prompt', 'response'), and "
                        f"loss_type='{args.loss_type}' compares responses within a row; train it with regression, "
                        "or give pairs or lists.")
    lists = "completions" in columns
    if not lists and not single:  # a pair's scores are per response: `<attribute>_chosen` and `<attribute>_rejected`
        for attribute in args.attributes:
            sides = [f"{attribute}_chosen", f"{attribute}_rejected"]
            if attribute in columns and not all(c in columns for c in sides):
                raise DataError(f"{name} dataset: attribute '{attribute}' is one column on pairs; give each "
                                f"response its score in '{sides[0]}' and '{sides[1]}'.")
        dataset = dataset.remove_columns([a for a in args.attributes if a in columns])
    dataset, dropped = check_attribute_values(dataset, args.attributes, name, args.on_bad_rows)

    def gather(example):
        if single:
            per_attribute = [[float(example[a])] for a in args.attributes]
            responses = [example["response"]]
        elif lists:
            per_attribute = [[float(v) for v in example[a]] for a in args.attributes]
            responses = example["completions"]
        else:
            per_attribute = [[float(example[f"{a}_chosen"]), float(example[f"{a}_rejected"])]
                             for a in args.attributes]
            responses = [example[c] for c in (("chosen", "rejected") if "chosen" in example else
                                              ("chosen_ids", "rejected_ids"))]
        return {ATTRIBUTE_COLUMN: [list(scores) for scores in zip(*per_attribute)],
                KEY_COLUMN: [content_key(example.get("prompt"), response) for response in responses]}

    return dataset.map(gather, desc=f"Attribute scores of {name}"), dropped


def prepare_responses(dataset, tokenizer, args, name: str, max_length) -> tuple:
    """(prepared rows, report) of a dataset of single scored responses: each row a one-completion list (K = 1)
    rendered, tokenised and cut exactly as `score` and `reward_function` cut one text (`scoring.tokenize_with_cuts`);
    a row whose prompt or response is not text stops the run or is dropped (on_bad_rows), named by row."""
    from datasets import Dataset

    from .row_checks import STOP_ON, bad_rows_error, template_options_problem, text_problem
    from .scoring import tokenize_with_cuts

    if len(dataset) == 0:
        raise DataError(f"{name} dataset is empty: it has no rows.")
    problems = []
    for row, example in enumerate(dataset):
        problem = next((f"column '{c}' {p}" for c in ("prompt", "response") if (p := text_problem(
            example[c], allow_empty=c == "prompt" or args.on_bad_rows != "error"))), None)
        if problem is None and isinstance(example["prompt"], str) != isinstance(example["response"], str):
            problem = "columns prompt, response mix plain text and message lists"
        problems.append(problem or template_options_problem(example))
    bad = [(row, problem) for row, problem in enumerate(problems) if problem]
    if stopping := [(row, problem) for row, problem in bad if STOP_ON[args.on_bad_rows](problem)]:
        raise bad_rows_error(name, stopping, len(dataset))
    kept = [row for row, problem in enumerate(problems) if not problem]
    if not kept:
        raise DataError(f"{name} dataset has no usable responses left: all {len(dataset)} rows were dropped.")
    rows = dataset.select(kept)
    options = [{c: example[c] for c in ("tools", "chat_template_kwargs") if example.get(c) is not None}
               for example in rows]
    ids, cuts = tokenize_with_cuts(rows["prompt"], rows["response"], tokenizer, max_length, args.append_eos_token,
                                   options)
    group = args.group_column
    prepared = {"completion_ids": [[sequence] for sequence in ids], "ranks": [[1]] * len(ids),
                "group": [str(g) for g in rows[group]] if group else ["all"] * len(ids),
                "response_lengths": [[1]] * len(ids), "length": [len(sequence) for sequence in ids],
                ATTRIBUTE_COLUMN: rows[ATTRIBUTE_COLUMN], KEY_COLUMN: rows[KEY_COLUMN]}
    if "weight" in rows.column_names:
        prepared["weight"] = [float(w) for w in rows["weight"]]
    dropped = {}
    for _, problem in bad:
        dropped[problem] = dropped.get(problem, 0) + 1
    report = {"rows": len(dataset), "responses": len(ids), "truncated": sum(c != "kept" for c in cuts),
              "empty_responses": 0, "dropped": dropped}
    return Dataset.from_dict(prepared), report


def standardization(dataset, attributes) -> tuple[list[float], list[float]]:
    """(mean [A], std [A]) of every completion's scores in a prepared dataset, for loss_kwargs standardize: true."""
    scores = np.array([s for row in dataset[ATTRIBUTE_COLUMN] for s in row], dtype=np.float64)
    std = scores.std(0)
    if not (std > 0).all():
        flat = [a for a, s in zip(attributes, std) if not s > 0]
        raise DataError(f"loss_kwargs standardize: attribute(s) {', '.join(flat)} have one value throughout the "
                        "train set, so there is no scale to standardise; drop the attribute or set standardize: "
                        "false.")
    return scores.mean(0).tolist(), std.tolist()


# Losses -----------------------------------------------------------------------------------------------------------


def loss_options(args, train_dataset=None) -> dict:
    """The attribute loss's options from `loss_kwargs`: `standardize: true` becomes the train set's (mean, std)."""
    options = dict(args.loss_kwargs)
    standardize = options.get("standardize")
    if standardize is True:
        if train_dataset is None:
            raise ConfigError("loss_kwargs standardize: true measures each attribute on the train set; give one "
                              "(or give standardize as [[means], [stds]]).")
        options["standardize"] = standardization(train_dataset, args.attributes)
    elif standardize is False:
        options.pop("standardize")
    return options


def row_losses(loss_type: str, options: dict, rewards, targets, mask) -> torch.Tensor:
    """One loss per row [rows] from per-attribute rewards and targets [rows, K, A] and the completion mask
    [rows, K]: `regression`, the mean over the row's completions; a pair loss, the mean over every pair of its
    completions (a pair row has one), each oriented per attribute by the scores (`attribute_bradley_terry`)."""
    rewards, targets = rewards.float(), targets.float()
    if loss_type == "regression":
        per_completion = LOSSES["regression"](rewards.flatten(0, 1), targets.flatten(0, 1), None,
                                              options.get("standardize")).view(mask.shape)
        return torch.where(mask, per_completion, 0.0).sum(-1) / mask.sum(-1).clamp(min=1)
    first, second = torch.triu_indices(mask.shape[1], mask.shape[1], offset=1, device=mask.device)
    per_pair = LOSSES[loss_type](rewards[:, first].flatten(0, 1), rewards[:, second].flatten(0, 1),
                                 targets[:, first].flatten(0, 1), targets[:, second].flatten(0, 1),
                                 **options).view(mask.shape[0], -1)
    real = mask[:, first] & mask[:, second]
    return torch.where(real, per_pair, 0.0).sum(-1) / real.sum(-1).clamp(min=1)


def check_loss_options(loss_type: str, options: dict, attributes) -> None:
    """The loss's options, checked by computing it once on a small list (its own checks name what is wrong)."""
    size = len(attributes)
    options = {k: v for k, v in options.items() if not (k == "standardize" and isinstance(v, bool))}
    try:
        row_losses(loss_type, options, torch.zeros(1, 3, size), torch.ones(1, 3, size),
                   torch.ones(1, 3, dtype=torch.bool))
    except (ValueError, TypeError, RuntimeError) as err:
        raise ConfigError(f"loss_kwargs of loss '{loss_type}': {err}") from err


def combined(rewards, weights, mask) -> torch.Tensor:
    """The one reward [rows, K] = sum_a w_a * reward_a, 0 in padded slots."""
    weights = torch.as_tensor(weights, dtype=torch.float32, device=rewards.device)
    return (rewards.float() @ weights).masked_fill(~mask, 0.0)


def score_and_losses(trainer, model, inputs) -> tuple:
    """(combined rewards [rows, K], what the pair and list metrics read; loss per row [rows]; per-attribute rewards
    [rows, K, A]) of a batch: the attribute run's part of the trainer's one `compute_loss`."""
    per_attribute = score_attributes(model, inputs)
    mask = inputs["list_mask"]
    per_row = row_losses(trainer.args.loss_type, trainer.loss_options, per_attribute, inputs[ATTRIBUTE_COLUMN], mask)
    return combined(per_attribute, trainer.args.reward_weights, mask), per_row, per_attribute


# Evaluation -------------------------------------------------------------------------------------------------------


def distinct_responses(predicted, expert, mask, keys=None) -> tuple:
    """(predicted [N, A], expert [N, A], pairs [P, 2]) over the distinct responses of rows [rows, K, A] (by `keys`
    [rows, K], their content hashes: a summary in several SummEval pairs is one response, with its first
    occurrence's reward; without keys, every completion is its own) and the distinct pairs of them that share a
    row."""
    predicted, expert, mask = np.asarray(predicted), np.asarray(expert), np.asarray(mask) == 1
    rows, slots = np.nonzero(mask)
    keys = np.arange(mask.size).reshape(mask.shape) if keys is None else np.asarray(keys)
    _, first_seen, index = np.unique(keys[rows, slots], return_index=True, return_inverse=True)
    flat = np.full(mask.shape, -1)
    flat[rows, slots] = index.reshape(-1)
    first, second = np.triu_indices(mask.shape[1], k=1)
    both = mask[:, first] & mask[:, second]
    pairs = np.sort(np.stack([flat[:, first][both], flat[:, second][both]], axis=-1), axis=-1).reshape(-1, 2)
    pairs = np.unique(pairs[pairs[:, 0] != pairs[:, 1]], axis=0)  # a row holding one response twice compares nothing
    taken = (rows[first_seen], slots[first_seen])
    return predicted[taken], expert[taken], pairs


def evaluation_metrics(predicted, expert, mask, names, keys=None) -> dict:
    """Per attribute, over the distinct responses of the evaluated rows (`distinct_responses`): Pearson, Spearman and
    Kendall against the expert scores, and the pair accuracy over the distinct pairs that share a row and whose
    expert scores differ (`attributes.attribute_metrics`)."""
    predicted, expert, pairs = distinct_responses(predicted, expert, mask, keys)
    return attribute_metrics(predicted, expert, names, pairs)


# Saving -----------------------------------------------------------------------------------------------------------


def export_combined(trainer, output_dir: str) -> str:
    """Write output_dir/combined: a one-output model whose reward is the weighted sum of the attributes (a LoRA
    model's adapters merged into a copy first)."""
    path = os.path.join(output_dir, COMBINED_DIR)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if is_peft_model(model):
        model = copy.deepcopy(model).merge_and_unload()
    save_combined(model, trainer.processing_class, trainer.args.reward_weights, path)
    logger.info(f"Saved the combined one-output reward model (weights {trainer.args.reward_weights}) to {path}.")
    return path
