"""Inverse of the shared-prompt packing, for tests: the sequences a packed batch holds, to check that packing loses
nothing."""

import torch

from hf_balanced_reward.collator import CHOSEN, OFF_PROMPT, PROMPT, REJECTED


def unpack_pairs(batch: dict[str, torch.Tensor]) -> list[dict]:
    """The (chosen_ids, rejected_ids[, off_prompt_ids]) examples of a shared-prompt batch, in pair order."""
    ids, segments, branches = (batch[k].flatten().tolist() for k in ("input_ids", "segment_ids", "branch_ids"))
    keys = {CHOSEN: "chosen_ids", REJECTED: "rejected_ids", OFF_PROMPT: "off_prompt_ids"}
    if "off_prompt_end" not in batch:
        del keys[OFF_PROMPT]
    pairs = [{key: [] for key in keys.values()} for _ in range(len(batch["chosen_end"]))]
    for token, pair, branch in zip(ids, segments, branches):
        if pair < 0:
            continue
        for sequence_branch, key in keys.items():
            if branch in (PROMPT, sequence_branch):
                pairs[pair][key].append(token)
    return pairs


def unpack_lists(batch: dict[str, torch.Tensor]) -> list[dict]:
    """The `completion_ids` of each list of a shared-prompt list batch, in list order."""
    ids, segments, branches = (batch[k].flatten().tolist() for k in ("input_ids", "segment_ids", "branch_ids"))
    prompts = [[] for _ in range(len(batch["completion_ends"]))]
    tails = [{} for _ in prompts]  # per list: branch -> that completion's tokens after the prompt
    for token, segment, branch in zip(ids, segments, branches):
        if segment < 0:
            continue
        if branch == PROMPT:
            prompts[segment].append(token)
        else:
            tails[segment].setdefault(branch, []).append(token)
    return [{"completion_ids": [prompt + tail[b] for b in sorted(tail)]} for prompt, tail in zip(prompts, tails)]
