"""Multi-attribute reward heads (ArmoRM / SteerLM style): one head output per attribute (helpfulness, coherence,
verbosity, ...), trained on per-attribute scores, then folded into a one-output reward model.

An attribute model's rewards are [N, A], one column per attribute in the order of its config's `id2label`
(`set_attribute_labels`). The pieces, each usable alone:
- data: `check_attribute_values`, before tokenisation: the columns exist and hold finite numbers;
- losses: in `losses.py` with the others (LOSSES): `regression` (per response), `attribute_bradley_terry` (per
  pair, oriented per attribute, ties pulled together) and `attribute_loss` (their weighted sum); the trainer's use
  of them is `attribute_training.py`;
- the reward: `check_reward_weights`, then `combine_head` / `save_combined` fold sum_a w_a * output_a into one
  Linear output, so every one-output client (`scoring.py`, `pipeline`, trl) reads the combined model unchanged;
- `attribute_metrics`: correlation with expert scores and pairwise accuracy, per attribute.
"""

import copy
import logging
import math
import numbers

import numpy as np
import torch
from accelerate.utils import is_peft_model
from scipy import stats

from .errors import ConfigError, DataError, did_you_mean
from .metrics import metric_name
from .modeling import find_reward_head
from .row_checks import FLOAT32_MAX, STOP_ON, bad_rows_error

logger = logging.getLogger(__name__)

SIDES = ("chosen", "rejected")  # a pair's per-completion columns: `<attribute>_chosen`, `<attribute>_rejected`
COMBINED_LABEL = "reward"


# Data -----------------------------------------------------------------------------------------------------------


def attribute_columns(columns, attribute: str) -> list[str]:
    """The columns that hold `attribute`: the column of that name, else a pair's `<attribute>_chosen` and
    `<attribute>_rejected`; [] when neither is there."""
    if attribute in columns:
        return [attribute]
    sides = [f"{attribute}_{side}" for side in SIDES]
    return sides if all(column in columns for column in sides) else []


def value_problem(value) -> str | None:
    """What is wrong with one attribute value or weight, or None for a finite real number within float32's range
    (the loss reads targets as float32, where a larger value becomes inf)."""
    if value is None:
        return "is null"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        return f"is {shown} ({type(value).__name__}), not a number"
    try:
        number = float(value)
    except OverflowError:  # an int beyond float64
        number = math.inf
    if math.isnan(number):
        return "is NaN"
    if abs(number) > FLOAT32_MAX:
        return f"is {value!r}: infinite, or beyond float32's range (magnitude up to 3.4e38)"
    return None


def cell_problem(value, column: str, size: int | None) -> str | None:
    """What is wrong with a row's value in `column`: one number, or a list of numbers, one per completion of a list
    row (`size` is the row's number of completions, None on rows without a `completions` list)."""
    if isinstance(value, (list, tuple)):
        if size is not None and len(value) != size:
            return f"column '{column}' has {len(value)} entries for {size} completions; give one per completion"
        if not value:
            return f"column '{column}' is an empty list"
        for k, item in enumerate(value):
            if problem := value_problem(item):
                return f"column '{column}' item {k} {problem}"
        return None
    if size is not None and value is not None:
        return f"column '{column}' is one number for a list of {size} completions; give one per completion"
    problem = value_problem(value)
    return problem and f"column '{column}' {problem}"


def check_attribute_values(dataset, attributes: list[str], name: str, on_bad_rows: str = "error"):
    """(dataset, dropped): DataError when an attribute has no column (naming it and the columns present); rows
    whose values are not finite numbers stop the run ('error', 'auto'; naming the first rows, 0-based as the
    dataset given numbers them: check before any filtering, columns and values) or are dropped and counted
    ('skip'). An attribute's column is the one of its name (a number, or a list of one per completion on
    `completions` rows) or, for pairs, `<attribute>_chosen` and `<attribute>_rejected`."""
    if on_bad_rows not in STOP_ON:
        raise ConfigError(f"on_bad_rows='{on_bad_rows}' is not an option{did_you_mean(on_bad_rows, STOP_ON)}; "
                          f"choose one of: {', '.join(STOP_ON)}.")
    columns = dataset.column_names
    checked = []
    for attribute in attributes:
        found = attribute_columns(columns, attribute)
        if not found:
            raise DataError(
                f"{name} dataset has no column for attribute '{attribute}' (a column '{attribute}', or "
                f"'{attribute}_chosen' and '{attribute}_rejected' for pairs){did_you_mean(attribute, columns)}; its "
                f"columns are {columns}. Add the column, or remove '{attribute}' from the attributes."
            )
        checked += found
    sizes = ([len(c) if isinstance(c, (list, tuple)) else None for c in dataset["completions"]]
             if "completions" in columns else [None] * len(dataset))  # a list of scores has one per completion
    values = {column: list(dataset[column]) for column in checked}
    problems = (next(filter(None, (cell_problem(values[c][row], c, sizes[row]) for c in checked)), None)
                for row in range(len(dataset)))
    bad = [(row, problem) for row, problem in enumerate(problems) if problem]
    stopping = [(row, problem) for row, problem in bad if STOP_ON[on_bad_rows](problem)]  # 'auto' stops on all
    if stopping:
        raise bad_rows_error(name, stopping, len(dataset))
    if not bad:
        return dataset, 0
    logger.warning(f"{name} dataset: dropped {len(bad)} of {len(dataset)} rows whose attribute scores are not "
                   f"finite numbers (first: row {bad[0][0]}: {bad[0][1]}; on_bad_rows={on_bad_rows}).")
    dropped = {row for row, _ in bad}
    return dataset.select([row for row in range(len(dataset)) if row not in dropped]), len(bad)


def check_reward_weights(weights, attributes) -> list[float]:
    """`reward_weights` as A floats in the order of `attributes`: None gives equal weights 1/A; else a list of A
    numbers or a mapping {attribute: weight}. A negative weight is allowed (ArmoRM-style penalty on verbosity);
    all zero is refused, as it scores every text 0."""
    names = list(attributes)
    if not names:
        raise ConfigError("reward_weights needs the attribute names, and none were given; name the head's outputs "
                          "(set_attribute_labels).")
    expected = f"{len(names)} numbers, one per attribute ({', '.join(names)})"
    if weights is None:
        return [1.0 / len(names)] * len(names)
    if isinstance(weights, dict):
        unknown, missing = [k for k in weights if k not in names], [n for n in names if n not in weights]
        if unknown or missing:
            raise ConfigError(f"reward_weights must give a weight to each attribute ({', '.join(names)}); "
                              + "; ".join(f"{what}: {', '.join(map(str, keys))}" for what, keys in
                                          (("unknown", unknown), ("missing", missing)) if keys) + ".")
        weights = [weights[n] for n in names]
    if isinstance(weights, (np.ndarray, torch.Tensor)):
        weights = weights.tolist()
    if not isinstance(weights, (list, tuple)) or len(weights) != len(names):
        size = f" ({len(weights)} given)" if isinstance(weights, (list, tuple)) else ""
        raise ConfigError(f"reward_weights must be {expected}; got {weights!r}{size}.")
    for k, weight in enumerate(weights):
        if problem := value_problem(weight):
            raise ConfigError(f"reward_weights must be {expected}; entry {k} ({names[k]}) {problem}.")
    if not any(weights):
        raise ConfigError(f"reward_weights are all zero, so every text would score 0; give {expected}, at least "
                          "one of them not zero.")
    return [float(weight) for weight in weights]


# Head and config ----------------------------------------------------------------------------------------------------


def set_attribute_labels(config, attributes: list[str]):
    """Name the head's outputs: num_labels = A, id2label {i: name}, label2id, so that
    `pipeline("text-classification", top_k=None, function_to_apply="none")` returns every attribute by name."""
    names = list(attributes)
    if not names or not all(isinstance(n, str) and n.strip() for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"attributes must be distinct, non-empty names, one per head output; got {names!r}.")
    config.id2label = dict(enumerate(names))  # num_labels follows id2label
    config.label2id = {n: i for i, n in enumerate(names)}
    return config


def attribute_names(config) -> list[str]:
    """The head's outputs by name, in order."""
    return [config.id2label[i] for i in range(config.num_labels)]


def _final_linear(model, head_name: str, head) -> tuple[torch.nn.Module, str]:
    """(module, attribute name) of the head's last Linear: the head itself, or its `out_proj`."""
    if isinstance(head, torch.nn.Linear):
        return model, head_name
    if isinstance(getattr(head, "out_proj", None), torch.nn.Linear):
        return head, "out_proj"
    raise ConfigError(f"combine_head folds the weights into a Linear reward head; {type(model).__name__}'s "
                      f"'{head_name}' is a {type(head).__name__} with no Linear 'out_proj' as its last layer.")


def combine_head(model, weights):
    """A new model (a deep copy) with one output, sum_a w_a * output_a, for the attribute model `model`.

    The last Linear layer (W [A, H], b [A]) becomes Linear(H, 1) with weight w @ W and bias w @ b (computed in
    float64, stored in the head's dtype), so the output equals the weighted sum up to float rounding. Supported
    heads: a Linear (decoders' `score`, BERT-like `classifier`) or a head whose last layer is a Linear `out_proj`
    (RoBERTa / XLM-R / ELECTRA: dense, tanh, out_proj). Refused (ConfigError): any other head, a quantised head,
    a PEFT model (merge the adapters first), a head whose outputs disagree with the config. `weights`: as
    `check_reward_weights` takes them, by the config's `id2label` names. The config records
    `reward_attributes` = {"names": [...], "weights": [...]}; `model` is left unchanged.
    """
    if is_peft_model(model):
        raise ConfigError("combine_head takes a plain model; merge its LoRA adapters first (merge_and_unload(), "
                          "or save it merged with modeling.save_merged) and combine the merged model.")
    names = attribute_names(model.config)
    weights = check_reward_weights(weights, names)
    combined = copy.deepcopy(model)
    head_name, head = find_reward_head(combined)
    owner, layer_name = _final_linear(combined, head_name, head)
    layer = getattr(owner, layer_name)
    if not layer.weight.dtype.is_floating_point:
        raise ConfigError(f"the reward head is quantised ({layer.weight.dtype}); load the model unquantised to "
                          "combine its head.")
    if layer.out_features != len(names):
        raise ConfigError(f"the reward head has {layer.out_features} outputs but the config names {len(names)} "
                          f"attributes ({', '.join(names)}); set the labels with set_attribute_labels.")
    w = torch.tensor(weights, dtype=torch.float64, device=layer.weight.device)
    new = torch.nn.Linear(layer.in_features, 1, bias=layer.bias is not None, device=layer.weight.device,
                          dtype=layer.weight.dtype)
    with torch.no_grad():
        new.weight.copy_((w @ layer.weight.double()).unsqueeze(0))
        if layer.bias is not None:
            new.bias.copy_((w @ layer.bias.double()).reshape(1))
    setattr(owner, layer_name, new)
    combined.config.id2label = {0: COMBINED_LABEL}
    combined.config.label2id = {COMBINED_LABEL: 0}
    combined.config.reward_attributes = {"names": names, "weights": weights}
    if hasattr(combined, "num_labels"):  # *ForSequenceClassification keeps its own copy for the loss
        combined.num_labels = 1
    return combined


def save_combined(model, tokenizer, weights, output_dir: str):
    """`combine_head(model, weights)` saved with the tokenizer (save_pretrained): a one-output reward model that
    `scoring.load_reward_model` and `pipeline` read as any other. Returns the combined model."""
    combined = combine_head(model, weights)
    if combined.config.pad_token_id is None:  # batched scoring pools the last token that is not padding
        combined.config.pad_token_id = tokenizer.pad_token_id
    combined.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return combined


# Metrics ----------------------------------------------------------------------------------------------------------


def _correlations(predicted, expert) -> tuple[float, float, float]:
    """Pearson, Spearman and Kendall's tau-b (ties counted in), NaN where undefined: fewer than 2 points, a
    constant side or a non-finite prediction."""
    if len(expert) < 2 or not np.isfinite(predicted).all() or np.ptp(predicted) == 0 or np.ptp(expert) == 0:
        return math.nan, math.nan, math.nan
    return (float(stats.pearsonr(predicted, expert).statistic), float(stats.spearmanr(predicted, expert).statistic),
            float(stats.kendalltau(predicted, expert).statistic))


def attribute_metrics(predicted, expert, names, pairs=None) -> dict:
    """Per attribute: `pearson_<name>`, `spearman_<name>`, `kendall_<name>` of predicted against expert scores
    [N, A] over the rows with a finite expert score (`scored_<name>` counts them); with `pairs` ((i, j) row
    indices), `pair_accuracy_<name>`: the share of pairs whose expert scores differ that the prediction orders the
    same way, strictly (a predicted tie is wrong, as in `metrics.pair_metrics`), over `pairs_<name>` such pairs.
    A non-finite prediction is kept: it makes the correlations NaN and its pairs wrong."""
    predicted, expert = np.asarray(predicted, dtype=np.float64), np.asarray(expert, dtype=np.float64)
    if predicted.shape != expert.shape or predicted.ndim != 2 or predicted.shape[1] != len(names):
        raise ValueError(f"predicted and expert must both be [rows, {len(names)}] (one column per name); got "
                         f"{predicted.shape} and {expert.shape}.")
    if pairs is not None:
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        if pairs.size and (pairs.min() < 0 or pairs.max() >= len(expert)):
            raise ValueError(f"pairs must index rows 0..{len(expert) - 1}; got indices {pairs.min()}..{pairs.max()}.")
    metrics = {}
    for a, name in enumerate(names):
        key = metric_name(name)
        scored = np.isfinite(expert[:, a])
        pearson, spearman, kendall = _correlations(predicted[scored, a], expert[scored, a])
        metrics.update({f"pearson_{key}": pearson, f"spearman_{key}": spearman, f"kendall_{key}": kendall,
                        f"scored_{key}": int(scored.sum())})
        if pairs is not None:
            gap = expert[pairs[:, 0], a] - expert[pairs[:, 1], a]
            counted = np.isfinite(gap) & (gap != 0)
            agree = np.sign(predicted[pairs[:, 0], a] - predicted[pairs[:, 1], a]) == np.sign(gap)
            metrics[f"pair_accuracy_{key}"] = float(agree[counted].mean()) if counted.any() else math.nan
            metrics[f"pairs_{key}"] = int(counted.sum())
    return metrics
