import glob
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import load_config_from_file

from conftest import REPO
from hf_balanced_reward import BalancedRewardConfig
from hf_balanced_reward.cli import main, parse_train_args


@pytest.fixture
def recipe(tmp_path, model_dir, pairs_file):
    def write(**overrides):
        values = {
            "model_name_or_path": model_dir, "dataset_name": pairs_file, "eval_split_ratio": 0.25,
            "evaluate_before_training": True, "group_column": "source", "output_dir": str(tmp_path / "run"),
            "loss_type": "balanced", "max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 0.01,
            "report_to": "none", "save_strategy": "no", **overrides,
        }
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(values))
        return str(path)

    return write


def test_train_end_to_end(recipe, tmp_path, capsys):
    assert main(["train", "--config", recipe(), "--loss_type", "hinge"]) == 0  # the flag overrides the YAML
    out = capsys.readouterr().out
    assert "accuracy" in out and "balanced_accuracy" in out and "before" in out
    assert f"Model saved to {tmp_path / 'run'}" in out
    assert os.path.exists(tmp_path / "run" / "model.safetensors")
    assert len(json.loads((tmp_path / "run" / "config.json").read_text())["id2label"]) == 1
    saved_args = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert "eval_worst_group_accuracy" in saved_args


def test_python_module_entry_point_and_flag_precedence(recipe, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "hf_balanced_reward", "train", "--config", recipe(max_steps=3), "--max_steps", "1",
         "--eval_split_ratio", "0.5"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "train_results.json").read_text())["epoch"] > 0
    assert "Model saved to" in result.stdout


def test_yaml_values_and_flags_reach_the_config(recipe):
    script_args, config = parse_train_args(["--config", recipe(loss_kwargs={"group_dro": True}), "--seed", "7"])
    assert config.loss_type == "balanced" and config.loss_kwargs == {"group_dro": True} and config.seed == 7
    assert script_args.eval_split_ratio == 0.25


ERRORS = [
    (lambda r: ["train", "--config", r(loss_tpye="hinge")],
     r"config '.*recipe.yaml' has unknown key 'loss_tpye' \(did you mean 'loss_type'\?\)"),
    (lambda r: ["train", "--config", r(), "--loss_type", "bradly_terry"],
     r"loss_type='bradly_terry' is not a known loss \(did you mean 'bradley_terry'\?\)"),
    (lambda r: ["train", "--config", r(), "--lerning_rate", "0.1"],
     r"unknown option '--lerning_rate' \(did you mean 'learning_rate'\?\)"),
    (lambda r: ["train", "--config", "no/such/recipe.yaml"], r"cannot read config 'no/such/recipe.yaml'"),
    (lambda r: ["train", "--config", r(), "--dataset_name", "no/such/file.jsonl"],
     r"dataset 'no/such/file.jsonl' does not exist"),
    (lambda r: ["train", "--config", r(), "--model_name_or_path", "package:no_such_package/model"],
     r"Python package 'no_such_package' is not installed"),
    (lambda r: ["tran"], r"unknown command 'tran' \(did you mean 'train'\?\)"),
    (lambda r: ["train", "--config", r(model_name_or_path=None)], r"model_name_or_path is required"),
    (lambda r: ["train", "--config", r(), "--lr_scheduler_type", "cosin"], r"cosin"),
]


@pytest.mark.parametrize("argv,message", ERRORS, ids=[m[:30] for _, m in ERRORS])
def test_user_errors_exit_2_with_one_message(recipe, capsys, argv, message):
    try:
        status = main(argv(recipe))
    except SystemExit as exit:  # argparse's own checks (e.g. a choice) exit by themselves
        status = exit.code
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-balanced-reward: error: ") or "error:" in err
    assert "Traceback" not in err
    assert re.search(message, err), err


def test_missing_chosen_column_fails_before_the_model_loads(recipe, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "answer": "b", "rejected": "c"}) + "\n")
    argv = ["train", "--config", recipe(model_name_or_path="/no/such/model"), "--dataset_name", str(bad)]
    assert main(argv) == 2  # the model path is never touched: the data error comes first
    assert "train dataset has no 'chosen' column; its columns are ['prompt', 'answer', 'rejected']" in (
        capsys.readouterr().err
    )


def test_bad_yaml_from_the_console_script(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss_type: [unclosed\n")
    script = os.path.join(os.path.dirname(sys.executable), "hf-balanced-reward")  # installed beside this python
    result = subprocess.run([script, "train", "--config", str(bad)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "is not valid YAML" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "recipes", "*.yaml"))), ids=os.path.basename)
def test_every_recipe_parses(path):
    text = open(path, encoding="utf-8").read()
    gpu_recipe = "bf16: true" in text
    # TrainingArguments refuses bf16 without a GPU unless told the run is on CPU; the recipe's values are unchanged.
    cpu = ["--use_cpu", "true"] if gpu_recipe and not torch.cuda.is_available() else []
    script_args, config = parse_train_args(["--config", path, *cpu])
    assert isinstance(config, BalancedRewardConfig) and script_args.model_name_or_path and script_args.dataset_name
    launch = re.search(r"accelerate launch --config_file (\S+) -m hf_balanced_reward train --config (\S+)", text)
    if gpu_recipe:  # the exact command is at the top, naming a launcher config that exists and this very recipe
        assert config.bf16 and config.gradient_checkpointing
        assert launch and os.path.isfile(os.path.join(REPO, launch.group(1)))
        assert launch.group(2) == os.path.relpath(path, REPO)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "accelerate_configs", "*.yaml"))),
                         ids=os.path.basename)
def test_every_accelerate_config_loads(path):
    loaded = load_config_from_file(path)
    assert loaded.num_processes >= 1
    assert loaded.mixed_precision == "no"  # precision lives in the recipe only


def test_recipes_and_configs_exist():
    assert os.path.exists(os.path.join(REPO, "recipes", "quickstart.yaml"))
    expected = {"single_gpu.yaml": "NO", "multi_gpu.yaml": "MULTI_GPU", "fsdp2.yaml": "FSDP",
                "deepspeed_zero2.yaml": "DEEPSPEED", "deepspeed_zero3.yaml": "DEEPSPEED", "multi_node.yaml": "MULTI_GPU"}
    for name, kind in expected.items():  # each launcher the README lists, loaded as what it claims to be
        loaded = load_config_from_file(os.path.join(REPO, "accelerate_configs", name))
        assert loaded.distributed_type == kind, name
    zero3 = load_config_from_file(os.path.join(REPO, "accelerate_configs", "deepspeed_zero3.yaml"))
    assert zero3.deepspeed_config["zero_stage"] == 3 and zero3.deepspeed_config["zero3_save_16bit_model"]
    fsdp = load_config_from_file(os.path.join(REPO, "accelerate_configs", "fsdp2.yaml"))
    assert fsdp.fsdp_config["fsdp_version"] == 2 and fsdp.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_compare_prints_runs_side_by_side(tmp_path, capsys):
    for name, shorter in (("bt", 0.8), ("balanced", 0.95)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval_results.json").write_text(json.dumps(
            {"eval_accuracy": 0.9, "eval_length_balanced_accuracy": 0.85, "eval_accuracy_a_chosen_longer": 1.0,
             "eval_accuracy_a_chosen_shorter": shorter, "eval_accuracy_a_same_length": 0.5}))
    assert main(["compare", str(tmp_path / "bt"), str(tmp_path / "balanced")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["metric", "bt", "balanced"]
    assert "accuracy_a_chosen_shorter 0.8000 0.9500" in [" ".join(line.split()) for line in lines]
    assert not any("same_length" in line for line in lines)  # the cells that show the shortcut, not the third
    assert main(["compare", str(tmp_path / "missing")]) == 2
    assert f"'{tmp_path / 'missing'}' has no eval_results.json" in capsys.readouterr().err
