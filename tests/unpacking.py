"""Inverse of the shared-prompt packing, for tests: the sequences a packed batch holds, to check that packing loses
nothing."""

import torch

from hf_balanced_reward.collator import PROMPT


def unpack_rows(batch: dict[str, torch.Tensor]) -> list[dict]:
    """The `completion_ids` (and `off_prompt_ids`, when the batch has them) of each row of a shared-prompt batch, in
    row order."""
    ids, segments, branches = (batch[k].flatten().tolist() for k in ("input_ids", "segment_ids", "branch_ids"))
    prompts = [[] for _ in range(len(batch["completion_ends"]))]
    tails = [{} for _ in prompts]  # per row: branch -> that sequence's tokens after the prompt
    for token, segment, branch in zip(ids, segments, branches):
        if segment < 0:
            continue
        if branch == PROMPT:
            prompts[segment].append(token)
        else:
            tails[segment].setdefault(branch, []).append(token)
    rows = []
    for prompt, tail in zip(prompts, tails):
        sequences = [prompt + tail[b] for b in sorted(tail)]
        row = {"completion_ids": sequences}
        if "off_prompt_end" in batch:  # the last branch
            row = {"completion_ids": sequences[:-1], "off_prompt_ids": sequences[-1]}
        rows.append(row)
    return rows
