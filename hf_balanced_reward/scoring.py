"""Score texts with a saved reward model exactly as training did: `reward_function` (the reward of an RL run, e.g.
trl's `GRPOTrainer(reward_funcs=...)`) and `score_file` / `score_main` (the `score` command: filtering, best-of-n).

One contract for every client: a (prompt, completion) is rendered as training renders a pair (`data.render_texts`:
plain concatenation, or the chat template for conversations), tokenised with the tokenizer's own special tokens
(as training does; trl's built-in reward-model path does not), its prompt cut from the left after the leading
special tokens when it is longer than `max_length` (`preparation.truncate_list`), and the reward is the model's own output
`model(**batch).logits[:, 0]` on right-padded batches, in fp32, under `no_grad`.

A multi-attribute model (one output per attribute, `attributes` in training; its config's `reward_attributes` holds
the names and `reward_weights`) is scored as one reward, sum_a w_a * output_a, the reward its `combined` export
outputs; `per_attribute=True` gives every attribute's reward by name instead.
"""

import argparse
import json
import logging
import os
import sys

import torch
from accelerate import PartialState
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER
from trl.data_utils import common_prefix_length

from .config import ConfigError
from .errors import hub_kernels_hint
from .paths import resolve_model_path
from .data import DataError, load_preference_dataset, render_texts
from .preparation import truncate_list
from .row_checks import MAX_SHOWN, template_options_problem, text_problem

logger = logging.getLogger(__name__)

# Keys of the saved model's config that hold training's text settings; absent in models saved before they existed.
SAVED_MAX_LENGTH = "reward_max_length"
SAVED_APPEND_EOS = "reward_append_eos_token"
SAVED_ATTRIBUTES = "reward_attributes"  # a multi-attribute model's {"names": [...], "weights": [...]}
DEFAULT_BATCH_SIZE = 32


def load_reward_model(model_dir_or_model, tokenizer=None, device=None) -> tuple:
    """(model, tokenizer): a folder or hub id is loaded in fp32 on `device` (default: this process's
    accelerator, as `accelerate` picks it, i.e. the policy's device under `accelerate launch`); a model object is
    moved only when `device` is given."""
    if isinstance(model_dir_or_model, (str, os.PathLike)):
        name = resolve_model_path(str(model_dir_or_model))
        try:
            tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(name)
            # One output, unless the model is a multi-attribute one: then all of them, combined when scoring.
            labels = {} if is_attribute_model(AutoConfig.from_pretrained(name)) else {"num_labels": 1}
            # fp32 and safetensors, as training loads; a pickled checkpoint can run code when it is loaded.
            model = AutoModelForSequenceClassification.from_pretrained(
                name, dtype=torch.float32, use_safetensors=True, **labels
            )
        except (OSError, ValueError) as err:
            raise ConfigError(f"could not load reward model '{name}': {err}{hub_kernels_hint(err)}") from err
        model.to(device if device is not None else PartialState().device)
    else:
        model = model_dir_or_model
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(model.config._name_or_path)
        if device is not None:
            model.to(device)
    if model.config.num_labels != 1 and not is_attribute_model(model.config):
        raise ConfigError(
            f"a reward model has one output, this model has num_labels={model.config.num_labels}; load it with "
            "AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)."
        )
    text_config = model.config.get_text_config()
    if text_config.pad_token_id is None:  # batches need one; the model pools the last token that is not it
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ConfigError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token.")
        text_config.pad_token_id = pad
    return model, tokenizer


def is_attribute_model(config) -> bool:
    """Whether a model's config is a multi-attribute reward model's: several outputs, named and weighted."""
    saved = getattr(config, SAVED_ATTRIBUTES, None)
    return config.num_labels > 1 and isinstance(saved, dict) and len(saved.get("weights") or []) == config.num_labels


def attribute_weights(model) -> list[float] | None:
    """The weights that combine a multi-attribute model's outputs into its reward; None for a one-output model."""
    return getattr(model.config, SAVED_ATTRIBUTES)["weights"] if is_attribute_model(model.config) else None


def combined_rewards(model, by_attribute: list[dict]) -> list[float]:
    """The reward of each {attribute: reward} that `score_ids(..., per_attribute=True)` gave: the outputs @ the
    saved weights in float32 on the model's device, `score_ids`' own op, so one forward pass gives both."""
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    device = next(model.parameters()).device
    outputs = torch.tensor([[one[name] for name in names] for one in by_attribute], dtype=torch.float32,
                           device=device)  # exact: they are float32 values
    return (outputs @ torch.tensor(attribute_weights(model), dtype=torch.float32, device=device)).tolist()


def resolve_max_length(model, tokenizer, max_length: int | None = None) -> int | None:
    """`max_length`, else the one the model was trained with (saved in its config), else the tokenizer's limit;
    capped, as in training, by the model's position limit."""
    if max_length is None:
        max_length = getattr(model.config, SAVED_MAX_LENGTH, None)
    if max_length is None and tokenizer.model_max_length < VERY_LARGE_INTEGER:  # "unset" is 1e30
        max_length = tokenizer.model_max_length
    positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if positions and (max_length is None or max_length > positions):
        if max_length is not None:
            logger.warning(f"max_length={max_length} is more than the model's {positions} positions; "
                           f"using {positions}.")
        max_length = positions
    if max_length is not None and max_length < 2:
        raise ConfigError(f"max_length must be at least 2 (or None for no limit), got {max_length}.")
    return max_length


def tokenize_texts(prompts, completions, tokenizer, max_length, append_eos: bool, options=None) -> list[list[int]]:
    """Token ids of each prompt + completion, rendered, tokenised and truncated as training does. `options`: per
    text, the row's chat template columns (`tools`, `chat_template_kwargs`), as training passes them."""
    all_ids, cuts = tokenize_with_cuts(prompts, completions, tokenizer, max_length, append_eos, options)
    truncated = sum(cut != "kept" for cut in cuts)
    response_cut = sum(cut == "response cut" for cut in cuts)
    if truncated:
        logger.warning(
            f"{truncated} of {len(all_ids)} texts are longer than max_length={max_length}: their prompts were cut "
            "from the left, as in training"
            + (f"; in {response_cut} the response alone is longer (training drops such pairs), so its "
               "first tokens were cut too" if response_cut else "") + "."
        )
    return all_ids


def tokenize_with_cuts(prompts, completions, tokenizer, max_length, append_eos: bool, options=None,
                       allow_empty: bool = False) -> tuple[list[list[int]], list[str]]:
    """`tokenize_texts` without its warning, for a client that reports cuts per text (the `serve` command): (token
    ids, cut) of each text, cut "kept", "truncated" (its prompt was cut from the left) or "response cut" (the
    response alone is longer than max_length, so its first tokens were cut too). A text with no tokens raises
    DataError, or comes back empty with `allow_empty` (the caller names it)."""
    options = options or [{}] * len(prompts)
    rendered = [render_texts({"prompt": p, "chosen": c, "rejected": c, **o}, tokenizer, append_eos)[:2]
                for p, c, o in zip(prompts, completions, options, strict=True)]
    all_ids = tokenizer([text for _, text in rendered])["input_ids"]  # the tokenizer's own BOS/CLS, as in training
    special_ids = set(tokenizer.all_special_ids)
    cuts = ["kept"] * len(all_ids)
    for i, ids in enumerate(all_ids):
        if not ids and not allow_empty:
            raise DataError(f"text {i} has no tokens: its prompt and response are both empty.")
        if max_length is None or len(ids) <= max_length:
            continue
        (fitted, _), status = truncate_list([ids, ids], max_length, special_ids)
        if status == "dropped":
            raise ConfigError(f"max_length={max_length} leaves no room for a response after the leading special "
                              "tokens; use a larger max_length.")
        # Training drops a pair whose response alone is too long; one text has no partner, so its end is kept.
        lead = next((k for k, token in enumerate(ids) if token not in special_ids), len(ids))
        prompt_length = common_prefix_length(tokenizer(rendered[i][0])["input_ids"], ids)
        cuts[i] = "response cut" if len(ids) - max_length > prompt_length - lead else "truncated"
        all_ids[i] = fitted
    return all_ids, cuts


def score_ids(model, all_ids: list[list[int]], batch_size: int, progress: bool = False,
              per_attribute: bool = False) -> list:
    """The model's own reward of each token sequence, in batches of similar length, longest first (a batch that
    does not fit in memory fails at once), right-padded with the model's pad id so its pooling finds each end.
    A multi-attribute model's reward is its outputs weighted by its `reward_weights`; with `per_attribute`, each
    sequence gets {attribute: reward} instead."""
    pad_id = model.config.get_text_config().pad_token_id
    device = next(model.parameters()).device
    order = sorted(range(len(all_ids)), key=lambda i: -len(all_ids[i]))
    rewards = [0.0] * len(all_ids)
    weights = attribute_weights(model)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)] if per_attribute else None
    if weights is not None:
        weights = torch.tensor(weights, dtype=torch.float32, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tqdm(total=len(all_ids), desc="Scoring", unit="text", disable=not progress) as bar:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                input_ids = torch.full((len(rows), len(all_ids[rows[0]])), pad_id, dtype=torch.long)
                attention_mask = torch.zeros_like(input_ids)
                for row, i in enumerate(rows):
                    input_ids[row, : len(all_ids[i])] = torch.tensor(all_ids[i])
                    attention_mask[row, : len(all_ids[i])] = 1
                logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
                if names is not None:
                    values = [dict(zip(names, row)) for row in logits.float().tolist()]
                else:
                    values = (logits[:, 0].float() if weights is None else logits.float() @ weights).tolist()
                for i, reward in zip(rows, values):
                    rewards[i] = reward
                bar.update(len(rows))
    finally:
        model.train(was_training)
    return rewards


def reward_function(model_dir_or_model, tokenizer=None, batch_size: int = DEFAULT_BATCH_SIZE, device=None,
                    max_length: int | None = None, append_eos: bool | None = None, per_attribute: bool = False):
    """A reward for RL: `reward(prompts, completions, **kwargs) -> list[float]`, the signature trl's `GRPOTrainer`
    calls in `reward_funcs` (it also passes `completion_ids` and the dataset's other columns, which are ignored).

    Prompts and completions are plain strings, or message lists for conversations (rendered with the reward
    tokenizer's chat template). Rewards are what training scored for the same text (see the module docstring).
    `max_length` and `append_eos` default to the values saved with the model (`reward_max_length`,
    `reward_append_eos_token` in its config), else the tokenizer's limit and False. The returned function carries
    `model`, `tokenizer`, `max_length` and `append_eos` as attributes.

    A multi-attribute model gives the weighted sum of its attributes (its config's `reward_attributes` weights);
    with `per_attribute=True`, a {attribute: reward} dict per completion instead (not a trl reward then).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}.")
    model, tokenizer = load_reward_model(model_dir_or_model, tokenizer, device)
    max_length = resolve_max_length(model, tokenizer, max_length)
    if append_eos is None:
        append_eos = bool(getattr(model.config, SAVED_APPEND_EOS, False))

    if per_attribute and not is_attribute_model(model.config):
        raise ConfigError("per_attribute=True needs a multi-attribute model (trained with `attributes`); this one has "
                          "one output.")

    def reward(prompts, completions, **kwargs) -> list:
        return score_ids(model, tokenize_texts(prompts, completions, tokenizer, max_length, append_eos), batch_size,
                         per_attribute=per_attribute)

    # trl logs each reward as rewards/<__name__>/mean: name it after the model, as trl names a model it loads.
    name = str(model_dir_or_model) if isinstance(model_dir_or_model, (str, os.PathLike)) else model.config._name_or_path
    reward.__name__ = reward.__qualname__ = os.path.basename(name.rstrip("/")) or "reward_model"
    reward.model, reward.tokenizer, reward.max_length, reward.append_eos = model, tokenizer, max_length, append_eos
    return reward


# --- the score command ----------------------------------------------------------------------------------------------


def check_score_rows(dataset: Dataset, name: str) -> str:
    """The column holding the responses ('response', or 'completions' lists); DataError naming what is wrong."""
    columns = dataset.column_names
    found = [c for c in ("response", "completions") if c in columns]
    if "prompt" not in columns or len(found) != 1:
        problem = ("has no 'prompt' column" if "prompt" not in columns else
                   "has both 'response' and 'completions'" if found else "has no 'response' or 'completions' column")
        raise DataError(
            f"dataset '{name}' {problem}; its columns are {columns}. Scoring needs 'prompt' (use '' to score whole "
            "texts) and either 'response' (one text or message list per row) or 'completions' (a list of them)."
        )
    if len(dataset) == 0:
        raise DataError(f"dataset '{name}' is empty: it has no rows.")
    column = found[0]
    bad = [f"row {row}: {problem}" for row, example in enumerate(dataset)
           if (problem := score_row_problem(example["prompt"], example[column], column)
               or template_options_problem(example))]
    if bad:
        more = f" (and {len(bad) - MAX_SHOWN} more)" if len(bad) > MAX_SHOWN else ""
        raise DataError(f"dataset '{name}' has {len(bad)} bad row(s) of {len(dataset)}: "
                        f"{'; '.join(bad[:MAX_SHOWN])}{more}. Fix or remove them.")
    return column


def score_row_problem(prompt, responses, column: str) -> str | None:
    """What makes a row unscorable, or None. Empty responses are scored (a reranker needs every candidate's score)."""
    if problem := text_problem(prompt, allow_empty=True):
        return f"column 'prompt' {problem}"
    if column == "response":
        responses = [responses]
    elif not isinstance(responses, list) or not responses:
        return "column 'completions' is not a non-empty list of responses"
    for k, response in enumerate(responses):
        where = "response" if column == "response" else f"completions[{k}]"
        if problem := text_problem(response, allow_empty=True):
            return f"column '{where}' {problem}"
        if isinstance(prompt, str) != isinstance(response, str):
            return f"columns 'prompt' and '{where}' mix plain text and message lists"
    return None


TEMPLATE_COLUMNS = ("tools", "chat_template_kwargs")  # per-row chat template arguments, as in training


def ranks(rewards: list[float]) -> list[int]:
    """1 = best; equal rewards share the better rank (1, 1, 3)."""
    return [1 + sum(other > reward for other in rewards) for reward in rewards]


def score_file(model, dataset, output: str, max_length: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
               split: str = "train", tokenizer=None, per_attribute: bool = False) -> dict:
    """Score every response of `dataset` (a .jsonl/.json/.parquet/.csv file, a saved or data-file folder, a hub id,
    or a `Dataset`) with the reward model `model` (a folder, hub id or model object); write `output` as JSON lines.

    Each output line is the input row plus `reward`; rows with a `completions` list also get `rewards` (one per
    completion), `rank` (1 = best within the row's prompt) and `reward` is their best. With `per_attribute` (a
    multi-attribute model), each line also gets `attribute_rewards`: {attribute: reward} (a list of them, one per
    completion, on `completions` rows). Returns counts.
    """
    name = dataset if isinstance(dataset, str) else "(in memory)"
    check_output_file(output)  # before any scoring work
    if isinstance(dataset, str):
        dataset = load_preference_dataset(dataset, split)
    column = check_score_rows(dataset, name)  # before the (slow) model load
    reward = reward_function(model, tokenizer, batch_size, max_length=max_length)
    template_columns = [c for c in TEMPLATE_COLUMNS if c in dataset.column_names]
    owners, prompts, responses, options = [], [], [], []
    for row, example in enumerate(dataset):
        for response in example[column] if column == "completions" else [example[column]]:
            owners.append(row)
            prompts.append(example["prompt"])
            responses.append(response)
            options.append({c: example[c] for c in template_columns})
    all_ids = tokenize_texts(prompts, responses, reward.tokenizer, reward.max_length, reward.append_eos, options)
    if per_attribute and not is_attribute_model(reward.model.config):
        raise ConfigError("--attributes needs a multi-attribute model (trained with `attributes`); this one has one "
                          "output.")
    values = score_ids(reward.model, all_ids, batch_size, progress=True, per_attribute=per_attribute)
    rewards = combined_rewards(reward.model, values) if per_attribute else values
    per_row, by_attribute = [[] for _ in range(len(dataset))], [[] for _ in range(len(dataset))]
    for row, value, attributes in zip(owners, rewards, values):
        per_row[row].append(value)
        by_attribute[row].append(attributes)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    partial = f"{output}.partial"  # a run stopped halfway leaves no file that looks finished
    with open(partial, "w", encoding="utf-8") as f:
        for example, values, attributes in zip(dataset, per_row, by_attribute):
            scored = {"reward": max(values)}
            if column == "completions":
                scored.update(rewards=values, rank=ranks(values))
            if per_attribute:
                scored["attribute_rewards"] = attributes if column == "completions" else attributes[0]
            f.write(json.dumps({**example, **scored}, ensure_ascii=False, default=str) + "\n")
    os.replace(partial, output)
    return {"rows": len(dataset), "texts": len(rewards), "max_length": reward.max_length, "output": output}


def check_output_file(output: str) -> None:
    """`output` can be written as a file: not a folder, its folder creatable and writable."""
    if os.path.isdir(output):
        raise ConfigError(f"--output '{output}' is a folder; give the path of a file to write, e.g. "
                          f"{os.path.join(output, 'scored.jsonl')}.")
    folder = os.path.dirname(os.path.abspath(output))
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"--output '{output}': cannot write in '{existing}' (no permission); choose another path.")


def score_main(argv: list[str] | None = None) -> int:
    """`hf-balanced-reward score --model M --dataset D --output OUT.jsonl [--batch_size N] [--max_length N]`."""
    parser = argparse.ArgumentParser(
        prog="hf-balanced-reward score",
        description="Score prompt + response rows (or prompt + completions lists, best-of-n) with a reward model, "
        "exactly as training scored; write the rows plus 'reward' (and 'rewards', 'rank' for lists) as JSON lines.",
    )
    parser.add_argument("--model", required=True, help="Reward model: a folder or hub id (one-output classifier).")
    parser.add_argument("--dataset", required=True, help="A .jsonl/.json/.parquet/.csv file, a folder or a hub id.")
    parser.add_argument("--output", required=True, help="Where the scored rows go (JSON lines).")
    parser.add_argument("--split", default="train", help="Split of a hub or folder dataset.")
    parser.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE, help="Texts scored per batch.")
    parser.add_argument("--attributes", action="store_true",
                        help="A multi-attribute model: also write each attribute's reward (`attribute_rewards`); "
                        "'reward' is always their weighted sum.")
    parser.add_argument("--max_length", type=int, default=None,
                        help="Most tokens per text; default: the one the model was trained with, if saved with it, "
                        "else the tokenizer's limit, capped by the model's positions.")
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, or a usage error argparse has already printed
        return stop.code if isinstance(stop.code, int) else 2
    try:
        counts = score_file(args.model, args.dataset, args.output, args.max_length, args.batch_size, args.split,
                            per_attribute=args.attributes)
    except (DataError, ConfigError) as err:
        print(f"hf-balanced-reward: error: {err}", file=sys.stderr)
        return 2
    print(f"Scored {counts['texts']} texts of {counts['rows']} rows (max_length={counts['max_length']}): "
          f"{os.path.abspath(args.output)}")
    return 0
