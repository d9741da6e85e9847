"""Lists of K completions of one prompt: the collated tensors of both layouts (the rewards the K-branch layout gives
against one plain forward per sequence: test_forward.py)."""

import torch

from hf_balanced_reward import PairCollator
from unpacking import unpack_rows


EXAMPLES = [
    {"completion_ids": [[1, 5, 6, 7], [1, 5, 8], [1, 5, 9, 9, 4]], "ranks": [1, 2, 2], "scores": [3.0, 1.0, 1.0],
     "weight": 2.0, "group_id": 1},
    {"completion_ids": [[1, 3], [1, 4]], "ranks": [2, 1], "scores": [0.0, 1.0], "weight": 1.0, "group_id": 0},
]


def test_list_fields_are_padded_to_the_longest_list():
    batch = PairCollator(pad_token_id=0)(EXAMPLES)
    assert torch.equal(batch["ranks"], torch.tensor([[1, 2, 2], [2, 1, 0]]))
    assert torch.equal(batch["list_mask"], torch.tensor([[True, True, True], [True, True, False]]))
    assert torch.equal(batch["scores"], torch.tensor([[3.0, 1.0, 1.0], [0.0, 1.0, 0.0]]))
    assert torch.equal(batch["response_lengths"], torch.tensor([[2, 1, 3], [1, 1, 0]]))  # prompts [1, 5] and [1]
    assert torch.equal(batch["weight"], torch.tensor([2.0, 1.0]))
    assert torch.equal(batch["group_id"], torch.tensor([1, 0]))
    assert batch["ranks"].dtype == batch["completion_ends"].dtype == batch["response_lengths"].dtype == torch.long
    assert batch["scores"].dtype == batch["weight"].dtype == torch.float32

    without = [{k: v for k, v in e.items() if k not in ("scores", "weight", "group_id")} for e in EXAMPLES]
    assert not {"scores", "weight", "group_id"} & set(PairCollator(0)(without))
    one_missing = [EXAMPLES[0], {**EXAMPLES[1], "scores": None}]
    assert "scores" not in PairCollator(0)(one_missing)  # scores for some lists only: none


def test_plain_list_layout_is_one_row_per_completion_completion_by_completion():
    batch = PairCollator(pad_token_id=0)(EXAMPLES)  # every list's first completion, then every list's second, ...
    assert torch.equal(batch["input_ids"], torch.tensor(
        [[1, 5, 6, 7, 0], [1, 3, 0, 0, 0], [1, 5, 8, 0, 0], [1, 4, 0, 0, 0], [1, 5, 9, 9, 4]]))
    assert torch.equal(batch["attention_mask"], (batch["input_ids"] != 0).long())
    assert torch.equal(batch["end_positions"], torch.tensor([3, 1, 2, 1, 4]))
    assert torch.equal(batch["completion_ends"], torch.tensor([[0, 2, 4], [1, 3, 0]]))
    assert "segment_ids" not in batch


def test_shared_prompt_list_layout_is_one_k_branch_segment_per_list():
    batch = PairCollator(pad_token_id=0, shared_prompt=True, max_row_tokens=16)(EXAMPLES)
    # list 0: prompt [1, 5], completions [6, 7], [8], [9, 9, 4]; list 1: prompt [1], completions [3], [4]
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 5, 6, 7, 8, 9, 9, 4, 1, 3, 4]]))
    assert torch.equal(batch["position_ids"], torch.tensor([[0, 1, 2, 3, 2, 2, 3, 4, 0, 1, 1]]))
    assert torch.equal(batch["segment_ids"], torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1]]))
    assert torch.equal(batch["branch_ids"], torch.tensor([[0, 0, 1, 1, 2, 3, 3, 3, 0, 1, 2]]))
    assert torch.equal(batch["completion_ends"], torch.tensor([[3, 4, 7], [9, 10, 0]]))
    assert torch.equal(batch["ranks"], torch.tensor([[1, 2, 2], [2, 1, 0]]))
    assert unpack_rows(batch) == [{"completion_ids": e["completion_ids"]} for e in EXAMPLES]

    rows = PairCollator(pad_token_id=0, shared_prompt=True, max_row_tokens=8)(EXAMPLES)  # too narrow for both
    assert torch.equal(rows["input_ids"], torch.tensor([[1, 5, 6, 7, 8, 9, 9, 4], [1, 3, 4, 0, 0, 0, 0, 0]]))
    assert torch.equal(rows["segment_ids"][1], torch.tensor([1, 1, 1, -1, -1, -1, -1, -1]))
    assert torch.equal(rows["completion_ends"], torch.tensor([[3, 4, 7], [9, 10, 0]]))  # row 1 starts at 8
    assert unpack_rows(rows) == unpack_rows(batch)


def test_a_completion_read_inside_the_prompt_is_read_there_in_both_layouts():
    # pad == eos == 9: completion 1 is the prompt and eos, so its scored token is the prompt's last one
    example = {"completion_ids": [[5, 6, 7, 9], [5, 6, 9], [5, 6, 8]], "ranks": [1, 2, 3]}
    packed = PairCollator(pad_token_id=9, shared_prompt=True)([example])
    assert packed["input_ids"].tolist() == [[5, 6, 7, 9, 9, 8]]
    assert packed["branch_ids"].tolist() == [[0, 0, 1, 1, 2, 3]]
    assert packed["completion_ends"].tolist() == [[2, 1, 5]]
    plain = PairCollator(pad_token_id=9)([example])
    assert plain["end_positions"].tolist() == [2, 1, 2]
    flat, cells = plain["input_ids"].flatten(), packed["input_ids"].flatten()
    width = plain["input_ids"].shape[1]
    assert cells[packed["completion_ends"][0]].tolist() == [flat[r * width + c] for r, c in enumerate([2, 1, 2])]
