import torch

from hf_balanced_reward import PairCollator


def test_pairs_become_chosen_rows_then_rejected_rows():
    examples = [
        {"chosen_ids": [1, 2, 3], "rejected_ids": [4, 5], "margin": 0.5, "weight": 2.0, "group_id": 1},
        {"chosen_ids": [6, 7], "rejected_ids": [8], "margin": 0.0, "weight": 1.0, "group_id": 0},
    ]
    batch = PairCollator(pad_token_id=0)(examples)
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 2, 3], [6, 7, 0], [4, 5, 0], [8, 0, 0]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 0, 0]]))
    assert torch.equal(batch["end_positions"], torch.tensor([2, 1, 1, 0]))
    assert torch.equal(batch["margin"], torch.tensor([0.5, 0.0]))
    assert torch.equal(batch["weight"], torch.tensor([2.0, 1.0]))
    assert torch.equal(batch["group_id"], torch.tensor([1, 0]))


def test_end_positions_do_not_depend_on_the_pad_token():
    # pad == eos (SmolLM2): the sequences end in token 9, which is also the pad token
    batch = PairCollator(pad_token_id=9, pad_to_multiple_of=4)([{"chosen_ids": [1, 9], "rejected_ids": [2, 3, 9]}])
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 9, 9, 9], [2, 3, 9, 9]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]]))
    assert torch.equal(batch["end_positions"], torch.tensor([1, 2]))
    assert torch.equal(batch["response_lengths"], torch.tensor([[2, 3]]))  # no shared prompt: whole sequences
    assert set(batch) == {"input_ids", "attention_mask", "end_positions", "response_lengths"}
