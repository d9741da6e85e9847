"""Streamed train sets batched by length: pairs of similar length read from a buffer, in a seeded order.

A stream has no length and no random access, so `train_sampling_strategy="group_by_length"` cannot use transformers'
`LengthGroupedSampler`. `LengthGroupedStream` does the same job a buffer at a time: it reads `buffer_batches` global
batches of pairs, sorts them by `length` (the unique tokens of a pair, as the in-memory sampler does), cuts them into
batches and yields the batches in an order shuffled with a seed drawn from (seed, epoch, buffer index, worker). The
order is a function of the stream and the seed alone, so a resumed run that skips the batches already trained lands
where the first run was. A buffer's last partial batch (only the stream's last buffer has one) is yielded last, so
that the DataLoader, which cuts every `batch_size` consecutive pairs into a batch, cuts exactly these batches.
"""

import numpy as np
import torch


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
        return len(example["chosen_ids"]) + len(example["rejected_ids"])

    def grouped(self, buffer: list[dict], index: int, worker_id: int = 0):
        order = sorted(range(len(buffer)), key=lambda i: self.length(buffer[i]))  # stable: ties keep stream order
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        full = len(batches) if len(batches[-1]) == self.batch_size else len(batches) - 1
        rng = np.random.default_rng([self.seed, self.epoch, index, worker_id])
        for b in [*rng.permutation(full).tolist(), *range(full, len(batches))]:
            for i in batches[b]:
                yield buffer[i]
