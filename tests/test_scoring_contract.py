"""The scoring contract: a saved model scores a text in every client exactly as training scored it.

Training reads the reward at the token `*ForSequenceClassification` pools: the last one that is not the pad token.
Each tokenizer shape below once broke that (pad == eos with texts ending in eos; templates rendering BOS); the test
trains, saves, and scores the same texts through the trainer (both layouts), `pipeline`, and plain
`AutoModelForSequenceClassification` with right and left padding.
"""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from conftest import CHAT_TEMPLATE, build_tokenizer, tiny_bert, tiny_llama
from hf_balanced_reward import BalancedRewardConfig, BalancedRewardTrainer, PairCollator
from hf_balanced_reward.data import render_texts
from hf_balanced_reward.forward import score_batch


def plain_rows(n=8):
    return [{"prompt": f"Question {i}: please help me", "chosen": " Sure, here is a short email." + " Hello" * (i % 3),
             "rejected": " No." + " world" * (i % 2)} for i in range(n)]


def chat_rows(n=8):
    return [{"prompt": [{"role": "user", "content": f"Question {i}: please help me"}],
             "chosen": [{"role": "assistant", "content": "Sure, here is a short email." + " Hello" * (i % 3)}],
             "rejected": [{"role": "assistant", "content": "No." + " world" * (i % 2)}]} for i in range(n)]


SHAPES = {  # name: (tokenizer options, model builder, rows, append_eos_token)
    "pad_separate": ({}, tiny_llama, plain_rows, False),
    "pad_is_eos_append_eos": ({"pad_is_eos": True}, tiny_llama, plain_rows, True),
    "pad_is_eos_template_ends_in_eos": ({"pad_is_eos": True}, tiny_llama, chat_rows, False),
    "template_renders_bos": ({"chat_template": "{{ bos_token }}" + CHAT_TEMPLATE}, tiny_llama, chat_rows, False),
    "tokenizer_adds_no_bos": ({"adds_bos": False}, tiny_llama, plain_rows, False),
    "encoder": ({}, tiny_bert, plain_rows, False),
}


def client_rewards(out, texts, padding_side):
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.padding_side = padding_side
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits[:, 0]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_saved_model_scores_as_training_did(tmp_path, shape):
    tokenizer_options, build_model, make_rows, append_eos = SHAPES[shape]
    tokenizer = build_tokenizer(**tokenizer_options)
    rows = make_rows()
    args = BalancedRewardConfig(output_dir=str(tmp_path / "out"), report_to="none", per_device_train_batch_size=4,
                                learning_rate=1e-2, max_steps=2, save_strategy="no", seed=0,
                                append_eos_token=append_eos)
    trainer = BalancedRewardTrainer(model=build_model(tokenizer), args=args, train_dataset=Dataset.from_list(rows),
                                    processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    out = args.output_dir

    examples = [trainer.train_dataset[i] for i in range(len(rows))]
    texts = [render_texts(row, tokenizer, append_eos)[1:] for row in rows]
    texts = [chosen for chosen, _ in texts] + [rejected for _, rejected in texts]
    ids = [e["completion_ids"][0] for e in examples] + [e["completion_ids"][1] for e in examples]
    assert [tokenizer(t)["input_ids"] for t in texts] == ids  # clients tokenise the text as training did
    if "pad_is_eos" in shape:  # the case that once broke: the text ends in the pad token
        assert all(sequence[-1] == tokenizer.pad_token_id for sequence in ids)
    if shape == "template_renders_bos":
        assert all(sequence.count(tokenizer.bos_token_id) == 1 for sequence in ids)

    trainer.model.eval()
    layouts = {"plain": PairCollator(tokenizer.pad_token_id), "trainer's layout": trainer.data_collator}
    expected = None
    for name, collate in layouts.items():
        with torch.no_grad():
            rewards = score_batch(trainer.model, trainer._prepare_inputs(collate(examples)))[0].T.reshape(-1)
        if expected is None:
            expected = rewards
        # fp32 forwards of the same tokens; only the reduction order over padding or packing differs
        torch.testing.assert_close(rewards, expected, atol=1e-5, rtol=1e-5, msg=name)

    scorer = pipeline("text-classification", model=out, function_to_apply="none")
    clients = {"pipeline": torch.tensor([r["score"] for r in scorer(texts, batch_size=4)]),
               "right padding": client_rewards(out, texts, "right")}
    if build_model is tiny_llama:  # an encoder with absolute positions is never left-padded by its tokenizer
        clients["left padding"] = client_rewards(out, texts, "left")
    for client, rewards in clients.items():
        torch.testing.assert_close(rewards, expected, atol=1e-5, rtol=1e-5, msg=client)


def normalised_run(tmp_path, model, tokenizer):
    rows = plain_rows(12)
    args = BalancedRewardConfig(output_dir=str(tmp_path / "out"), report_to="none", per_device_train_batch_size=4,
                                learning_rate=1e-2, max_steps=2, save_strategy="no", seed=0, normalize_rewards=True,
                                max_length=100)
    trainer = BalancedRewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                    eval_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    texts = [text for row in rows for text in render_texts(row, tokenizer, False)[1:]]
    scorer = pipeline("text-classification", model=args.output_dir, function_to_apply="none")
    return trainer, torch.tensor([r["score"] for r in scorer(texts, batch_size=8)], dtype=torch.float64)


def test_normalized_rewards_have_mean_0_and_std_1_through_pipeline(tmp_path):
    tokenizer = build_tokenizer()
    trainer, rewards = normalised_run(tmp_path, tiny_bert(tokenizer), tokenizer)  # a head with a bias
    record = trainer.model.config.reward_normalization
    assert record["shift_folded"] and record["pairs"] == 12 and record["std"] != pytest.approx(1.0, abs=1e-3)
    # fp32 forwards of the measured texts: the mean and std hold to float32 rounding of the rewards
    assert rewards.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert rewards.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    saved = AutoModelForSequenceClassification.from_pretrained(trainer.args.output_dir).config
    assert saved.reward_normalization == record and saved.reward_max_length == 100
    card = open(f"{trainer.args.output_dir}/README.md", encoding="utf-8").read()
    assert "rewards standardised after training" in card
    assert str(tmp_path) not in card  # a pushed card publishes no local path


def test_normalized_rewards_of_a_head_without_bias_fold_the_scale(tmp_path):
    tokenizer = build_tokenizer()
    trainer, rewards = normalised_run(tmp_path, tiny_llama(tokenizer), tokenizer)  # Llama's score has no bias
    record = trainer.model.config.reward_normalization
    assert not record["shift_folded"]
    assert rewards.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    assert rewards.mean().item() == pytest.approx(record["mean"] / record["std"], abs=1e-5)
