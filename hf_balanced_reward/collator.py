"""Turns prepared rows (a pair is the list of two) into model inputs: plain padded rows, or packed shared-prompt rows
for decoders.

Plain layout (every model): one right-padded row per completion, completion by completion (pairs: every chosen
response, then every rejected one, as trl batches them).

Shared-prompt layout (causal decoders): each pair becomes one segment `prompt + chosen + rejected`, and segments are
packed first-fit-decreasing into a few rows of one width, so the prompt is computed once and almost nothing is
padding. Per token the batch carries `segment_ids` (which pair; -1 for padding) and `branch_ids` (0 prompt,
1 chosen, 2 rejected); the attention rule in `shared_prompt_allows` turns them into a mask in which the rejected
response sees the prompt and itself, never the chosen response. Position ids restart the rejected response right
after the prompt, so every token sees exactly the context and position it has in the plain layout.

A list of K completions is the same layout with K branches: one segment `prompt + completion 1 + ... + completion K`,
branch i + 1 for completion i, each seeing the prompt and itself, so the prompt is computed once for all K.
"""

from dataclasses import dataclass

import torch
from trl.data_utils import common_prefix_length

PROMPT, CHOSEN, REJECTED, OFF_PROMPT = 0, 1, 2, 3
ROW_FIELDS = (("margin", torch.float32), ("weight", torch.float32), ("group_id", torch.long))


def shared_prefix_length(chosen_ids, rejected_ids) -> int:
    """Tokens the two sequences share at the start (the prompt); each response keeps at least its scored token."""
    return min(common_prefix_length(chosen_ids, rejected_ids), len(chosen_ids) - 1, len(rejected_ids) - 1)


def list_prefix_length(sequences) -> int:
    """Tokens all K sequences share at the start (the prompt); each completion keeps at least its scored token.
    For two sequences this is `shared_prefix_length`."""
    first = sequences[0]
    if len(sequences) == 1:  # one scored response (`attribute_training`): everything before its scored token
        return len(first) - 1
    shared = min(common_prefix_length(first, other) for other in sequences[1:])
    return min(shared, *(len(s) - 1 for s in sequences))


def scored_index(ids, pad_token_id: int) -> int:
    """Index of the token the reward is read at: the last one that is not the pad token. This is the token that
    `*ForSequenceClassification` pools (so `pipeline`, trl and plain transformers read the same one), also when
    pad == eos and a text ends in eos; a causal model's output there does not depend on the eos tokens after it."""
    for index in range(len(ids) - 1, 0, -1):
        if ids[index] != pad_token_id:
            return index
    return 0


def padded_slots(rows: list[list], dtype: torch.dtype) -> torch.Tensor:
    """[lists, Kmax] tensor of per-completion values, 0 in the slots of lists shorter than the longest."""
    width = max(len(row) for row in rows)
    return torch.tensor([list(row) + [0] * (width - len(row)) for row in rows], dtype=dtype)


def attribute_slots(rows: list[list[list[float]]]) -> torch.Tensor:
    """[lists, Kmax, A] tensor of per-completion attribute scores, NaN in the slots of lists shorter than the
    longest (NaN marks a score that is not there, see `losses.regression`)."""
    width, size = max(len(row) for row in rows), len(rows[0][0])
    scores = torch.full((len(rows), width, size), float("nan"))
    for r, row in enumerate(rows):
        scores[r, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return scores


def list_mask(counts: list[int]) -> torch.Tensor:
    """[lists, Kmax] bool, True on the slots of real completions."""
    return torch.arange(max(counts))[None, :] < torch.tensor(counts)[:, None]


def pack_rows(lengths: list[int], max_width: int, multiple: int = 1) -> tuple[int, list[list[int]]]:
    """Pack sequences of `lengths` into rows of one width, wasting as few padded cells as possible.

    Tries the widths total/k (k = 1..n, at least the longest sequence, at most `max_width` unless the longest needs
    more), packs each first-fit-decreasing and keeps the layout with the fewest rows x width cells (ties: the
    narrower, which costs less attention). Returns (width, rows), each row a list of sequence indices.
    """
    def round_up(width):
        return -(-width // multiple) * multiple

    longest, total = max(lengths), sum(lengths)
    widest = max(max_width, round_up(longest))
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best = None
    for k in range(1, len(lengths) + 1):
        width = round_up(max(longest, -(-total // k)))
        if width > widest:
            continue
        rows, free = [], []
        for i in order:
            row = next((r for r, space in enumerate(free) if space >= lengths[i]), None)
            if row is None:
                rows.append([])
                free.append(width)
                row = len(rows) - 1
            rows[row].append(i)
            free[row] -= lengths[i]
        if best is None or len(rows) * width <= best[0] * best[1]:
            best = (len(rows), width, rows)
    _, width, rows = best
    return width, [sorted(row) for row in rows]


def shared_prompt_allows(segment_q, segment_k, branch_q, branch_k, q_index, k_index):
    """The attention rule of the shared-prompt layout, on broadcastable tensors (dense masks and FlexAttention)."""
    same_pair = segment_q == segment_k
    causal = k_index <= q_index
    visible = (branch_k == PROMPT) | (branch_k == branch_q)  # the rejected response never sees the chosen one
    return same_pair & causal & visible


def shared_prompt_mask(segment_ids: torch.Tensor, branch_ids: torch.Tensor) -> torch.Tensor:
    """Dense boolean mask [rows, 1, width, width] (True: may attend) for SDPA and eager attention."""
    index = torch.arange(segment_ids.shape[1], device=segment_ids.device)
    allowed = shared_prompt_allows(
        segment_ids[:, :, None], segment_ids[:, None, :], branch_ids[:, :, None], branch_ids[:, None, :],
        index[:, None], index[None, :],
    )
    return allowed[:, None]


def flex_block_mask(segment_ids: torch.Tensor, branch_ids: torch.Tensor):
    """The same rule as a FlexAttention BlockMask: blocks that no token may attend are skipped, not computed."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(row, head, q_index, k_index):
        return shared_prompt_allows(
            segment_ids[row, q_index], segment_ids[row, k_index], branch_ids[row, q_index], branch_ids[row, k_index],
            q_index, k_index,
        )

    rows, width = segment_ids.shape
    return create_block_mask(mask_mod, rows, None, width, width, device=segment_ids.device)


@dataclass
class Layout:
    """The run's layout, one object that the trainer's collator and forward share: `shared_prompt` packs rows into
    shared-prompt segments; `decided` once `forward.decide_layout` has checked it on the model (a run that falls back
    to plain rows collates plain batches from then on)."""

    shared_prompt: bool = False
    decided: bool = False


@dataclass
class RewardCollator:
    """Collates prepared rows (`preparation.py`): `completion_ids` (K full sequences; a pair is K = 2, chosen first),
    `ranks`, optional `scores`, `margin`, `weight`, `group_id`; K may differ between rows.

    Per-completion keys are [rows, Kmax], 0 in padded slots: `completion_ends` (where each completion's reward is
    read: a row of the plain layout, or a flat cell index row * width + column of the packed one), `list_mask` (True
    on real completions), `ranks`, `response_lengths` (tokens after the shared prompt) and `scores` (only when every
    row has them), and `attribute_scores` [rows, Kmax, A] with `completion_keys` [rows, Kmax] (a hash of each
    completion's text) when the rows carry them. Model inputs: plain layout,
    `input_ids`, `attention_mask` and `end_positions` (each row's scored token, see `scored_index`), one row per
    completion, every row's first completion, then every row's second, ...;
    shared-prompt layout, `input_ids`,
    `position_ids`, `segment_ids` and `branch_ids`, one K-branch segment per row, packed into rows at most
    `max_row_tokens` wide unless one segment needs more.
    Rows with `off_prompt_ids` (training with cross-prompt negatives, see `cross_prompt.py`) add that sequence after
    their completions (one more branch of the row's segment) and `off_prompt_end` [rows] indexes its reward.
    `shared_prompt`: True or False, or a `Layout` whose current choice every batch follows (the trainer's).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    shared_prompt: bool | Layout = False
    max_row_tokens: int = 2048

    def __post_init__(self):
        self.layout = self.shared_prompt if isinstance(self.shared_prompt, Layout) else Layout(self.shared_prompt)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        completions = [e["completion_ids"] for e in examples]
        counts = [len(c) for c in completions]
        sequences = [list(c) + [e["off_prompt_ids"]] if "off_prompt_ids" in e else c
                     for c, e in zip(completions, examples)]
        # The prompt the completions share: response lengths, and the packed segment's prompt (an off-prompt
        # response shares the prompt too, or shortens it where it starts like the completions).
        shared = [list_prefix_length(c) for c in completions]
        if self.layout.shared_prompt:
            prompts = [list_prefix_length(s) if len(s) > len(c) else prompt
                       for s, c, prompt in zip(sequences, completions, shared)]
            batch, ends = self.pack_segments(sequences, prompts)
        else:
            # Completion by completion: every row's first, then every row's second, ... (a batch of pairs is trl's:
            # all chosen rows, then all rejected rows).
            order = [(k, r) for k in range(max(map(len, sequences))) for r in range(len(sequences))
                     if k < len(sequences[r])]
            batch = self.plain_rows([sequences[r][k] for k, r in order])
            ends = [[] for _ in sequences]
            for position, (_, r) in enumerate(order):
                ends[r].append(position)
        batch["completion_ends"] = padded_slots([e[:k] for e, k in zip(ends, counts)], torch.long)
        if len(sequences[0]) > counts[0]:
            batch["off_prompt_end"] = torch.tensor([e[-1] for e in ends])
        batch["list_mask"] = list_mask(counts)
        batch["ranks"] = padded_slots([e["ranks"] for e in examples], torch.long)
        if all(e.get("scores") is not None for e in examples):
            batch["scores"] = padded_slots([e["scores"] for e in examples], torch.float32)
        if "attribute_scores" in examples[0]:  # [rows, Kmax, A], NaN in padded slots
            batch["attribute_scores"] = attribute_slots([e["attribute_scores"] for e in examples])
        if "completion_keys" in examples[0]:
            batch["completion_keys"] = padded_slots([e["completion_keys"] for e in examples], torch.long)
        # Response tokens after the shared prompt: the length metrics and the balanced loss read them.
        batch["response_lengths"] = padded_slots([[len(s) - p for s in c] for c, p in zip(completions, shared)],
                                                 torch.long)
        for key, dtype in ROW_FIELDS:
            if key in examples[0]:
                batch[key] = torch.tensor([e[key] for e in examples], dtype=dtype)
        # Tokens of every full text, prompt counted in each: trl's num_tokens, whatever the layout.
        batch["text_tokens"] = torch.tensor(sum(len(s) for c in completions for s in c))
        return batch

    def plain_rows(self, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
        """One right-padded row per sequence, in order."""
        lengths = torch.tensor([len(s) for s in sequences])
        width = int(lengths.max())
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
        return {
            "input_ids": input_ids,
            "attention_mask": (torch.arange(width)[None, :] < lengths[:, None]).long(),
            "end_positions": torch.tensor([scored_index(s, self.pad_token_id) for s in sequences]),
        }

    def pack_segments(self, groups: list, prompts: list[int]) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
        """Packs groups of sequences that share their first `prompts[g]` tokens (a pair, a list), one segment each:
        the prompt once, then every sequence's tokens after it as its own branch. Returns the model inputs and, per
        group, the flat index (row * width + column) of each sequence's scored token."""
        segments = []  # per group: (tokens, positions, branches, scored token offsets)
        for sequences, shared in zip(groups, prompts):
            sequences = [list(s) for s in sequences]
            tokens, positions, branches, offsets = sequences[0][:shared], list(range(shared)), [PROMPT] * shared, []
            for branch, sequence in enumerate(sequences, start=1):
                scored = scored_index(sequence, self.pad_token_id)
                # A scored token inside the prompt is read there, as in the plain layout; one after it is in this
                # sequence's branch, which starts at the end of the segment so far.
                offsets.append(scored if scored < shared else len(tokens) + scored - shared)
                tokens += sequence[shared:]
                positions += range(shared, len(sequence))  # each branch restarts right after the prompt
                branches += [branch] * (len(sequence) - shared)
            segments.append((tokens, positions, branches, offsets))
        width, rows = pack_rows([len(s[0]) for s in segments], self.max_row_tokens, self.pad_to_multiple_of or 1)
        shape = (len(rows), width)
        batch = {
            "input_ids": torch.full(shape, self.pad_token_id, dtype=torch.long),
            "position_ids": torch.zeros(shape, dtype=torch.long),
            "segment_ids": torch.full(shape, -1, dtype=torch.long),
            "branch_ids": torch.full(shape, PROMPT, dtype=torch.long),
        }
        ends = [[] for _ in groups]
        for r, row in enumerate(rows):
            start = 0
            for group in row:
                tokens, positions, branches, offsets = segments[group]
                cells = slice(start, start + len(tokens))
                batch["input_ids"][r, cells] = torch.tensor(tokens)
                batch["position_ids"][r, cells] = torch.tensor(positions)
                batch["segment_ids"][r, cells] = group
                batch["branch_ids"][r, cells] = torch.tensor(branches)
                ends[group] = [r * width + start + offset for offset in offsets]
                start += len(tokens)
        return batch, ends


PairCollator = RewardCollator  # its name when it collated pairs only
