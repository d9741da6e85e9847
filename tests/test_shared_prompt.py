"""The shared-prompt packed layout: packing, masks, exact rewards against the plain layout, fallbacks."""

import dataclasses
import random

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForSequenceClassification, MistralConfig, MistralForSequenceClassification
from transformers import Qwen2Config, Qwen2ForSequenceClassification
from transformers import AutoModelForSequenceClassification

import hf_balanced_reward.forward as forward_module
from conftest import build_tokenizer, pair_row, tiny_llama
from hf_balanced_reward import BalancedRewardConfig, BalancedRewardTrainer, ConfigError, PairCollator
from hf_balanced_reward.collator import flex_block_mask, pack_rows, shared_prompt_mask
from hf_balanced_reward.forward import score_batch
from unpacking import unpack_rows

TEXTS = [  # (prompt, chosen, rejected): shared prompts of several lengths, responses longer and shorter
    ("Question: what is the capital of France? Answer:", " Paris is the capital.", " The quick brown fox."),
    ("Hello world, how are you today?", " Sure, here is a short and polite email.", " Paris."),
    ("Please help me", " write", " Question: what is the capital of France? Answer: Paris is the capital."),
    ("The lazy dog.", " Hello", " Hello world"),  # the rejected response starts like the chosen one
]


def config(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path / "out"), report_to="none", per_device_train_batch_size=4,
                    learning_rate=1e-2, logging_steps=1, save_strategy="no", seed=0)
    return BalancedRewardConfig(**{**defaults, **kwargs})


def tokenized_pairs(tokenizer, texts=TEXTS):
    return [pair_row(tokenizer(p + c)["input_ids"], tokenizer(p + r)["input_ids"]) for p, c, r in texts]


def plain_rewards(model, tokenizer, examples, device="cpu"):
    """Each sequence on its own, no padding, no packing, read where the model's own pooling reads: the reference."""
    rewards = []
    for side in (0, 1):  # every chosen response, then every rejected one
        for example in examples:
            rewards.append(model(torch.tensor([example["completion_ids"][side]], device=device)).logits[0, 0].item())
    return torch.tensor(rewards)


def smollm2_shaped(tokenizer, family="llama"):
    """SmolLM2-135M's attention shape (576 wide, 9 query heads, 3 key/value heads) with 2 layers."""
    shape = dict(vocab_size=len(tokenizer), hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                 num_attention_heads=9, num_key_value_heads=3, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    if family == "qwen2":
        return Qwen2ForSequenceClassification(Qwen2Config(**shape))
    if family == "mistral":
        return MistralForSequenceClassification(MistralConfig(**shape))
    return LlamaForSequenceClassification(LlamaConfig(**shape, tie_word_embeddings=True))


def test_pack_rows_places_every_sequence_once_and_wastes_little():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 16))]
        width, rows = pack_rows(lengths, max_width=512, multiple=rng.choice([1, 8]))
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in row) <= width for row in rows)
        assert width >= max(lengths) and width % 1 == 0
        assert len(rows) * width <= len(lengths) * -(-max(lengths) // 8) * 8  # never worse than one row per pair
    assert pack_rows([10, 10, 10, 5], max_width=40) == (35, [[0, 1, 2, 3]])
    assert pack_rows([12, 6, 6], max_width=12) == (12, [[0], [1, 2]])
    assert pack_rows([10, 10], max_width=40) == (10, [[0], [1]])  # same cells as one row of 20: the narrower wins
    assert pack_rows([50, 10], max_width=20) == (50, [[0], [1]])  # a pair longer than max_width gets its own row


def test_shared_prompt_batch_layout():
    examples = [pair_row([1, 5, 6, 7], [1, 5, 8], margin=0.5, group_id=1),
                pair_row([1, 9], [1, 3], margin=0.0, group_id=0)]
    batch = PairCollator(pad_token_id=0, shared_prompt=True, max_row_tokens=16)(examples)
    # pair 0: prompt [1, 5], chosen [6, 7], rejected [8]; pair 1: prompt [1], chosen [9], rejected [3]
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 5, 6, 7, 8, 1, 9, 3]]))
    assert torch.equal(batch["position_ids"], torch.tensor([[0, 1, 2, 3, 2, 0, 1, 1]]))
    assert torch.equal(batch["segment_ids"], torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1]]))
    assert torch.equal(batch["branch_ids"], torch.tensor([[0, 0, 1, 1, 2, 0, 1, 2]]))
    assert torch.equal(batch["completion_ends"], torch.tensor([[3, 4], [6, 7]]))
    assert torch.equal(batch["margin"], torch.tensor([0.5, 0.0]))
    assert torch.equal(batch["group_id"], torch.tensor([1, 0]))
    assert unpack_rows(batch) == [{"completion_ids": e["completion_ids"]} for e in examples]


def test_mask_lets_rejected_see_the_prompt_and_itself_only():
    batch = PairCollator(pad_token_id=0, shared_prompt=True, pad_to_multiple_of=8)(
        [pair_row([1, 5, 6, 7], [1, 5, 8])]
    )
    mask = shared_prompt_mask(batch["segment_ids"], batch["branch_ids"])[0, 0].int()
    expected = torch.tensor([
        [1, 0, 0, 0, 0],  # prompt
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],  # chosen
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],  # rejected: prompt and itself, not the chosen tokens
    ])
    assert torch.equal(mask[:5, :5], expected)
    assert mask[:5, 5:].sum() == 0 and mask[5:, :5].sum() == 0  # real tokens and padding never mix
    assert bool(mask[5:, 5:].diagonal().all())  # padding rows attend to something: no NaN from an empty softmax


def test_flex_block_mask_encodes_the_same_rule_as_the_dense_mask():
    from torch.nn.attention.flex_attention import create_mask

    examples = tokenized_pairs(build_tokenizer())
    batch = PairCollator(pad_token_id=0, shared_prompt=True, max_row_tokens=64)(examples)
    dense = shared_prompt_mask(batch["segment_ids"], batch["branch_ids"])
    block_mask = flex_block_mask(batch["segment_ids"], batch["branch_ids"])
    rows, width = batch["segment_ids"].shape
    assert torch.equal(create_mask(block_mask.mask_mod, rows, 1, width, width, device="cpu"), dense)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("max_length", [None, 24], ids=["whole", "left_truncated"])
def test_shared_prompt_rewards_equal_the_plain_forward(tmp_path, family, max_length):
    tokenizer = build_tokenizer(pad_is_eos=True)  # SmolLM2: pad == eos
    model = smollm2_shaped(tokenizer, family)
    args = config(tmp_path, max_length=max_length, append_eos_token=True, on_bad_rows="skip")
    texts = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in TEXTS]
    trainer = BalancedRewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(texts),
                                    processing_class=tokenizer)
    assert trainer.shared_prompt
    examples = list(trainer.train_dataset)
    if max_length:  # two prompts were cut from the left; the pair whose response alone is too long was dropped
        assert len(examples) == 3 and all(len(e["completion_ids"][0]) <= max_length for e in examples)
    # wide rounding makes packing several pairs per row the cheapest layout
    packed = dataclasses.replace(trainer.data_collator, pad_to_multiple_of=64)
    model.eval()
    with torch.no_grad():
        reference = plain_rewards(model, tokenizer, examples)
        for collator in (trainer.data_collator, packed):
            batch = collator(examples)
            assert "segment_ids" in batch
            fast = score_batch(model, batch)[0].T.reshape(-1)
            assert (fast - reference).abs().max() <= 1e-4
    assert len(batch["input_ids"]) < len(examples)


def test_bf16_autocast_keeps_rewards_close(tmp_path):
    tokenizer = build_tokenizer()
    model = smollm2_shaped(tokenizer).eval()
    trainer = BalancedRewardTrainer(model=model, args=config(tmp_path), processing_class=tokenizer)
    examples = tokenized_pairs(tokenizer)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast = score_batch(model, trainer.data_collator(examples))[0].T.reshape(-1)
        plain = score_batch(model, PairCollator(tokenizer.pad_token_id)(examples))[0].T.reshape(-1)
    assert fast.dtype == torch.float32
    assert (fast - plain).abs().max() <= 0.05 * (1 + plain.abs().max())


def test_first_training_steps_match_the_plain_layout(tmp_path, model_dir, pairs):
    def run(shared_prompt):
        # SGD, not Adam: Adam divides by a near-zero second moment early on, so a 1e-7 gradient difference can move
        # a weight by up to the learning rate; SGD moves it by lr x that difference, which a tight bound can check.
        args = config(tmp_path, shared_prompt=shared_prompt, max_steps=4, group_column="source", loss_type="balanced",
                      optim="sgd", learning_rate=0.1)
        trainer = BalancedRewardTrainer(model=model_dir, args=args, train_dataset=pairs)
        assert trainer.shared_prompt == shared_prompt
        trainer.train()
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        return losses, dict(trainer.model.named_parameters())

    initial = dict(AutoModelForSequenceClassification.from_pretrained(model_dir).named_parameters())
    fast_losses, fast_params = run(True)
    plain_losses, plain_params = run(False)
    assert len(fast_losses) == 4
    assert fast_losses == pytest.approx(plain_losses, abs=1e-5)
    moved = [name for name, value in plain_params.items() if not torch.equal(value, initial[name])]
    assert "score.weight" in moved and len(moved) > 10
    for name, value in plain_params.items():
        torch.testing.assert_close(fast_params[name], value, atol=1e-6, rtol=1e-5)


def test_a_model_that_breaks_the_layout_falls_back_to_plain(tmp_path, tokenizer, pairs, monkeypatch, caplog):
    def causal_only(segment_ids, branch_ids):  # as if the model ignored the layout's mask: plain causal attention
        width = segment_ids.shape[1]
        return torch.ones(width, width, dtype=torch.bool).tril().expand(len(segment_ids), 1, width, width)

    monkeypatch.setattr(forward_module, "shared_prompt_mask", causal_only)
    trainer = BalancedRewardTrainer(model=tiny_llama(tokenizer), args=config(tmp_path, max_steps=2),
                                    train_dataset=pairs, processing_class=tokenizer)
    with caplog.at_level("WARNING"):
        trainer.train()
    assert "shared-prompt layout changes this model's rewards" in caplog.text and "Using the plain layout" in caplog.text
    assert not trainer.shared_prompt
    examples = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(examples)
    assert "segment_ids" not in batch  # decided once: every batch after the check is collated plain
    assert batch.keys() == PairCollator(tokenizer.pad_token_id)(examples).keys()

    args = config(tmp_path, max_steps=2, shared_prompt=True)
    strict = BalancedRewardTrainer(model=tiny_llama(tokenizer), args=args, train_dataset=pairs,
                                   processing_class=tokenizer)
    with pytest.raises(ConfigError, match="shared-prompt layout changes this model's rewards.*shared_prompt: false"):
        strict.train()


def test_group_by_length_sorts_by_the_unique_tokens_of_each_pair(tmp_path, model_dir):
    rows = [{"prompt": "Hello" * (1 + i % 7), "chosen": " world" * (1 + i % 5), "rejected": " No."}
            for i in range(64)]
    args = config(tmp_path, train_sampling_strategy="group_by_length", per_device_train_batch_size=8)
    trainer = BalancedRewardTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(rows))
    lengths = trainer.train_dataset["length"]
    packed_alone = PairCollator(0, shared_prompt=True)([trainer.train_dataset[0]])["input_ids"]
    assert lengths[0] == packed_alone.shape[1]  # prompt once, both responses

    def batches():
        torch.manual_seed(0)
        return list(trainer.get_train_dataloader().batch_sampler)

    assert trainer._get_train_sampler().lengths == lengths  # HF's sampler reads our column, not input_ids
    first = batches()
    assert first == batches()  # same seed, same order
    assert sorted(i for batch in first for i in batch) == list(range(64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention block masks run on CUDA")
def test_flex_attention_on_cuda_equals_the_plain_forward(tmp_path):
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    shape = dict(vocab_size=len(tokenizer), hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                 num_attention_heads=9, num_key_value_heads=3, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    config_ = LlamaConfig(**shape, attn_implementation="flex_attention")
    model = LlamaForSequenceClassification(config_).cuda().eval()
    trainer = BalancedRewardTrainer(model=model, args=config(tmp_path), processing_class=tokenizer)
    examples = tokenized_pairs(tokenizer)
    batch = {k: v.cuda() for k, v in trainer.data_collator(examples).items()}
    with torch.no_grad():
        fast = score_batch(model, batch)[0].T.reshape(-1).cpu()
        model.set_attn_implementation("sdpa")
        reference = plain_rewards(model, tokenizer, examples, device="cuda").cpu()
    assert (fast - reference).abs().max() <= 1e-3
