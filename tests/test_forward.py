"""The reward forwards of `forward.py`: K-branch packed and plain list rewards against one forward per sequence, and
the layout check that compares them."""

import dataclasses

import pytest
import torch

import hf_balanced_reward.forward as forward_module
from conftest import build_tokenizer, tiny_bert, tiny_llama
from hf_balanced_reward import PairCollator
from hf_balanced_reward.forward import score_batch, shared_prompt_difference
from test_shared_prompt import smollm2_shaped


LISTS = [  # (prompt, completions): prompts of several lengths, completions longer, shorter, or starting alike
    ("Question: what is the capital of France? Answer:",
     [" Paris is the capital.", " The quick brown fox.", " Paris.", ""]),  # "": only eos, read inside the prompt
    ("Hello world, how are you today?", [" Sure, here is a short and polite email.", " Paris.", " Hello", " No."]),
    ("Please help me", [" write", " Question: what is the capital of France? Answer: Paris is the capital.",
                        " write an email.", " Hello world"]),
    ("The lazy dog.", [" Hello", " Hello world", " Hello world, how are you today?", " jumps over the fox."]),
]


def tokenized_lists(tokenizer, sizes):
    """List i keeps the first sizes[i] completions of LISTS[i], each ending in eos as the trainer appends it."""
    return [{"completion_ids": [tokenizer(prompt + c)["input_ids"] + [tokenizer.eos_token_id] for c in texts[:k]],
             "ranks": list(range(1, k + 1))}
            for (prompt, texts), k in zip(LISTS, sizes)]


def one_by_one(model, examples):
    """[lists, Kmax] rewards of each sequence on its own, no padding, read by the model's own pooling."""
    rewards = torch.zeros(len(examples), max(len(e["completion_ids"]) for e in examples))
    for i, example in enumerate(examples):
        for k, ids in enumerate(example["completion_ids"]):
            rewards[i, k] = model(torch.tensor([ids])).logits[0, 0]
    return rewards


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_k_branch_rewards_equal_one_forward_per_sequence(family):
    tokenizer = build_tokenizer(pad_is_eos=True)  # SmolLM2: pad == eos
    model = smollm2_shaped(tokenizer, family).eval()
    plain = PairCollator(tokenizer.pad_token_id)
    packed = PairCollator(tokenizer.pad_token_id, shared_prompt=True)
    packed_rows = dataclasses.replace(packed, pad_to_multiple_of=64)  # wide rounding: several lists per row
    rows_used = []
    with torch.no_grad():
        reference = one_by_one(model, tokenized_lists(tokenizer, [4, 4, 4, 4]))
        for sizes in ([2, 2, 2, 2], [3, 3, 3, 3], [4, 4, 4, 4], [2, 4, 3, 2]):
            examples = tokenized_lists(tokenizer, sizes)
            mask = plain(examples)["list_mask"]
            expected = reference[:, : mask.shape[1]] * mask
            for collator in (packed, packed_rows):
                batch = collator(examples)
                assert (score_batch(model, batch)[0] - expected).abs().max() <= 1e-4
            rows_used.append(len(batch["input_ids"]))
            assert (score_batch(model, plain(examples))[0] - expected).abs().max() <= 1e-4
    assert min(rows_used) < len(LISTS)  # some batch had several lists in one row


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_tiny_llama_k_branch_rewards_and_the_layout_check(attention):
    tokenizer = build_tokenizer()
    model = tiny_llama(tokenizer)
    model.config._attn_implementation = attention
    examples = tokenized_lists(tokenizer, [4, 2, 3, 4])
    batch = PairCollator(tokenizer.pad_token_id, shared_prompt=True)(examples)
    model.eval()
    with torch.no_grad():
        expected = one_by_one(model, examples) * batch["list_mask"]
        assert (score_batch(model, batch)[0] - expected).abs().max() <= 1e-4
    model.train()
    difference, tolerance = shared_prompt_difference(model, examples[:2], tokenizer.pad_token_id, full_precision=True)
    assert difference <= 1e-5 and tolerance >= 1e-3
    assert model.training  # the check leaves the mode as it found it


def test_the_layout_check_catches_a_model_that_ignores_the_mask(monkeypatch):
    def causal_only(segment_ids, branch_ids):  # as if the model ignored the layout's mask: plain causal attention
        width = segment_ids.shape[1]
        return torch.ones(width, width, dtype=torch.bool).tril().expand(len(segment_ids), 1, width, width)

    monkeypatch.setattr(forward_module, "shared_prompt_mask", causal_only)
    tokenizer = build_tokenizer()
    examples = tokenized_lists(tokenizer, [3, 3])
    difference, tolerance = shared_prompt_difference(tiny_llama(tokenizer), examples, tokenizer.pad_token_id, True)
    assert difference > tolerance


def test_encoder_list_rewards_equal_one_forward_per_sequence(tokenizer):
    model = tiny_bert(tokenizer).eval()
    examples = tokenized_lists(tokenizer, [2, 4, 3, 2])
    batch = PairCollator(tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        expected = one_by_one(model, examples) * batch["list_mask"]
        assert (score_batch(model, batch)[0] - expected).abs().max() <= 1e-4
