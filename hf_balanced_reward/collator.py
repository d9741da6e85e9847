"""Turns tokenised pairs into one padded model batch: chosen rows first, then rejected rows."""

from dataclasses import dataclass

import torch


@dataclass
class PairCollator:
    """Stacks B pairs into 2B right-padded rows and records where each sequence really ends.

    `end_positions[i]` is the index of row i's last real token, the token whose score is the reward, so the
    model's own "last non-pad token" guess (wrong when pad == eos) is never used. `margin`, `weight` and
    `group_id` are passed through per pair when the examples carry them.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        sequences = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
        lengths = torch.tensor([len(s) for s in sequences])
        width = int(lengths.max())
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
        batch = {
            "input_ids": input_ids,
            "attention_mask": (torch.arange(width)[None, :] < lengths[:, None]).long(),
            "end_positions": lengths - 1,
        }
        for key, dtype in (("margin", torch.float32), ("weight", torch.float32), ("group_id", torch.long)):
            if key in examples[0]:
                batch[key] = torch.tensor([e[key] for e in examples], dtype=dtype)
        return batch
