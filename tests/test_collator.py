import torch

from conftest import pair_row
from hf_balanced_reward import PairCollator


def test_pairs_become_chosen_rows_then_rejected_rows():
    examples = [
        pair_row([1, 2, 3], [4, 5], margin=0.5, weight=2.0, group_id=1),
        pair_row([6, 7], [8], margin=0.0, weight=1.0, group_id=0),
    ]
    batch = PairCollator(pad_token_id=0)(examples)
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 2, 3], [6, 7, 0], [4, 5, 0], [8, 0, 0]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 0, 0]]))
    assert torch.equal(batch["end_positions"], torch.tensor([2, 1, 1, 0]))
    assert torch.equal(batch["margin"], torch.tensor([0.5, 0.0]))
    assert torch.equal(batch["weight"], torch.tensor([2.0, 1.0]))
    assert torch.equal(batch["group_id"], torch.tensor([1, 0]))
    assert torch.equal(batch["completion_ends"], torch.tensor([[0, 2], [1, 3]]))  # each pair's (chosen, rejected) rows


def test_the_scored_token_is_the_last_one_that_is_not_pad():
    # pad == eos (SmolLM2) and texts that end in eos: the reward is read where every client's pooling reads it, the
    # last token that is not the pad token (a causal model's output there ignores the eos after it)
    batch = PairCollator(pad_token_id=9, pad_to_multiple_of=4)([pair_row([1, 9], [2, 3, 9])])
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 9, 9, 9], [2, 3, 9, 9]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]]))
    assert torch.equal(batch["end_positions"], torch.tensor([0, 1]))
    assert torch.equal(batch["response_lengths"], torch.tensor([[2, 3]]))  # no shared prompt: whole sequences
    assert batch["text_tokens"].item() == 5  # both texts' tokens, trl's num_tokens
    assert set(batch) == {"input_ids", "attention_mask", "end_positions", "completion_ends", "list_mask", "ranks",
                          "response_lengths", "text_tokens"}


def test_shared_prompt_layout_reads_the_same_tokens():
    # segment: prompt [5, 6], chosen [7, 9, 9], rejected [9]; the rejected response is all pad, so its scored token
    # is the prompt's last one, as in the plain layout
    pair = pair_row([5, 6, 7, 9, 9], [5, 6, 9])
    batch = PairCollator(pad_token_id=9, shared_prompt=True)([pair])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9, 9, 9]]
    assert batch["branch_ids"].tolist() == [[0, 0, 1, 1, 1, 2]]
    assert batch["completion_ends"].tolist() == [[2, 1]]
    plain = PairCollator(pad_token_id=9)([pair])
    assert plain["end_positions"].tolist() == [2, 1]
