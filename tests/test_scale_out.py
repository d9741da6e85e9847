"""LoRA with its reward head, merged export, gradient checkpointing, mixed precision, configs for launchers."""

import os

import pytest
import torch
from peft import AutoPeftModelForSequenceClassification, LoraConfig
from transformers import AutoModelForSequenceClassification

from hf_balanced_reward import LOSSES, BalancedRewardConfig, BalancedRewardTrainer
from hf_balanced_reward.cli import main
from hf_balanced_reward.forward import score_batch


def config(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path / "out"), report_to="none", per_device_train_batch_size=4,
                    learning_rate=1e-2, logging_steps=1, save_strategy="no", seed=0, group_column="source",
                    max_steps=3)
    return BalancedRewardConfig(**{**defaults, **kwargs})


def lora():
    return LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def rewards(trainer, model, examples):
    model.eval()
    with torch.no_grad():
        return score_batch(model, trainer._prepare_inputs(trainer.data_collator(examples)))[0].T.reshape(-1)


@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_lora_trains_the_head_and_round_trips(tmp_path, model_dir, pairs, gradient_checkpointing):
    args = config(tmp_path, gradient_checkpointing=gradient_checkpointing)
    trainer = BalancedRewardTrainer(model=model_dir, args=args, train_dataset=pairs, peft_config=lora())
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any("score" in n for n in trainable)
    assert not any("embed_tokens" in n or "mlp" in n for n in trainable)  # the base stays frozen
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if n in before and not torch.equal(before[n], p)}
    assert any("score" in n for n in changed), "the reward head was not trained"
    assert any("lora_B" in n for n in changed)

    examples = [trainer.train_dataset[i] for i in range(4)]
    expected = rewards(trainer, trainer.model, examples)
    trainer.save_model()
    out = trainer.args.output_dir
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))
    reloaded = AutoPeftModelForSequenceClassification.from_pretrained(out, num_labels=1)
    torch.testing.assert_close(rewards(trainer, reloaded, examples), expected, atol=1e-5, rtol=1e-5)

    trainer.save_merged_model(os.path.join(out, "merged"))
    merged = AutoModelForSequenceClassification.from_pretrained(os.path.join(out, "merged"))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(rewards(trainer, merged, examples), expected, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_steps(tmp_path, model_dir, pairs):
    def run(checkpointing):
        trainer = BalancedRewardTrainer(model=model_dir, args=config(tmp_path, gradient_checkpointing=checkpointing),
                                        train_dataset=pairs)
        trainer.train()
        return [log["loss"] for log in trainer.state.log_history if "loss" in log], trainer.model.state_dict()

    losses, weights = run(True)
    plain_losses, plain_weights = run(False)
    assert losses == pytest.approx(plain_losses, abs=1e-6)
    for name, value in plain_weights.items():
        torch.testing.assert_close(weights[name], value, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_trains_with_fp32_losses_and_rewards(tmp_path, model_dir, pairs):
    seen = {"head": set(), "rewards": set()}

    def recording_loss(chosen_rewards, rejected_rewards, margin=None):
        seen["rewards"].add(chosen_rewards.dtype)
        return LOSSES["bradley_terry"](chosen_rewards, rejected_rewards, margin)

    trainer = BalancedRewardTrainer(model=model_dir, args=config(tmp_path, bf16=True, use_cpu=True),
                                    train_dataset=pairs, loss_fn=recording_loss)
    # Training forwards only: the layout check before the first batch scores two pairs in eval mode, outside autocast.
    trainer.model.score.register_forward_hook(
        lambda module, args, output: seen["head"].add(output.dtype) if module.training else None)
    trainer.train()
    assert seen["head"] == {torch.bfloat16}  # Accelerate's autocast ran the forward in bf16 ...
    assert seen["rewards"] == {torch.float32}  # ... and the loss saw fp32 rewards
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in trainer.state.log_history if "loss" in log)
    assert next(trainer.model.parameters()).dtype == torch.float32  # weights stay fp32; autocast does bf16 matmuls


def test_cli_lora_saves_adapters_and_a_merged_model(tmp_path, model_dir, pairs_file):
    out = tmp_path / "lora"
    assert main(["train", "--model_name_or_path", model_dir, "--dataset_name", pairs_file, "--output_dir", str(out),
                 "--max_steps", "2", "--report_to", "none", "--use_peft", "--lora_r", "4",
                 "--lora_target_modules", "q_proj", "v_proj", "--save_strategy", "no"]) == 0
    assert os.path.isfile(out / "adapter_config.json") and os.path.isfile(out / "merged" / "model.safetensors")
    AutoModelForSequenceClassification.from_pretrained(out / "merged")


def test_cli_qlora_without_bitsandbytes_is_a_clear_error(tmp_path, model_dir, pairs_file, capsys):
    pytest.importorskip("torch")
    if __import__("importlib").util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    assert main(["train", "--model_name_or_path", model_dir, "--dataset_name", pairs_file, "--output_dir",
                 str(tmp_path), "--use_peft", "--load_in_4bit"]) == 2
    assert "load_in_4bit needs bitsandbytes" in capsys.readouterr().err
