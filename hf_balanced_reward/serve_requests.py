"""The requests of `serve` (`serve.py` serves them): the API key check, the body read as JSON, and the texts of an
OpenRLHF `/get_reward` or a `/v1/rewards` request, each field checked; a bad one is a `RequestError` whose message
names the field, the value and the fix. Also how an item's texts are scored and the answers are shaped.

Only the standard library and light modules: nothing here needs fastapi or torch.
"""

import hashlib
import hmac
import json

from .errors import did_you_mean
from .row_checks import template_options_problem, text_problem

ITEM_FIELDS = ("prompt", "response", "completions", "tools", "chat_template_kwargs")
BODY_FIELDS = ("items", "attributes")  # of a /v1/rewards body
JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
              float: "a number", type(None): "null"}


class RequestError(Exception):
    """A request answered with `status` and a message naming the field, the value and the fix."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def json_type(value) -> str:
    return JSON_TYPES.get(type(value), type(value).__name__)


def check_key(presented: str | None, api_key: str | None) -> None:
    """401 unless the server asks for no key or `presented` equals it (compared in constant time)."""
    if api_key is None:
        return
    # Digests of equal length: the comparison's time says nothing about the key, not even its length.
    if presented is None or not hmac.compare_digest(hashlib.sha256(presented.encode()).digest(),
                                                    hashlib.sha256(api_key.encode()).digest()):
        raise RequestError(401, "missing or wrong API key; send 'Authorization: Bearer KEY' (or ?api_key=KEY).",
                           {"WWW-Authenticate": "Bearer"})


def presented_key(headers, query_params) -> str | None:
    authorization = headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        return authorization[len("bearer "):].strip()
    return query_params.get("api_key")


def parse_body(body: bytes):
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = f" ({err.msg} at character {err.pos})" if isinstance(err, json.JSONDecodeError) else ""
        raise RequestError(400, f"the body is not valid JSON{where}; send a JSON object such as "
                           '{"query": ["text"]}.') from None


def openrlhf_queries(body, max_items: int) -> list[str]:
    """The `query` texts of an OpenRLHF request; `prompts` and `labels` (and any other key but `attributes`, read by
    `attributes_flag`) are not used."""
    if not isinstance(body, dict):
        raise RequestError(422, f"the body is {json_type(body)}, not an object with a 'query' array of texts.")
    if "query" not in body:
        raise RequestError(422, "the body has no 'query': send {\"query\": [text, ...]} (prompt + response, as the "
                           "policy rendered them).")
    queries = body["query"]
    if not isinstance(queries, list):
        raise RequestError(422, f"'query' is {json_type(queries)}, not an array of texts.")
    too_many(len(queries), max_items, "'query'")
    for i, query in enumerate(queries):
        if not isinstance(query, str):
            raise RequestError(422, f"query[{i}] is {json_type(query)}, not a string.")
    return queries


def too_many(count: int, max_items: int, what: str) -> None:
    if count > max_items:
        raise RequestError(413, f"{what} has {count} texts; this server takes at most {max_items} per request "
                           "(--max_request_items): split the request.")


def structured_items(body, max_items: int) -> list[dict]:
    """The `items` of a /v1/rewards request, each checked; 413 past max_items texts."""
    shape = ('send {"items": [{"prompt": ..., "response": ...}, ...]} (or "completions": [...] instead of '
             '"response" for best-of-n).')
    if not isinstance(body, dict):
        raise RequestError(422, f"the body is {json_type(body)}, not an object: {shape}")
    if not isinstance(body.get("items"), list):
        raise RequestError(422, f"'items' is {json_type(body['items']) if 'items' in body else 'missing'}: {shape}")
    if unknown := [key for key in body if key not in BODY_FIELDS]:
        raise RequestError(422, f"unknown field '{unknown[0]}'{did_you_mean(unknown[0], BODY_FIELDS)}; the body "
                           "holds 'items' and, optionally, 'attributes'.")
    items = body["items"]
    too_many(len(items), max_items, "'items'")
    for i, item in enumerate(items):
        if problem := item_problem(item):
            raise RequestError(422, f"items[{i}]{problem}")
    too_many(sum(len(item.get("completions", [None])) for item in items), max_items, "'items'")
    return items


def attributes_flag(body: dict) -> bool:
    """A body's optional `attributes`: true asks for each attribute's reward beside the reward."""
    wanted = body.get("attributes", False)
    if not isinstance(wanted, bool):
        raise RequestError(422, f"'attributes' is {json_type(wanted)} ({json.dumps(wanted)[:40]}), not a boolean: "
                           "send true for each attribute's reward as well, or leave it out.")
    return wanted


def item_problem(item) -> str | None:
    """What is wrong with one item, worded to follow 'items[i]', or None."""
    if not isinstance(item, dict):
        return f" is {json_type(item)}, not an object with 'prompt' and 'response' (or 'completions')."
    if unknown := [key for key in item if key not in ITEM_FIELDS]:
        return (f" has unknown field '{unknown[0]}'{did_you_mean(unknown[0], ITEM_FIELDS)}; fields are "
                f"{', '.join(ITEM_FIELDS)}.")
    answers = [key for key in ("response", "completions") if key in item]
    if "prompt" not in item or len(answers) != 1:
        return (" needs 'prompt' (\"\" to score a whole text) and exactly one of 'response' or 'completions'; it "
                f"has {', '.join(repr(k) for k in item) or 'no fields'}.")
    if problem := text_problem(item["prompt"], allow_empty=True):
        return f".prompt {problem}."
    responses = [item["response"]] if "response" in item else item["completions"]
    if "completions" in item and (not isinstance(responses, list) or not responses):
        found = "an empty array" if responses == [] else json_type(responses)
        return f".completions is {found}, not an array of one response or more."
    for k, response in enumerate(responses):
        field = "response" if "response" in item else f"completions[{k}]"
        if problem := text_problem(response, allow_empty=True):
            return f".{field} {problem}."
        if isinstance(item["prompt"], str) != isinstance(response, str):
            return f": prompt and {field} mix plain text and message lists; send both as text or both as messages."
    problem = template_options_problem(item, label=".{}")  # the same check as a file's columns get
    return f"{problem}." if problem else None


def item_texts(item: dict) -> tuple[list, list, list[dict]]:
    """(prompts, responses, template options): one text per response of the item."""
    responses = [item["response"]] if "response" in item else item["completions"]
    options = {key: item[key] for key in ("tools", "chat_template_kwargs") if item.get(key) is not None}
    return [item["prompt"]] * len(responses), responses, [options] * len(responses)


def item_result(item: dict, rewards: list[float], cuts: list[str], by_attribute: list[dict] | None = None) -> dict:
    """An item's answer, with `score`'s keys: `reward`, for completions `rewards` and `rank` (1 = best), and with
    `by_attribute` `attribute_rewards` (one {attribute: reward}, or a list of them for completions, as `score
    --attributes` writes)."""
    from .scoring import ranks

    truncated = [cut != "kept" for cut in cuts]
    if "response" in item:
        result = {"reward": rewards[0], "truncated": truncated[0]}
    else:
        result = {"reward": max(rewards), "rewards": rewards, "rank": ranks(rewards), "truncated": truncated}
    if by_attribute is not None:
        result["attribute_rewards"] = by_attribute[0] if "response" in item else by_attribute
    return result


def openrlhf_answer(rewards: list[float], truncated: list[bool], by_attribute: list[dict] | None = None,
                    names: list[str] = ()) -> dict:
    """A /get_reward answer: OpenRLHF reads `rewards`, `scores` (filtered on) and `extra_logs` (each list logged as a
    metric). With `by_attribute`, also `attribute_rewards` ({attribute: reward} per query) and each attribute's
    rewards in `extra_logs` under its name (`truncated` keeps its own there)."""
    extra_logs = {"truncated": [float(t) for t in truncated]}
    answer = {"rewards": rewards, "scores": rewards, "extra_logs": extra_logs, "truncated": truncated}
    if by_attribute is not None:
        extra_logs.update({name: [one[name] for one in by_attribute] for name in names if name not in extra_logs})
        answer["attribute_rewards"] = by_attribute
    return answer
