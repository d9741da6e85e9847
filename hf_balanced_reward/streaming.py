"""Streamed datasets: batched by length, counted in one pass, their read errors named, padded for evaluation on
several processes, and the position a run has read a streamed train set up to.

Batched by length: a stream has no length and no random access, so `train_sampling_strategy="group_by_length"` cannot
use transformers' `LengthGroupedSampler`. `LengthGroupedStream` does the same job a buffer at a time: it reads
`buffer_batches` global batches of pairs, sorts them by `length` (the unique tokens of a pair, as the in-memory
sampler does), cuts them into batches and yields the batches in an order shuffled with a seed drawn from (seed,
epoch, buffer index, worker). The order is a function of the stream and the seed alone, so a resumed run that skips
the batches already trained lands where the first run was. A buffer's last partial batch (only the stream's last
buffer has one) is yielded last, so that the DataLoader, which cuts every `batch_size` consecutive pairs into a
batch, cuts exactly these batches.
"""

import contextlib
import json
import os

import logging

import numpy as np
import torch

from .data import DataError, is_stream
from .preparation import report_summary

logger = logging.getLogger(__name__)


class LengthGroupedStream(torch.utils.data.IterableDataset):
    """Yields the pairs of `source` so that every `batch_size` consecutive pairs are a length-grouped batch.

    `batch_size` is the global batch (per-device batch x processes): accelerate gives each process its slice of every
    `batch_size` consecutive pairs, so each process's micro-batch is a slice of one sorted batch.
    """

    def __init__(self, source, batch_size: int, seed: int, buffer_batches: int = 50, length_column: str = "length"):
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.buffer_size = batch_size * buffer_batches
        self.length_column = length_column
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(epoch)

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()  # with loader workers, each batches the share `datasets` gives it
        worker_id = worker.id if worker is not None else 0
        buffer, index = [], 0
        for example in self.source:
            buffer.append(example)
            if len(buffer) == self.buffer_size:
                yield from self.grouped(buffer, index, worker_id)
                buffer, index = [], index + 1
        if buffer:
            yield from self.grouped(buffer, index, worker_id)

    def length(self, example: dict) -> int:
        if self.length_column in example:
            return example[self.length_column]
        return sum(map(len, example["completion_ids"]))

    def grouped(self, buffer: list[dict], index: int, worker_id: int = 0):
        order = sorted(range(len(buffer)), key=lambda i: self.length(buffer[i]))  # stable: ties keep stream order
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        full = len(batches) if len(batches[-1]) == self.batch_size else len(batches) - 1
        rng = np.random.default_rng([self.seed, self.epoch, index, worker_id])
        for b in [*rng.permutation(full).tolist(), *range(full, len(batches))]:
            for i in batches[b]:
                yield buffer[i]


def stream_read_error(err: BaseException) -> DataError | None:
    """A one-line DataError for an exception raised by a `datasets` file reader while a stream was being read (a
    malformed line further into a .jsonl file, a truncated parquet file), naming the file and, for JSON Lines, the
    line; None for any other exception. The reader is found in the traceback: a stream reads its files lazily, deep
    inside a DataLoader, so the place that catches the error does not know which file was being read."""
    if isinstance(err, DataError):
        return None
    reader, tb = None, err.__traceback__
    while tb is not None:
        if f"datasets{os.sep}packaged_modules{os.sep}" in tb.tb_frame.f_code.co_filename:
            reader = tb.tb_frame
        tb = tb.tb_next
    if reader is None:
        return None
    file = reader.f_locals.get("file")
    file = file if isinstance(file, str) else None
    what, fix = " ".join(str(err).split()).rstrip(".") or type(err).__name__, "Fix the file"
    if file and file.endswith((".jsonl", ".json")) and os.path.isfile(file):
        bad = first_bad_json_line(file)
        if bad:
            what, fix = f"line {bad[0]} is not valid JSON ({bad[1]})", "Fix or remove that line"
    where = f"dataset file '{file}'" if file else "the streamed dataset"
    return DataError(f"could not read {where} as it streamed: {what}; the rows before it were read. {fix}.")


@contextlib.contextmanager
def reading_streams():
    """An error a `datasets` file reader raises while a stream is read becomes a one-line DataError naming the file."""
    try:
        yield
    except Exception as err:
        if (read_error := stream_read_error(err)) is None:
            raise
        raise read_error from err


def count_stream(dataset, name: str, report: dict, on_bad_rows: str) -> tuple[list[str], torch.Tensor]:
    """One pass over a prepared stream before the model is loaded: every row checked (`report` counts them). Returns
    each pair's group and its response lengths [N, 2], which the balanced loss is fitted on as for data in memory."""
    groups, lengths = [], []
    with reading_streams():
        for example in dataset:
            groups.append(example["group"])
            lengths.append(example["response_lengths"])
    if not groups:
        raise DataError(f"{name} dataset has no usable pairs left: all {report['rows']} rows were dropped.")
    logger.info(f"Counting pass over the streamed {name} set: {len(groups)} pairs in {len(set(groups))} group(s).")
    if summary := report_summary(name, report, on_bad_rows):
        logger.warning(summary)
    return groups, torch.tensor(lengths)


def first_bad_json_line(path: str) -> tuple[int, str] | None:
    """(line number from 1, the parser's complaint) of the first non-blank line of a JSON Lines file that is not
    one JSON value, or None."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    json.loads(line.strip())
                except ValueError as err:
                    return number, str(err)
    return None


# group_id of the pairs `PaddedStream` adds: evaluation drops them before any metric is computed.
PADDING_GROUP = -1


class PaddedStream(torch.utils.data.IterableDataset):
    """A stream followed by copies of its first pair, marked `group_id = PADDING_GROUP`, up to a multiple of
    `multiple` pairs.

    On several processes accelerate gives each process its slice of every `multiple` (global batch) consecutive
    pairs and, for a stream, completes a last partial batch with pairs from the start that nothing tells apart,
    so they would be scored twice. Padded here, every batch is whole and the copies are marked for evaluation to drop.
    """

    def __init__(self, source, multiple: int):
        self.source, self.multiple = source, multiple

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(epoch)

    def __iter__(self):
        count, first = 0, None
        for example in self.source:
            if first is None:
                first = example
            count += 1
            yield example
        for _ in range(-count % self.multiple if first is not None else 0):
            yield {**first, "group_id": PADDING_GROUP}


def real_pairs(prediction) -> tuple[tuple, tuple]:
    """(predictions, label_ids) of an evaluation without the pairs `PaddedStream` added (group_id PADDING_GROUP)."""
    keep = np.asarray(prediction.label_ids[0]) != PADDING_GROUP
    if keep.all():
        return tuple(prediction.predictions), tuple(prediction.label_ids)
    return tuple(p[keep] for p in prediction.predictions), tuple(l[keep] for l in prediction.label_ids)


class StreamPosition:
    """Where a streamed train set is read up to: its pass (Trainer's epoch) and the batches read into that pass.

    Trainer iterates each epoch (pass) with a new iterator, so a new iterator after the first is the next pass.
    The position before a step's batches is kept too, for a checkpoint saved before the step finishes.
    """

    def __init__(self):
        self.resumed: dict | None = None  # the position the checkpoint being resumed recorded
        self.start(0, 0, global_step=0)

    def start(self, epoch: int, batches: int, global_step: int) -> None:
        self.position, self.iterator = {"pass": epoch, "batches": batches}, None
        self.before_step = (global_step, dict(self.position))

    def read(self, epoch_iterator, num_batches: int, global_step: int) -> None:
        """Count the batches of one optimizer step, read from `epoch_iterator` before step `global_step` + 1."""
        self.before_step = (global_step, dict(self.position))
        if epoch_iterator is not self.iterator:
            if self.iterator is not None:
                self.position = {"pass": self.position["pass"] + 1, "batches": 0}
            self.iterator = epoch_iterator
        self.position["batches"] += num_batches

    def of_finished_steps(self, global_step: int) -> dict:
        """The position after the batches of the steps finished by `global_step` (a nan_policy stop saves mid-step)."""
        step, before = self.before_step
        return before if step == global_step else dict(self.position)


def length_grouped_dataloader(trainer):
    """The trainer's train dataloader for a streamed train set with train_sampling_strategy="group_by_length":
    batched by length from a buffer (`LengthGroupedStream`; transformers ignores the option for a stream). None for
    any other train set."""
    args, dataset = trainer.args, trainer.train_dataset
    if not (is_stream(dataset) and args.train_sampling_strategy == "group_by_length"):
        return None
    seed = args.data_seed if args.data_seed is not None else args.seed
    grouped = LengthGroupedStream(dataset, trainer._train_batch_size * args.world_size, seed,
                                  length_column=args.length_column_name)
    return trainer._get_dataloader(grouped, "Training", trainer._train_batch_size, is_training=True)


def padded_eval_dataloader(trainer, dataset, description: str):
    """The trainer's dataloader for a streamed eval set on several processes: padded to whole global batches with
    marked rows that evaluation drops (`PaddedStream`, `real_pairs`), so that every row is scored once. None for
    any other set."""
    if not (is_stream(dataset) and trainer.args.world_size > 1):
        return None
    padded = PaddedStream(dataset, trainer.args.eval_batch_size * trainer.args.world_size)
    return trainer._get_dataloader(padded, description, trainer.args.eval_batch_size)
