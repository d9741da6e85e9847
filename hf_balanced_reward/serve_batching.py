"""The scoring side of `serve` (`serve.py` is the HTTP side): the model, loaded and checked once, that turns texts
into token ids and rewards by `scoring.py`'s contract; and the batcher that scores concurrent requests together.

Batching: the texts of concurrent requests wait in one queue; one worker takes them up to `max_batch_tokens` (or once
the oldest has waited `max_wait_s`), sorts them by length, scores them in the one thread that owns the model (off
the event loop, so requests keep arriving meanwhile) and hands each request its own values (reward, and an attribute
model's per-attribute rewards), in its order. RL rollouts send one query per request, many requests at once: batching
across requests is what lets an accelerator do more than one text per forward pass.
"""

import asyncio
import collections
import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

from .errors import ConfigError
from .paths import public_name, resolve_model_path

logger = logging.getLogger(__name__)


# --- the model ------------------------------------------------------------------------------------------------------


def check_reward_model(name: str) -> None:
    """ConfigError with the reason when `name` is not a reward model: a *ForSequenceClassification with one output,
    or one per attribute (trained with `attributes`), read from its config before the weights load."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        adapters = os.path.isfile(os.path.join(name, "adapter_config.json"))
        raise ConfigError(f"MODEL_DIR '{name}' is not a model folder" + (
            ": it holds LoRA adapters only; serve the merged model (its merged/ folder, or "
            "trainer.save_merged_model(DIR))." if adapters else f" ({err}).")) from None
    architectures = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ConfigError(f"MODEL_DIR '{name}' is not a reward model: its config names {architectures or 'no class'}, "
                          "not a *ForSequenceClassification with one output. Serve the output_dir of "
                          "`hf-balanced-reward train`, or a classifier saved with num_labels=1.")
    from .scoring import is_attribute_model

    if config.num_labels != 1 and not is_attribute_model(config):  # an attribute model's reward: their weighted sum
        raise ConfigError(f"MODEL_DIR '{name}' has {config.num_labels} outputs (num_labels={config.num_labels}) and "
                          "no saved attribute weights (`reward_attributes`); a reward model has one output, or one "
                          "per attribute when trained with `attributes`.")


def check_device(device: str | None) -> None:
    import torch

    if device is None:
        return
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ConfigError(f"--device '{device}' is not a device; use cpu, cuda, cuda:N or mps.") from None
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if kind in available and not available[kind]():
        raise ConfigError(f"--device {device}: this machine has no {kind} device; use --device cpu.")


class RewardModel:
    """The served model and the scoring contract's settings (`scoring.py`): texts -> token ids and cuts (on the event
    loop), token ids -> rewards (in the model's thread). `attributes`: a multi-attribute model's {"names": [...],
    "weights": [...]}, None for a one-output model."""

    def __init__(self, name: str, device: str | None, dtype: str, max_length: int | None):
        import torch

        from .scoring import SAVED_APPEND_EOS, load_reward_model, resolve_max_length

        check_device(device)
        self.folder = resolve_model_path(name)
        check_reward_model(self.folder)
        self.model, self.tokenizer = load_reward_model(self.folder, device=device)
        self.model.to(getattr(torch, dtype))
        self.max_length = resolve_max_length(self.model, self.tokenizer, max_length)
        self.append_eos = bool(getattr(self.model.config, SAVED_APPEND_EOS, False))
        self.name = public_name(name)  # a folder by its name: no local path in answers
        self.device, self.dtype = str(next(self.model.parameters()).device), dtype
        self.attributes = attribute_settings(self.model)

    def tokenize(self, prompts, responses, options=None) -> tuple[list[list[int]], list[str]]:
        """Token ids (empty for an empty text that the tokenizer adds nothing to) and cuts ("kept", "truncated",
        "response cut"), as `score` makes them."""
        from .scoring import tokenize_with_cuts

        return tokenize_with_cuts(prompts, responses, self.tokenizer, self.max_length, self.append_eos, options,
                                  allow_empty=True)

    def score_values(self, ids: list[list[int]]) -> list[tuple[float, dict | None]]:
        """(reward, {attribute: reward} or None) of each text, from one forward pass. An attribute model's reward is
        its outputs @ its weights in float32 on its device: `score_ids`' own op on the same outputs, so the reward
        equals `score`'s whether or not the attributes are asked for."""
        from .scoring import combined_rewards, score_ids

        if self.attributes is None:
            return [(reward, None) for reward in score_ids(self.model, ids, batch_size=len(ids))]
        by_attribute = score_ids(self.model, ids, batch_size=len(ids), per_attribute=True)
        return list(zip(combined_rewards(self.model, by_attribute), by_attribute, strict=True))

    def score_batch(self, ids: list[list[int]]) -> list[float]:
        """Each text's reward (an attribute model's: the weighted sum of its outputs)."""
        return [reward for reward, _ in self.score_values(ids)]

    def info(self, args) -> dict:
        """What GET /v1/model answers: the model, its training (from its card and config) and the serving settings."""
        config = self.model.config
        card = card_tables(os.path.join(self.folder, "README.md"))
        training = card.get("Training", {})
        return {
            "model": self.name, "architecture": (config.architectures or [None])[0],
            "base_model": training.get("base model"), "loss": training.get("loss"),
            "max_length": self.max_length, "trained_max_length": getattr(config, "reward_max_length", None),
            "append_eos_token": self.append_eos,
            "reward_normalization": getattr(config, "reward_normalization", None), "attributes": self.attributes,
            "evaluation": card.get("Evaluation", {}), "device": self.device, "dtype": self.dtype,
            "batching": {key: getattr(args, key) for key in
                         ("max_batch_tokens", "max_wait_ms", "max_queue", "max_request_items")},
        }


def attribute_settings(model) -> dict | None:
    """A multi-attribute model's {"names": [...], "weights": [...]}, names in output order (the keys `score_ids`
    gives per attribute); None for a one-output model."""
    from .scoring import attribute_weights

    weights = attribute_weights(model)
    if weights is None:
        return None
    return {"names": [model.config.id2label[i] for i in range(model.config.num_labels)], "weights": list(weights)}


def card_tables(path: str) -> dict[str, dict]:
    """The model card's two-column tables by section ('Training', 'Evaluation'): {row name: value}, numbers as
    numbers, each table's header row left out."""
    tables, section, in_table = {}, None, False
    if not os.path.isfile(path):
        return tables
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("## "):
                section = line[3:].strip()
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("|") else []
            if len(cells) == 2 and section and in_table and not set(cells[1]) <= set("-: "):
                tables.setdefault(section, {})[cells[0]] = as_number(cells[1])
            in_table = line.startswith("|")
    return tables


def as_number(text: str):
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(text)
    return text


# --- batching ---------------------------------------------------------------------------------------------------


class QueueFull(Exception):
    """More texts would wait than `max_queue`: the request is refused (503 with Retry-After), never queued without
    bound."""


class Job:
    """One request's texts; `done` resolves to their values (what `score_batch` gives each text), in order, once
    every batch holding them has run."""

    def __init__(self, ids: list[list[int]], done: asyncio.Future):
        self.ids, self.done = ids, done
        self.values = [None] * len(ids)
        self.left = len(ids)

    def deliver(self, index: int, value) -> None:
        self.values[index] = value
        self.left -= 1
        if self.left == 0 and not self.done.done():
            self.done.set_result(self.values)

    def fail(self, err: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(err)


class Batcher:
    """The queue and its worker (see the module docstring). `score_batch(list of token ids) -> a value per text`
    (`RewardModel.score_values`: reward and per-attribute rewards) runs in `model_thread`, the one thread that touches
    the model; everything else runs on the event loop."""

    def __init__(self, score_batch, max_batch_tokens: int, max_wait_s: float, max_queue: int):
        self.score_batch = score_batch
        self.max_batch_tokens, self.max_wait_s, self.max_queue = max_batch_tokens, max_wait_s, max_queue
        self.waiting = collections.deque()  # (job, index in the job, arrival time), oldest first
        self.waiting_tokens = 0
        self.arrived = asyncio.Event()
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-model")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.scored = self.batches = 0

    def submit(self, ids: list[list[int]]) -> asyncio.Future:
        """Queue one request's token ids; the future gives their values. QueueFull when they would not fit."""
        if len(self.waiting) + len(ids) > self.max_queue:
            raise QueueFull(f"{len(self.waiting)} texts are waiting and this request adds {len(ids)}: more than "
                            f"--max_queue {self.max_queue}; retry shortly, or add replicas.")
        self.loop = self.loop or asyncio.get_running_loop()
        job = Job(ids, self.loop.create_future())
        if not ids:
            job.done.set_result([])
            return job.done
        now = time.monotonic()
        self.waiting.extend((job, index, now) for index in range(len(ids)))
        self.waiting_tokens += sum(len(one) for one in ids)
        self.arrived.set()
        return job.done

    async def score_now(self, ids: list[list[int]]) -> list:
        """Score in the model's thread without queueing (the warm-up batch)."""
        return await asyncio.get_running_loop().run_in_executor(self.model_thread, self.score_batch, ids)

    def drain(self) -> None:
        """Shutting down: score what waits now instead of waiting for more (called from a signal handler, through
        `loop.call_soon_threadsafe`)."""
        self.max_wait_s = 0.0
        self.arrived.set()

    async def run(self) -> None:
        """The worker, until cancelled: wait for texts, let a batch fill, score it, answer its requests."""
        self.loop = asyncio.get_running_loop()
        while True:
            await self.wait_for_batch()
            for rows in self.forward_passes(self.take_batch()):
                await self.score(rows)

    async def wait_for_batch(self) -> None:
        while not self.waiting:
            self.arrived.clear()
            await self.arrived.wait()
        # The oldest text's wait bounds the batch's: texts that queued during the last forward pass go at once.
        while self.waiting_tokens < self.max_batch_tokens:
            left = self.waiting[0][2] + self.max_wait_s - time.monotonic()
            if left <= 0:
                return
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), left)
            except asyncio.TimeoutError:
                return

    def take_batch(self) -> list[tuple[Job, int]]:
        """The oldest texts whose tokens fit in max_batch_tokens (at least one); those of a request whose client has
        gone are dropped unscored."""
        batch, tokens = [], 0
        while self.waiting:
            job, index, _ = self.waiting[0]
            size, live = len(job.ids[index]), not job.done.done()  # done early: cancelled (client gone) or failed
            if live and batch and tokens + size > self.max_batch_tokens:
                break
            self.waiting.popleft()
            self.waiting_tokens -= size
            if live:
                batch.append((job, index))
                tokens += size
        return batch

    def forward_passes(self, batch: list[tuple[Job, int]]) -> list[list[tuple[Job, int]]]:
        """The batch sorted longest first, cut so that each pass pads to at most max_batch_tokens (rows x longest):
        similar lengths share a pass, so little of it is padding."""
        batch = sorted(batch, key=lambda row: -len(row[0].ids[row[1]]))
        passes, longest = [], 0
        for job, index in batch:
            if passes and longest * (len(passes[-1]) + 1) <= self.max_batch_tokens:
                passes[-1].append((job, index))
            else:
                passes.append([(job, index)])
                longest = len(job.ids[index])
        return passes

    async def score(self, rows: list[tuple[Job, int]]) -> None:
        rows = [(job, index) for job, index in rows if not job.done.done()]
        if not rows:
            return
        try:
            values = await self.loop.run_in_executor(self.model_thread, self.score_batch,
                                                     [job.ids[index] for job, index in rows])
        except Exception as err:  # one failed pass fails its requests, never the worker
            logger.error(f"scoring a batch of {len(rows)} texts failed: {err!r}")
            for job, _ in rows:
                job.fail(RuntimeError(f"scoring failed: {err}"))
            return
        self.scored += len(rows)
        self.batches += 1
        for (job, index), value in zip(rows, values, strict=True):
            if not job.done.done():
                job.deliver(index, value)

    def close(self) -> int:
        """Wait for the pass in the model's thread to end; fail what is left (nothing, after a clean drain) and
        return how many texts that was."""
        self.model_thread.shutdown(wait=True)
        unscored = sum(not job.done.done() for job, _, _ in self.waiting)
        for job, _, _ in self.waiting:
            job.fail(RuntimeError("the server stopped before scoring this text"))
        self.waiting.clear()
        return unscored
