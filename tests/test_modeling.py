"""Loading and readying the model (`modeling.py`): which models get the shared-prompt layout, weights that are not
loaded unless asked, and load errors that name their fix."""

import re

import pytest
from datasets import Dataset

from conftest import tiny_bert, tiny_llama
from hf_balanced_reward import BalancedRewardConfig, BalancedRewardTrainer, ConfigError
from test_bad_inputs import good_rows
from test_shared_prompt import config


def test_shared_prompt_with_an_encoder_fails_before_the_weights_load(tmp_path, tokenizer, no_model_load):
    path = tmp_path / "bert"
    tiny_bert(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    args = BalancedRewardConfig(output_dir=str(tmp_path / "out"), report_to="none", shared_prompt=True)
    with pytest.raises(ConfigError, match="shared_prompt=true does not apply here: BertForSequenceClassification is "
                                          "not a causal decoder"):
        BalancedRewardTrainer(model=str(path), args=args, train_dataset=Dataset.from_list(good_rows()))


def test_encoders_use_the_plain_layout(tmp_path, tokenizer, pairs):
    trainer = BalancedRewardTrainer(model=tiny_bert(tokenizer), args=config(tmp_path), train_dataset=pairs,
                                    processing_class=tokenizer)
    assert not trainer.shared_prompt
    assert "end_positions" in next(iter(trainer.get_train_dataloader()))
    with pytest.raises(ConfigError, match="shared_prompt=true does not apply here: BertForSequenceClassification is "
                                          "not a causal decoder.*Set shared_prompt: false"):
        BalancedRewardTrainer(model=tiny_bert(tokenizer), args=config(tmp_path, shared_prompt=True),
                              train_dataset=pairs, processing_class=tokenizer)


def test_attention_without_custom_masks_uses_the_plain_layout(tmp_path, tokenizer, pairs):
    model = tiny_llama(tokenizer)
    model.config._attn_implementation = "flash_attention_2"  # set directly: flash-attn is not installed here
    trainer = BalancedRewardTrainer(model=model, args=config(tmp_path), train_dataset=pairs, processing_class=tokenizer)
    assert not trainer.shared_prompt
    with pytest.raises(ConfigError, match="attn_implementation='flash_attention_2' cannot take the layout's"):
        BalancedRewardTrainer(model=model, args=config(tmp_path, shared_prompt=True), train_dataset=pairs,
                              processing_class=tokenizer)


def test_pickled_weights_are_not_loaded_unless_asked(tmp_path, tokenizer):
    import torch

    from conftest import tiny_llama

    model = tiny_llama(tokenizer)
    model.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # a pickle: loading it may run code
    args = BalancedRewardConfig(output_dir=str(tmp_path / "out"), report_to="none")
    data = Dataset.from_list(good_rows())
    with pytest.raises(ConfigError, match=r"It has no safetensors weights; if you trust its pickled weights, set "
                                          r"model_init_kwargs: \{use_safetensors: false\}"):
        BalancedRewardTrainer(model=str(tmp_path), args=args, train_dataset=data)
    args = BalancedRewardConfig(output_dir=str(tmp_path / "out"), report_to="none",
                                model_init_kwargs={"use_safetensors": False})
    trainer = BalancedRewardTrainer(model=str(tmp_path), args=args, train_dataset=data)  # asked for: allowed
    torch.testing.assert_close(trainer.model.score.weight, model.score.weight)


OFFLINE_KERNELS = ("Version 1 of 'kernels-community/activation' is not available in the local cache and Hugging Face "
                   "Hub is in offline mode.")  # what transformers 5.25 raises on a GPU machine offline


def test_a_model_that_fails_on_hub_kernels_names_the_switch(tmp_path, model_dir, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    from hf_balanced_reward.scoring import load_reward_model

    def fails(*args, **kwargs):
        raise ValueError(OFFLINE_KERNELS)

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", fails)
    args = BalancedRewardConfig(output_dir=str(tmp_path / "out"), report_to="none")
    switch = r"offline mode\. transformers fetches hub kernels .* set the environment variable USE_HUB_KERNELS=NO"
    with pytest.raises(ConfigError, match=rf"could not load model .{re.escape(model_dir)}.: Version 1 .*{switch}"):
        BalancedRewardTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(good_rows()))
    with pytest.raises(ConfigError, match=rf"could not load reward model .{re.escape(model_dir)}.: .*{switch}"):
        load_reward_model(model_dir)


def test_other_load_errors_get_no_kernels_hint(tmp_path, model_dir, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    def fails(*args, **kwargs):
        raise OSError("no file named config.json")

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", fails)
    args = BalancedRewardConfig(output_dir=str(tmp_path / "out"), report_to="none")
    with pytest.raises(ConfigError, match=r"no file named config\.json$"):
        BalancedRewardTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(good_rows()))
