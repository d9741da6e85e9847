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
from hf_balanced_reward.recipe import load_recipe


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


def duplicated_key(path: str) -> str:
    """The recipe with learning_rate given a second time, at the end (plain YAML would keep 5.0 silently)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("learning_rate: 5.0\n")
    return path


ERRORS = [
    (lambda r: ["train", "--config", "no/such/recipe.yaml"], r"cannot read config 'no/such/recipe.yaml'"),
    (lambda r: ["train", "--config", r(), "--model_name_or_path", "package:no_such_package/model"],
     r"Python package 'no_such_package' is not installed"),
    (lambda r: ["tran"], r"unknown command 'tran' \(did you mean 'train'\?\)"),
    (lambda r: ["train", "--config", r(model_name_or_path=None)], r"model_name_or_path is required"),
    (lambda r: ["train", "--config", r(), "--lr_scheduler_type", "cosin"], r"cosin"),
    (lambda r: ["train", "--config", r(per_device_train_batch_size=4.7)],
     r"config '.*recipe.yaml': per_device_train_batch_size must be an integer, got 4.7"),
    (lambda r: ["train", "--config", r(gradient_accumulation_steps=True)],
     r"config '.*recipe.yaml': gradient_accumulation_steps must be an integer, got True"),
    (lambda r: ["train", "--config", duplicated_key(r())],
     r"config '.*recipe.yaml' is not valid YAML: key 'learning_rate' is given twice \(lines \d+ and \d+\); keep one"),
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
    recipe = load_recipe(path)
    recipe.pop("search", None)  # a `tune` recipe's search block: checked by tests/test_tune.py
    script_args, config = parse_train_args(["--config", path, *cpu], recipe=recipe)
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


def test_help_typos_and_recipe_mistakes_import_no_heavy_library(tmp_path):
    """`--help`, a typo in the command, `import hf_balanced_reward`, and a recipe with an unknown key, a key given
    twice or broken YAML answer without importing torch, transformers, datasets or trl (several seconds each)."""
    typo = tmp_path / "typo.yaml"
    typo.write_text("model_name_or_path: x\ndataset_name: y\nlearnig_rate: 1.0e-5\n")
    twice = tmp_path / "twice.yaml"
    twice.write_text("learning_rate: 1.0e-5\nlearning_rate: 2.0e-5\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("learning_rate: [1\n")
    code = (
        "import sys, contextlib, io\n"
        "import hf_balanced_reward\n"
        "from hf_balanced_reward.cli import main\n"
        "err = io.StringIO()\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):\n"
        "    assert main(['--help']) == 0 and main(['trian']) == 2\n"
        f"    assert [main(['train', '--config', p]) for p in {[str(typo), str(twice), str(broken)]!r}] == [2, 2, 2]\n"
        "print(err.getvalue())\n"
        "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'trl') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "unknown key 'learnig_rate' (did you mean 'learning_rate'?)" in done.stdout
    assert "key 'learning_rate' is given twice (lines 1 and 2)" in done.stdout
    assert f"config '{broken}' is not valid YAML" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_option_names_read_from_source_are_the_dataclass_fields():
    """The early recipe check reads option names from the dataclasses' source; they must be exactly the fields the
    parser accepts (a new transformers that declares options differently would fail here, not silently)."""
    from dataclasses import fields

    from hf_balanced_reward.cli import ScriptArguments
    from hf_balanced_reward.config import BalancedRewardConfig
    from hf_balanced_reward.recipe import training_option_names

    expected = {f.name for dc in (ScriptArguments, BalancedRewardConfig) for f in fields(dc) if f.init}
    assert set(training_option_names()) == expected


@pytest.mark.parametrize("strategy,expected", [("no", 1), ("steps", 1), ("epoch", 1)])
def test_the_trained_model_is_evaluated_once(recipe, monkeypatch, strategy, expected, caplog):
    """eval_strategy is honoured as Trainer honours it, and the CLI adds one final evaluation only when the run did
    not evaluate at its last step (eval_steps 2 of max_steps 2; the one epoch of 'epoch' ends at the last step)."""
    from hf_balanced_reward.trainer import BalancedRewardTrainer

    calls = []
    original = BalancedRewardTrainer.evaluate

    def counted(self, *args, **kwargs):
        calls.append(self.state.global_step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BalancedRewardTrainer, "evaluate", counted)
    overrides = dict(eval_strategy=strategy, evaluate_before_training=False)
    if strategy == "epoch":
        overrides.update(max_steps=-1, num_train_epochs=1, eval_split_ratio=0.5, per_device_train_batch_size=12)
    elif strategy == "steps":
        overrides["eval_steps"] = 2
    with caplog.at_level("INFO", logger="hf_balanced_reward"):
        assert main(["train", "--config", recipe(**overrides)]) == 0
    assert len(calls) == expected
    assert ("evaluating the trained model on the eval set once" in caplog.text.lower()) == (strategy == "no")


def test_quiet_by_default_and_verbose_when_asked(recipe, tmp_path):
    """The per-row progress bars of datasets and library advice are hidden; this package's one line per stage is
    shown; --verbose brings the rest back."""
    def run(*extra):
        cache = tmp_path / f"cache{len(extra)}"  # its own datasets cache: a cached map shows no progress bar at all
        done = subprocess.run([sys.executable, "-m", "hf_balanced_reward", "train", "--config",
                               recipe(evaluate_before_training=False), *extra],
                              capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(cache)})
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stderr

    quiet, verbose = run(), run("--verbose")
    assert "Checking and tokenizing train pairs" not in quiet and "pin_memory" not in quiet
    assert "Checking and tokenizing train pairs" in verbose
    assert "Shared-prompt layout checked" in quiet  # the package's own messages stay


def test_exponent_numbers_without_a_dot_are_read_as_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads `1e-5` as text; a recipe, and a tune search range, read it as the number it is."""
    path = tmp_path / "recipe.yaml"
    path.write_text("learning_rate: 1e-5\nsearch: {params: {learning_rate: {low: 1e-6, high: 2E-4}}}\nname: '1e-5'\n")
    values = load_recipe(str(path))
    assert values["learning_rate"] == 1e-5 and values["search"]["params"]["learning_rate"] == {"low": 1e-6, "high": 2e-4}
    assert values["name"] == "1e-5"  # quoted: text, as written
