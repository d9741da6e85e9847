"""Row checks: what decides whether one data row is usable, and how a bad row is reported.

`row_problem` and its parts (`text_problem`, `number_problem`, `template_options_problem`) name what is wrong with a
row; `droppable` and `STOP_ON` decide which problems `on_bad_rows` drops and which stop a run; `bad_rows_error` and
`check_hinge_margins` word the errors. Kept apart from `data.py` (loading, tokenisation, truncation) so that the
server and scoring check rows and requests without loading the preparation code (datasets, trl), and so that
`data.py` and `listwise.py` share one set of checks. Standard library only, besides `errors`.
"""

from __future__ import annotations  # `Dataset` is named in an annotation only

import json
import math
from typing import TYPE_CHECKING

from .errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset

ROLES = ("system", "user", "assistant", "tool")
MAX_SHOWN = 5  # bad rows named in an error message; the count covers all of them


def text_problem(value, allow_empty: bool = False) -> str | None:
    """What is wrong with one text field (a string or a list of messages), or None. An assistant message may carry
    `tool_calls` instead of text `content`."""
    if value is None:
        return "is null"
    if isinstance(value, str):
        return "is empty" if not value.strip() and not allow_empty else None
    if isinstance(value, list):
        if not value:
            return "is an empty message list"
        for i, message in enumerate(value):
            if not isinstance(message, dict):
                return f"message {i} is not a {{'role': ..., 'content': ...}} mapping"
            if message.get("role") not in ROLES:
                return f"message {i} has role {message.get('role')!r}; roles are {', '.join(ROLES)}"
            if isinstance(message.get("content"), str):
                continue
            if message["role"] == "assistant" and message.get("tool_calls"):
                if message.get("content") is not None:
                    return f"message {i} has 'tool_calls' and a 'content' that is not text"
                if not isinstance(message["tool_calls"], list):
                    return f"message {i} has 'tool_calls' that is not a list of calls"
                continue
            return f"message {i} has no text 'content'" + (" (only an assistant message may carry 'tool_calls' "
                                                           "instead)" if message.get("tool_calls") else "")
        return None
    return f"is {type(value).__name__}, not text or a list of messages"


IDENTICAL = "chosen is identical to rejected (no preference to learn)"
# Texts that differ only in what the tokenizer erases (case for an uncased one, some whitespace): the model sees one
# sequence twice, so the pair carries no preference either.
IDENTICAL_TOKENS = "chosen and rejected are identical after tokenisation (no preference to learn)"
ALL_IDENTICAL = "all completions are identical (no preference to learn)"  # a list's IDENTICAL
# long_responses: cut keeps each text's last tokens; two responses that differ only before those become one sequence.
IDENTICAL_ONCE_CUT = "chosen and rejected are identical once cut to max_length (they differ only in the tokens cut away)"
# The collator hands margin and weight to the loss as float32: a larger value becomes inf there.
FLOAT32_MAX = 3.4028234663852886e38


def too_long(max_length) -> str:
    return f"a response alone is longer than max_length={max_length} tokens"


def droppable(problem: str) -> bool:
    """Rows that are well-formed but carry no usable pair: dropped and counted by default, as trl drops them."""
    return problem in (IDENTICAL, IDENTICAL_TOKENS, ALL_IDENTICAL, IDENTICAL_ONCE_CUT) or problem.startswith("a response alone is longer")


# Which bad rows stop the run: "auto" only rows that cannot be read; "skip" none; "error" all.
STOP_ON = {"error": lambda problem: True, "skip": lambda problem: False, "auto": lambda problem: not droppable(problem)}


def row_problem(example: dict, group_column: str | None, allow_empty_response: bool = True) -> str | None:
    """The first thing that makes a row unusable, as "column 'x' <problem>", or None for a good row."""
    if "chosen_ids" in example and "rejected_ids" in example:
        for column in ("chosen_ids", "rejected_ids"):
            if not example[column]:
                return f"column '{column}' is empty"
    else:
        texts = [c for c in ("prompt", "chosen", "rejected") if c in example]
        # With an explicit prompt an empty response is a real answer (usually the rejected one); without one, an
        # empty "chosen" is no text at all.
        empty_ok = {"prompt"} | ({"chosen", "rejected"} if allow_empty_response and "prompt" in example else set())
        for column in texts:
            problem = text_problem(example[column], allow_empty=column in empty_ok)
            if problem:
                return f"column '{column}' {problem}"
        if len({isinstance(example[c], str) for c in texts}) > 1:
            return f"columns {', '.join(texts)} mix plain text and message lists"
        if example["chosen"] == example["rejected"]:
            return IDENTICAL
        problem = template_options_problem(example)
        if problem:
            return problem
    for column in ("margin", "weight"):
        if problem := number_problem(example, column):
            return problem
    if group_column and (example[group_column] is None or not str(example[group_column]).strip()):
        return f"column '{group_column}' is empty: the pair has no group"
    return None


def bad_rows_error(name: str, bad: list[tuple[int, str]], total: int) -> DataError:
    """The one-line error for rows that stop a run: the first few (row, problem), how many more, and the fix."""
    shown = "; ".join(f"row {row}: {problem}" for row, problem in bad[:MAX_SHOWN])
    more = f" (and {len(bad) - MAX_SHOWN} more)" if len(bad) > MAX_SHOWN else ""
    return DataError(f"{name} dataset has {len(bad)} bad row(s) of {total}: {shown}{more}. Fix them, or set "
                     "on_bad_rows: skip to drop them (they are counted in the log and in data_report.json).")


def number_problem(example: dict, column: str) -> str | None:
    """What is wrong with a row's `margin` or `weight` (absent is fine), or None."""
    value = example.get(column, 0.0)
    if value is None:
        return f"column '{column}' is null"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"column '{column}' is {type(value).__name__}, not a number"
    if math.isnan(value) or math.isinf(value):
        return f"column '{column}' is {'NaN' if math.isnan(value) else 'infinite'}"
    if abs(value) > FLOAT32_MAX:
        return (f"column '{column}' is {value:g}, outside float32's range (magnitude up to 3.4e38), so training would "
                "see it as infinite")
    if column == "weight" and value < 0:
        return f"column 'weight' is negative ({value})"
    return None


def check_hinge_margins(dataset: Dataset, name: str, hinge_margin: float) -> None:
    """Loss hinge asks chosen to lead rejected by hinge_margin + margin; refuse rows where that gap is negative, as
    the config refuses a negative hinge_margin. Rows are numbered as the user's dataset numbers them (checked before
    tokenisation); non-numbers are left to `number_problem`."""
    if "margin" not in dataset.column_names:
        return
    bad = [(row, m) for row, m in enumerate(dataset["margin"]) if isinstance(m, (int, float)) and not
           isinstance(m, bool) and hinge_margin + m < 0]
    if not bad:
        return
    shown = ", ".join(f"row {row}: {m:g}" for row, m in bad[:MAX_SHOWN])
    more = f" and {len(bad) - MAX_SHOWN} more" if len(bad) > MAX_SHOWN else ""
    raise DataError(
        f"{name} dataset has {len(bad)} row(s) of {len(dataset)} whose 'margin' is below -hinge_margin "
        f"({-hinge_margin:g}) ({shown}{more}): loss hinge then asks for a negative gap hinge_margin + margin between "
        "chosen and rejected, and a negative required gap rewards ranking the rejected response higher. Fix the "
        "margins' sign (a margin says how far chosen should lead), raise loss_kwargs hinge_margin, or train with "
        "loss_type bradley_terry, which allows a negative margin."
    )


def template_options_problem(example: dict, label: str = "column '{}'") -> str | None:
    """What is wrong with a row's `tools` / `chat_template_kwargs` (each named by `label`, e.g. the server's
    ".{}"), or None."""
    tools = example.get("tools")
    if isinstance(tools, str) and tools.strip():
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            return f"{label.format('tools')} is not valid JSON ({err.msg} at character {err.pos})"
    if tools is not None and not isinstance(tools, (list, str)):
        return (f"{label.format('tools')} is {type(tools).__name__}, not a list of tool schemas (or one JSON string "
                "of them)")
    kwargs = example.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        return (f"{label.format('chat_template_kwargs')} is {type(kwargs).__name__}, not a mapping of template "
                "arguments")
    return None


def has_empty_response(example: dict) -> bool:
    return "prompt" in example and any(isinstance(example.get(c), str) and not example[c].strip()
                                       for c in ("chosen", "rejected"))
