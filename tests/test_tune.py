"""`tune`: a search on Optuna kept in SQLite. A 4-trial search of the tiny model and its results; a search killed
mid-trial and run again; two processes on one study; pruning; the search block's mistakes; the Python API."""

import contextlib
import csv
import io
import json
import re
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import torch
import yaml
from transformers import TrainerCallback

from conftest import REPO, preference_rows
from hf_balanced_reward import BalancedRewardConfig, BalancedRewardTrainer
from hf_balanced_reward.cli import main, parse_train_args
from hf_balanced_reward.errors import ConfigError
from hf_balanced_reward.recipe import load_recipe
from hf_balanced_reward.tune import read_search, search_space
from hf_balanced_reward.tune_study import STUDY_FILE, retried_trial

TrialState = optuna.trial.TrialState
WAIT_S = 300  # the longest a test waits for a subprocess to reach a point (imports alone take ~15 s on 2 busy CPUs)
BASE = {"group_column": "source", "loss_type": "balanced", "max_steps": 4, "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 24, "learning_rate": 0.01, "eval_strategy": "steps", "eval_steps": 3,
        "logging_steps": 2, "report_to": "none", "seed": 0}
SEARCH = {"objective": "loss", "n_trials": 4, "params": {
    "learning_rate": {"low": 1.0e-3, "high": 5.0e-2, "log": True},
    "loss_kwargs.length_expert": {"low": 0.0, "high": 1.0},
    "per_device_train_batch_size": [4, 8]}}


@pytest.fixture(scope="module")
def pairs_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in preference_rows()))
    return str(path)


def write_recipe(folder, model_dir, pairs_path, search=None, **overrides) -> str:
    recipe = {"model_name_or_path": model_dir, "dataset_name": pairs_path, "eval_dataset_name": pairs_path,
              "output_dir": str(folder / "search"), **BASE, **overrides, "search": search or SEARCH}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in recipe.items() if v is not None}, sort_keys=False))
    return str(path)


def load(output_dir: str) -> optuna.Study:
    return optuna.load_study(study_name="search", storage=f"sqlite:///{os.path.join(output_dir, STUDY_FILE)}")


def states(study) -> list[str]:
    return [t.state.name for t in study.trials]


@pytest.fixture(scope="module")
def finished_search(tmp_path_factory, model_dir, pairs_path):
    """The 4-trial search, run once for the tests that read its results: (recipe, output_dir, what it printed)."""
    folder = tmp_path_factory.mktemp("tune")
    recipe = write_recipe(folder, model_dir, pairs_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["tune", "--config", recipe]) == 0
    return recipe, str(folder / "search"), printed.getvalue()


def test_four_trials_write_the_table_csv_best_recipe_and_plots(finished_search):
    recipe, output_dir, printed = finished_search
    study = load(output_dir)
    assert states(study) == ["COMPLETE"] * 4
    assert study.direction == optuna.study.StudyDirection.MINIMIZE  # inferred for a loss
    for trial in study.trials:
        # Every evaluation reached Optuna (what the pruner reads); the last step, off the eval_steps grid, was
        # evaluated too, and that evaluation is the objective.
        assert sorted(trial.intermediate_values) == [3, 4]
        assert trial.value == trial.intermediate_values[4] == trial.user_attrs["metrics"]["loss"]
        assert os.path.isfile(os.path.join(output_dir, f"run-{trial.number}", "data_report.json"))
    best = study.best_trial
    with open(os.path.join(output_dir, "trials.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["trial"] for r in rows] == ["0", "1", "2", "3"] and {r["state"] for r in rows} == {"complete"}
    assert float(rows[best.number]["loss"]) == best.value
    assert float(rows[best.number]["learning_rate"]) == best.params["learning_rate"]
    assert {"accuracy", "length_balanced_accuracy", "per_device_train_batch_size", "seconds"} <= set(rows[0])
    table = printed.splitlines()
    assert table[0].split() == ["trial", "state", "loss", "accuracy", "learning_rate", "loss_kwargs.length_expert",
                                "per_device_train_batch_size", "seconds"]
    assert table[1 + best.number].split()[0] == f"{best.number}*"
    assert f"Best: trial {best.number}, loss {best.value:.4f}" in printed
    for plot in ("optimization_history", "param_importances"):
        with open(os.path.join(output_dir, "plots", f"{plot}.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_best_recipe_trains_the_best_trial_again(finished_search, tmp_path):
    """The best trial's recipe is a train recipe (no search block, the trial's values, its seed): training it gives
    the trial's evaluation exactly."""
    _, output_dir, _ = finished_search
    best = load(output_dir).best_trial
    path = os.path.join(output_dir, "best_recipe.yaml")
    recipe = load_recipe(path)
    assert "search" not in recipe and recipe["seed"] == 0 and recipe["output_dir"] == os.path.join(output_dir, "best")
    assert recipe["learning_rate"] == best.params["learning_rate"]
    assert recipe["per_device_train_batch_size"] == best.params["per_device_train_batch_size"]
    assert recipe["loss_kwargs"] == {"length_expert": best.params["loss_kwargs.length_expert"]}
    assert parse_train_args(["--config", path])[1].learning_rate == best.params["learning_rate"]
    assert main(["train", "--config", path, "--output_dir", str(tmp_path / "best")]) == 0
    with open(tmp_path / "best" / "eval_results.json") as f:
        results = json.load(f)
    for name, value in best.user_attrs["metrics"].items():
        assert results[f"eval_{name}"] == pytest.approx(value, abs=1e-6), name


def test_a_finished_search_run_again_trains_nothing_and_a_larger_n_trials_extends_it(finished_search, tmp_path,
                                                                                      capsys):
    recipe, output_dir, _ = finished_search
    before = [(t.number, t.datetime_complete, t.value) for t in load(output_dir).trials]
    assert main(["tune", "--config", recipe]) == 0
    assert [(t.number, t.datetime_complete, t.value) for t in load(output_dir).trials] == before
    # Other settings on the study are refused, naming what changed; n_trials may change.
    assert main(["tune", "--config", recipe, "--max_steps", "5"]) == 2
    assert "study.db holds a search made with other settings (changed: max_steps)" in capsys.readouterr().err
    extended = yaml.safe_load(open(recipe))
    extended["search"]["n_trials"] = 5
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(extended))
    assert main(["tune", "--config", str(tmp_path / "recipe.yaml")]) == 0
    trials = load(output_dir).trials
    assert states(load(output_dir)) == ["COMPLETE"] * 5
    assert [(t.number, t.datetime_complete, t.value) for t in trials[:4]] == before


# A tune process that pauses in the first step of one trial (argv: the recipe, the trial number, a file it writes
# when it pauses, a file it waits for): the point where the tests kill it, or run a second process beside it.
PAUSING_TUNE = """
import os, sys, time
from hf_balanced_reward.trainer import BalancedRewardTrainer

recipe, trial_number, paused, go = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
training_step = BalancedRewardTrainer.training_step

def pausing_step(self, *args, **kwargs):
    if self._trial.number == trial_number and not os.path.exists(go):
        open(paused, "w").close()
        deadline = time.monotonic() + 600
        while not os.path.exists(go):
            if time.monotonic() > deadline:
                sys.exit("the test never said go")
            time.sleep(0.1)
    return training_step(self, *args, **kwargs)

BalancedRewardTrainer.training_step = pausing_step
from hf_balanced_reward.cli import main
sys.exit(main(["tune", "--config", recipe]))
"""


def start_pausing_tune(recipe: str, trial_number: int, folder) -> tuple[subprocess.Popen, str, str]:
    paused, go = str(folder / "paused"), str(folder / "go")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", PAUSING_TUNE, recipe, str(trial_number), paused, go], cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return process, paused, go


def wait_until_paused(process: subprocess.Popen, paused: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not os.path.exists(paused):
        if process.poll() is not None:
            pytest.fail(f"the tune process ended (status {process.returncode}) before pausing:\n"
                        f"{process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the tune process did not reach its pause in {WAIT_S} s")
        time.sleep(0.1)


def test_a_search_killed_mid_trial_continues_without_redoing_finished_trials(tmp_path, model_dir, pairs_path):
    search = {**SEARCH, "n_trials": 2}
    recipe = write_recipe(tmp_path, model_dir, pairs_path, search)
    output_dir = str(tmp_path / "search")
    process, paused, _ = start_pausing_tune(recipe, 1, tmp_path)
    try:
        wait_until_paused(process, paused)  # trial 0 done, trial 1 in its first step
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=WAIT_S)
    killed = load(output_dir).trials
    assert states(load(output_dir)) == ["COMPLETE", "RUNNING"]

    assert main(["tune", "--config", recipe]) == 0
    trials = load(output_dir).trials
    assert states(load(output_dir)) == ["COMPLETE", "FAIL", "COMPLETE"]
    # Trial 0 was not trained again; the killed trial 1 was marked failed and ran again with its values, as trial 2.
    assert (trials[0].datetime_complete, trials[0].value) == (killed[0].datetime_complete, killed[0].value)
    assert trials[2].params == killed[1].params and retried_trial(trials[2]) == 1
    assert trials[2].user_attrs["process"]["pid"] == os.getpid()


def test_two_processes_run_one_study_side_by_side(tmp_path, model_dir, pairs_path):
    """A process pauses in trial 0; a second process on the same study runs the two trials left (trial 0, running in
    a live process, counts) and stops; the first then finishes trial 0 and stops: 3 trials, not more."""
    recipe = write_recipe(tmp_path, model_dir, pairs_path, {**SEARCH, "n_trials": 3})
    output_dir = str(tmp_path / "search")
    process, paused, go = start_pausing_tune(recipe, 0, tmp_path)
    try:
        wait_until_paused(process, paused)
        assert main(["tune", "--config", recipe]) == 0
        assert states(load(output_dir)) == ["RUNNING", "COMPLETE", "COMPLETE"]
        open(go, "w").close()
        _, err = process.communicate(timeout=WAIT_S)
    finally:
        process.kill()
    assert process.returncode == 0, err[-3000:]
    trials = load(output_dir).trials
    assert states(load(output_dir)) == ["COMPLETE"] * 3
    owners = [t.user_attrs["process"]["pid"] for t in trials]
    assert owners[0] == process.pid and set(owners[1:]) == {os.getpid()}
    with open(os.path.join(output_dir, "trials.csv"), newline="") as f:
        assert [r["state"] for r in csv.DictReader(f)] == ["complete"] * 3  # written last, by the first process


def test_the_median_pruner_stops_a_trial_that_trails(tmp_path, model_dir, pairs_path):
    """Two trials queued with known values: the second, at a learning rate too small to learn, trails the first at
    its first evaluation and is pruned there."""
    search = {"objective": "loss", "n_trials": 2, "pruner": "median",
              "pruner_options": {"n_startup_trials": 1, "n_warmup_steps": 0},
              "params": {"learning_rate": {"low": 1.0e-7, "high": 0.05, "log": True}}}
    recipe = write_recipe(tmp_path, model_dir, pairs_path, search, eval_steps=1)
    output_dir = str(tmp_path / "search")
    os.makedirs(output_dir)
    queued = optuna.create_study(study_name="search", direction="minimize",
                                 storage=f"sqlite:///{os.path.join(output_dir, STUDY_FILE)}")
    queued.enqueue_trial({"learning_rate": 0.01})
    queued.enqueue_trial({"learning_rate": 1.0e-7})
    assert main(["tune", "--config", recipe]) == 0
    trials = load(output_dir).trials
    assert states(load(output_dir)) == ["COMPLETE", "PRUNED"]
    assert sorted(trials[1].intermediate_values) == [1] and sorted(trials[0].intermediate_values) == [1, 2, 3, 4]


@pytest.mark.parametrize("change,message", [
    (dict(search={**SEARCH, "n_trial": 4}), r"search has unknown key 'n_trial' \(did you mean 'n_trials'\?\)"),
    (dict(params={"learnin_rate": {"low": 0.001, "high": 0.01}}),
     r"params: learnin_rate: unknown option \(did you mean 'learning_rate'\?\); options a trial sets: learning_rate"),
    (dict(params={"loss_kwargs.length_exprt": {"low": 0.0, "high": 1.0}}),
     r"loss 'balanced' has no such option \(did you mean 'loss_kwargs.length_expert'\?\)"),
    (dict(params={"max_length": [64, 128]}), r"params: max_length: cannot vary between trials: it is read when the "
                                             r"data is prepared"),
    (dict(params={"loss_kwargs.cross_prompt": {"low": 0.0, "high": 1.0}}),
     r"it picks each pair's negatives before training"),
    (dict(params={"learning_rate": {"low": 0.1, "high": 0.001}}), r"low \(0.1\) must be below high \(0.001\)"),
    (dict(params={"learning_rate": {"low": 0.0, "high": 0.1, "log": True}}), r"a log scale needs low > 0, got 0.0"),
    (dict(params={"learning_rate": {"low": 0.001, "hgh": 0.1}}), r"unknown key 'hgh' \(did you mean 'high'\?\)"),
    (dict(params={"per_device_train_batch_size": {"low": 2.5, "high": 8}}),
     r"an integer option takes whole-number low, high and step"),
    (dict(params={"lr_scheduler_type": {"low": 1, "high": 2}}), r"not a number: give a list of choices"),
    (dict(params={"learning_rate": 0.01}), r"give a range \{low: .., high: ..\} .* or a list of choices, got 0.01"),
    (dict(params={"loss_kwargs.length_expert": {"low": -1.0, "high": 1.0}}),
     r"length_expert: -1.0 is not a valid value: loss_kwargs length_expert must be a number >= 0"),
    (dict(params={"loss_kwargs.weighting": ["none", "cels"]}),
     r"weighting: 'cels' is not a valid value: .*is not a weighting \(did you mean 'cells'\?\)"),
    (dict(search={**SEARCH, "objective": "length_balanced_acuracy"}),
     r"objective 'length_balanced_acuracy' is not a metric evaluation reports \(did you mean "
     r"'length_balanced_accuracy'\?\)"),
    (dict(search={**SEARCH, "direction": "up"}), r"direction must be maximize or minimize, got 'up'"),
    (dict(search={**SEARCH, "n_trials": 0}), r"n_trials must be a whole number of trials, at least 1; got 0"),
    (dict(search={**SEARCH, "pruner": "hyperband"}), r"pruner must be median \(Optuna's MedianPruner\) or none"),
    (dict(search={**SEARCH, "pruner": "median", "pruner_options": {"n_startup": 2}}),
     r"pruner_options has unknown key 'n_startup' \(did you mean 'n_startup_trials'\?\)"),
    (dict(search={**SEARCH, "pruner": "median"}, eval_strategy="no"),
     r"pruner: median compares trials' evaluations during training: set eval_strategy: steps"),
    (dict(eval_dataset_name=None), r"tune scores every trial on held-out pairs: set eval_dataset_name"),
    (dict(search=[1]), r"search must be a mapping with params"),
    (dict(learnig_rate=0.1), r"unknown key 'learnig_rate' \(did you mean 'learning_rate'\?\)"),
])
def test_search_mistakes_are_named_before_data_or_model_load(tmp_path, capsys, change, message):
    """The model and data paths do not exist: each mistake is named before anything would read them."""
    change = dict(change)
    search = change.pop("search", {**SEARCH, "params": change.pop("params", SEARCH["params"])})
    recipe = write_recipe(tmp_path, "/no/such/model", "/no/such/pairs.jsonl", search, **change)
    assert main(["tune", "--config", recipe]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-balanced-reward: error: ") and len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert not os.path.exists(tmp_path / "search")


def test_without_optuna_tune_says_what_to_install(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else find_spec(name, *a))
    assert main(["tune", "--config", str(tmp_path / "recipe.yaml")]) == 2
    err = capsys.readouterr().err
    assert "tune needs optuna, which is not installed: pip install 'hf-balanced-reward[tune]'" in err


def test_the_quickstart_search_recipe_is_checked_whole():
    """recipes/quickstart_tune.yaml: its search block and its options pass every check that runs before loading."""
    from transformers import HfArgumentParser

    from hf_balanced_reward.cli import ScriptArguments
    from hf_balanced_reward.tune import check_objective, check_params, check_run

    path = os.path.join(REPO, "recipes", "quickstart_tune.yaml")
    recipe = load_recipe(path)
    search = read_search(recipe.pop("search"), path)
    script_args, config = parse_train_args(["--config", path], recipe=recipe)
    check_objective(search.objective, path)
    parser = HfArgumentParser((ScriptArguments, BalancedRewardConfig))
    assert set(check_params(search, recipe, path, config, parser)) == set(search.params)
    check_run(script_args, config, search, path)
    assert search.direction == "maximize" and search.objective == "length_balanced_accuracy"


def test_hyperparameter_search_from_python(tmp_path, model_dir, pairs):
    """BalancedRewardTrainer(model_init=...).hyperparameter_search: every trial trains a fresh model (the same
    starting weights) with its own loss options in force, each in its own run folder."""
    seen = []

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            head = trainer.accelerator.unwrap_model(model).score.weight
            seen.append((args.loss_kwargs, trainer.balance.options.weighting, trainer.balance.options.length_expert,
                         head.sum().item()))

    config = BalancedRewardConfig(output_dir=str(tmp_path), loss_type="balanced", group_column="source", max_steps=2,
                                  per_device_train_batch_size=4, learning_rate=0.01, report_to="none", seed=0)
    trainer = BalancedRewardTrainer(model_init=lambda trial: model_dir, args=config, train_dataset=pairs,
                                    eval_dataset=pairs, callbacks=[Record()])
    space = search_space({"loss_kwargs.weighting": ["cells", "groups"],
                          "loss_kwargs.length_expert": {"low": 0.0, "high": 1.0}})
    best = trainer.hyperparameter_search(backend="optuna", hp_space=space, n_trials=2, direction="maximize",
                                         compute_objective=lambda metrics: metrics["eval_accuracy"],
                                         sampler=optuna.samplers.RandomSampler(seed=0))
    assert len(seen) == 2 and best.run_id in ("0", "1")
    for options, weighting, length_expert, head_sum in seen:
        assert (weighting, length_expert) == (options["weighting"], options["length_expert"])
        assert head_sum == seen[0][3]  # the score head as model_init's model starts, not as a trial left it
    assert os.path.isdir(tmp_path / "run-0") and os.path.isdir(tmp_path / "run-1")


@pytest.mark.parametrize("kwargs", [{}, {"model": "x", "model_init": lambda: "x"}])
def test_the_trainer_takes_model_or_model_init(kwargs):
    with pytest.raises(ConfigError, match=r"needs model \(a model or its name\) or model_init .*, not both"):
        BalancedRewardTrainer(**kwargs)


def test_ctrl_c_stops_the_search_and_the_interrupted_trial_runs_again(tmp_path, model_dir, pairs_path, monkeypatch,
                                                                        capsys):
    recipe = write_recipe(tmp_path, model_dir, pairs_path, {**SEARCH, "n_trials": 1})
    output_dir = str(tmp_path / "search")
    training_step = BalancedRewardTrainer.training_step

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(BalancedRewardTrainer, "training_step", interrupted)
    assert main(["tune", "--config", recipe]) == 130
    assert "run the same command again to continue the study" in capsys.readouterr().err
    assert states(load(output_dir)) == ["FAIL", "WAITING"]  # Optuna failed the trial; tune queued it again
    monkeypatch.setattr(BalancedRewardTrainer, "training_step", training_step)
    assert main(["tune", "--config", recipe]) == 0
    trials = load(output_dir).trials
    assert states(load(output_dir)) == ["FAIL", "COMPLETE"]
    assert trials[1].params == trials[0].params and retried_trial(trials[1]) == 0


def test_failed_trials_are_replaced_until_as_many_failed_as_were_asked_for(tmp_path, model_dir, pairs_path,
                                                                           monkeypatch, capsys):
    """A trial that runs out of memory (or stops on a NaN loss) is marked failed and another takes its place; once as
    many trials have failed as the search asked for, tune stops (exit status 1) instead of sampling forever."""
    training_step, failing = BalancedRewardTrainer.training_step, {0}

    def out_of_memory(self, *args, **kwargs):
        if self._trial.number in failing:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return training_step(self, *args, **kwargs)

    monkeypatch.setattr(BalancedRewardTrainer, "training_step", out_of_memory)
    search = {**SEARCH, "n_trials": 2}
    assert main(["tune", "--config", write_recipe(tmp_path, model_dir, pairs_path, search)]) == 0
    assert states(load(str(tmp_path / "search"))) == ["FAIL", "COMPLETE", "COMPLETE"]

    failing.add(1)
    (tmp_path / "all_fail").mkdir()
    assert main(["tune", "--config", write_recipe(tmp_path / "all_fail", model_dir, pairs_path, search)]) == 1
    assert states(load(str(tmp_path / "all_fail" / "search"))) == ["FAIL", "FAIL"]
    assert "hf-balanced-reward: stopped: 2 trials failed (the messages above say why)" in capsys.readouterr().err
