"""`hf-balanced-reward tune --config RECIPE.yaml`: a hyperparameter search on Optuna that survives being stopped.

The recipe is a `train` recipe plus a `search:` block (docs/tuning.md):

    search:
      objective: length_balanced_accuracy   # any metric evaluation reports; maximised, losses and errors minimised
      n_trials: 8
      pruner: median                        # optional: stop trials whose evaluations trail earlier trials'
      params:
        learning_rate: {low: 1.0e-5, high: 2.0e-4, log: true}
        loss_kwargs.length_expert: {low: 0.0, high: 1.0}
        per_device_train_batch_size: [16, 32]

Every trial is `BalancedRewardTrainer.hyperparameter_search(backend="optuna")` with a `model_init` that names the
recipe's model: Trainer sets the trial's values on the config, trains, reports each evaluation to Optuna (which
may prune) and returns the objective. The study lives in `output_dir/study.db` (SQLite): a second run of the same
command continues it, and runs side by side share it (`tune_study.py`, which also writes the results).
"""

import dataclasses
import importlib.util
import inspect
import logging
import sys

import yaml

from .errors import UsageError, did_you_mean
from .recipe import check_keys, config_path_in, load_recipe, training_option_names

logger = logging.getLogger(__name__)

INSTALL = "pip install 'hf-balanced-reward[tune]'"
DEFAULT_OBJECTIVE = "length_balanced_accuracy"
LOWER_IS_BETTER = ("loss", "_error", "length_correlation")  # objective names whose direction is "minimize"
# Options that Trainer reads when a trial's training starts, after `hyperparameter_search` has set the trial's
# values: the ones a trial can vary. The others shape the data or the model before the first trial.
TUNABLE = ("learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2",
           "adam_epsilon", "max_grad_norm", "optim", "num_train_epochs", "max_steps", "per_device_train_batch_size",
           "gradient_accumulation_steps", "center_rewards_coefficient")
DATA_LOSS_OPTIONS = ("cross_prompt", "cross_prompt_partners")  # pick each pair's negatives before training
SEARCH_KEYS = ("objective", "direction", "n_trials", "pruner", "pruner_options", "params")
RANGE_KEYS = ("low", "high", "log", "step")


@dataclasses.dataclass
class Search:
    """The `search:` block, checked."""

    params: dict  # option -> {low, high[, log][, step]} or a list of choices
    objective: str = DEFAULT_OBJECTIVE
    direction: str = "maximize"
    n_trials: int = 20
    pruner: str = "none"
    pruner_options: dict = dataclasses.field(default_factory=dict)


def tune_main(argv: list[str]) -> int:
    """The `tune` command; returns its exit status."""
    if any(arg in ("-h", "--help") for arg in argv):
        print("usage: hf-balanced-reward tune --config RECIPE.yaml [--option value ...]\n"
              "A train recipe with a search: block (objective, n_trials, pruner, params); see docs/tuning.md.")
        return 0
    if importlib.util.find_spec("optuna") is None:
        raise UsageError(f"tune needs optuna, which is not installed: {INSTALL}")
    path = config_path_in(argv)
    if path is None:
        raise UsageError("tune needs --config RECIPE.yaml: a train recipe with a search: block (docs/tuning.md).")
    recipe = load_recipe(path)
    names = training_option_names()  # a typo answered before torch loads, as for train
    if names is not None:
        check_keys(recipe, names + ["search"], path)
    search = read_search(recipe.pop("search", None), path)
    return run_search(argv, path, recipe, search)


def read_search(block, path: str) -> Search:
    """The `search:` block's settings and the shape of each range; the options themselves are checked against the
    config by `check_params`."""
    where = f"config '{path}': search"
    if not isinstance(block, dict):
        raise UsageError(f"{where} must be a mapping with params (e.g. learning_rate: {{low: 1.0e-5, high: 1.0e-4, "
                         "log: true}) and optionally objective, direction, n_trials, pruner; see docs/tuning.md.")
    for key in block:
        if key not in SEARCH_KEYS:
            raise UsageError(f"{where} has unknown key '{key}'{did_you_mean(key, SEARCH_KEYS)}; its keys: "
                             f"{', '.join(SEARCH_KEYS)}.")
    objective = str(block.get("objective", DEFAULT_OBJECTIVE)).removeprefix("eval_")
    direction = block.get("direction") or ("minimize" if objective.endswith(LOWER_IS_BETTER) else "maximize")
    if direction not in ("maximize", "minimize"):
        raise UsageError(f"{where}: direction must be maximize or minimize, got {direction!r}.")
    n_trials = block.get("n_trials", Search.n_trials)
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise UsageError(f"{where}: n_trials must be a whole number of trials, at least 1; got {n_trials!r}.")
    pruner, options = block.get("pruner", "none"), block.get("pruner_options") or {}
    if pruner not in ("none", "median"):
        raise UsageError(f"{where}: pruner must be median (Optuna's MedianPruner) or none, got {pruner!r}.")
    if options:
        check_pruner_options(where, pruner, options)
    params = block.get("params")
    if not isinstance(params, dict) or not params:
        raise UsageError(f"{where}: params must map each option to search to a range {{low: .., high: ..}} or a "
                         "list of choices, e.g. learning_rate: {low: 1.0e-5, high: 1.0e-4, log: true}.")
    for name, spec in params.items():
        check_spec(f"{where}: params: {name}", spec)
    return Search(params, objective, direction, n_trials, pruner, options)


def check_pruner_options(where: str, pruner: str, options) -> None:
    import optuna

    names = list(inspect.signature(optuna.pruners.MedianPruner).parameters)
    if pruner != "median" or not isinstance(options, dict):
        raise UsageError(f"{where}: pruner_options is a mapping of MedianPruner's arguments ({', '.join(names)}), "
                         "with pruner: median.")
    for key in options:
        if key not in names:
            raise UsageError(f"{where}: pruner_options has unknown key '{key}'{did_you_mean(key, names)}; "
                             f"MedianPruner takes {', '.join(names)}.")
    try:
        optuna.pruners.MedianPruner(**options)
    except (TypeError, ValueError) as err:
        raise UsageError(f"{where}: pruner_options: {err}") from None


def check_spec(where: str, spec) -> None:
    if isinstance(spec, list):
        if not spec or not all(isinstance(v, (str, int, float, bool)) for v in spec) or len(set(spec)) < len(spec):
            raise UsageError(f"{where}: a list of choices must hold distinct numbers, words or true/false, got "
                             f"{spec!r}.")
        return
    if not isinstance(spec, dict):
        raise UsageError(f"{where}: give a range {{low: .., high: ..}} (log: true for a log scale, step: for a grid) "
                         f"or a list of choices, got {spec!r}.")
    for key in spec:
        if key not in RANGE_KEYS:
            raise UsageError(f"{where}: unknown key '{key}'{did_you_mean(key, RANGE_KEYS)}; a range takes "
                             f"{', '.join(RANGE_KEYS)}.")
    low, high, log, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{where}: {name} must be a number, got {value!r}.")
    if not low < high:
        raise UsageError(f"{where}: low ({low}) must be below high ({high}); a single value belongs in the recipe.")
    if not isinstance(log, bool):
        raise UsageError(f"{where}: log must be true or false, got {log!r}.")
    if log and low <= 0:
        raise UsageError(f"{where}: a log scale needs low > 0, got {low}.")
    if step is not None and (log or isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0):
        raise UsageError(f"{where}: step must be a number > 0, and not with log: true; got {step!r}.")


def check_params(search: Search, settings: dict, path: str, config, parser) -> dict:
    """Each searched option: one a trial can set, its range of the option's type, and every end of a range and every
    choice a valid value (the recipe with it is parsed as `train` parses it). Returns the params with float ranges
    written as floats."""
    from .cli import parse_train_args
    from .config import loss_option_defaults
    from .errors import ConfigError
    from .losses import LOSSES

    loss_fn = LOSSES[config.loss_type]
    defaults = loss_option_defaults(loss_fn)
    loss_options = [o for o in defaults if o not in DATA_LOSS_OPTIONS]
    tunable = list(TUNABLE) + [f"loss_kwargs.{o}" for o in loss_options]
    checked = {}
    for name, spec in search.params.items():
        where = f"config '{path}': search: params: {name}"
        if name.startswith("loss_kwargs."):
            option = name.split(".", 1)[1]
            if option not in loss_options:
                why = ("it picks each pair's negatives before training" if option in DATA_LOSS_OPTIONS
                       else f"loss '{config.loss_type}' has no such option{did_you_mean(name, tunable)}")
                raise UsageError(f"{where}: not an option a trial can set: {why}. Options a trial sets: "
                                 f"{', '.join(tunable)}.")
            kind = type(defaults[option])
        elif name in TUNABLE:
            kind = getattr(parser._option_string_actions.get(f"--{name}"), "type", None)
        elif f"--{name}" in parser._option_string_actions:
            raise UsageError(f"{where}: cannot vary between trials: it is read when the data is prepared or the model "
                             f"loads, before a trial's values are set. Options a trial sets: {', '.join(tunable)}.")
        else:
            raise UsageError(f"{where}: unknown option{did_you_mean(name, tunable)}; options a trial sets: "
                             f"{', '.join(tunable)}.")
        checked[name] = typed_spec(where, spec, kind)
        values = checked[name] if isinstance(spec, list) else [checked[name]["low"], checked[name]["high"]]
        for value in values:
            try:
                parse_train_args(["--config", path], recipe=with_values(settings, {name: value}))
            except (UsageError, ConfigError, ValueError) as err:
                raise UsageError(f"{where}: {value!r} is not a valid value: {err}") from None
    return checked


def typed_spec(where: str, spec, kind):
    """A range for a number option, in its type (an integer option takes integer ends); choices for the others."""
    if isinstance(spec, list):
        return spec
    if kind not in (int, float):
        raise UsageError(f"{where}: this option is not a number: give a list of choices instead of a range.")
    if kind is int:
        if not all(isinstance(spec.get(k, 1), int) for k in ("low", "high", "step")):
            raise UsageError(f"{where}: an integer option takes whole-number low, high and step, got {spec!r}.")
        return dict(spec)
    return {**spec, "low": float(spec["low"]), "high": float(spec["high"])}


def with_values(recipe: dict, values: dict) -> dict:
    """The recipe with a trial's values: `loss_kwargs.X` merged into the recipe's loss_kwargs."""
    recipe = dict(recipe)
    for name, value in values.items():
        if name.startswith("loss_kwargs."):
            recipe["loss_kwargs"] = {**(recipe.get("loss_kwargs") or {}), name.split(".", 1)[1]: value}
        else:
            recipe[name] = value
    return recipe


def search_space(params: dict, loss_kwargs: dict | None = None):
    """`hp_space` for `hyperparameter_search(backend="optuna")`: each trial's suggested values, as the options
    Trainer sets on the config (a `loss_kwargs.X` value goes into a copy of `loss_kwargs`). A range of integers is
    searched as integers."""

    def hp_space(trial) -> dict:
        values = {name: suggest(trial, name, spec) for name, spec in params.items()}
        options = {k: v for k, v in values.items() if not k.startswith("loss_kwargs.")}
        loss_values = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("loss_kwargs.")}
        if loss_values:
            options["loss_kwargs"] = {**(loss_kwargs or {}), **loss_values}
        return options

    return hp_space


def suggest(trial, name: str, spec):
    if isinstance(spec, list):
        return trial.suggest_categorical(name, spec)
    log, step = spec.get("log", False), spec.get("step")
    if all(isinstance(spec.get(k, 1), int) for k in ("low", "high", "step")):
        return trial.suggest_int(name, spec["low"], spec["high"], step=step or 1, log=log)
    return trial.suggest_float(name, spec["low"], spec["high"], step=step, log=log)


def check_objective(objective: str, path: str) -> None:
    """The objective must be a metric evaluation reports: a name `pair_metrics` or `ranking_metrics` gives (asked of
    them on made-up pairs and lists), or one of the per-group, per-cell and probe names, which depend on the data."""
    import numpy as np

    from .metrics import MIN_CELL_PAIRS, pair_metrics
    from .ranking import ranking_metrics

    # Two groups, each with every length cell full enough to be reported and more chosen-longer pairs than not.
    group = np.repeat([[20, 10], [10, 20], [10, 10]], [2 * MIN_CELL_PAIRS, MIN_CELL_PAIRS, MIN_CELL_PAIRS], axis=0)
    lengths, n = np.tile(group, (2, 1)), 2 * len(group)
    rewards = np.random.default_rng(0).normal(size=(2, n))
    names = set(pair_metrics(*rewards, np.repeat([0, 1], n // 2), ["a", "b"], *lengths.T, calibrate=True))
    names |= set(ranking_metrics([[1.0, 0.0, 0.5]], [[1, 2, 2]])) | {"loss"}
    if objective in names or objective.startswith(("accuracy_", "reward_length_spearman_", "probe_")):
        return
    raise UsageError(f"config '{path}': search: objective '{objective}' is not a metric evaluation reports"
                     f"{did_you_mean(objective, names)}; for example length_balanced_accuracy, accuracy, loss.")


def run_search(argv: list[str], path: str, recipe: dict, search: Search) -> int:
    """Check everything that can be checked without data or model, open the study, run the trials it lacks and
    report them all."""
    from transformers import HfArgumentParser

    from .cli import parse_train_args, quiet_libraries
    from .cli_arguments import ScriptArguments
    from .config import BalancedRewardConfig
    from .tune_study import Study, report, run_trials

    quiet_libraries()
    parser = HfArgumentParser((ScriptArguments, BalancedRewardConfig))
    # The recipe as the command line changed it: what every trial, the study's record and the best recipe start from.
    settings = {**recipe, **flag_values(argv, parser)}
    # A trial that is stopped is run again from its start: checkpoints inside trials would only fill the disk.
    script_args, config = parse_train_args(["--config", path], recipe={**settings, "save_strategy": "no"})
    check_objective(search.objective, path)
    params = check_params(search, settings, path, config, parser)
    check_run(script_args, config, search, path)
    study = Study(config.output_dir, search, settings)
    try:
        run_trials(study, script_args, config, search, search_space(params, config.loss_kwargs))
    except KeyboardInterrupt:
        study.retry_interrupted()
        print(f"hf-balanced-reward: stopped; run the same command again to continue the study in {study.path} (the "
              "interrupted trial runs again).", file=sys.stderr)
        return 130
    report(study.optuna_study, search, settings, config.seed, config.output_dir)
    return 0


def flag_values(argv: list[str], parser) -> dict:
    """The options given on the command line, as a recipe holds them: `--key value` or `--key=value` read as YAML
    (4 is a number, true a boolean), a list for an option of several values, a bare `--flag` true."""
    values, key = {}, None
    for arg in argv:
        if arg.startswith("--"):
            key, has_value, value = arg[2:].partition("=")
            if f"--{key}" not in parser._option_string_actions:
                names = [a.lstrip("-") for a in parser._option_string_actions if a.startswith("--")]
                raise UsageError(f"unknown option '--{key}'{did_you_mean(key, names)}.")
            values[key] = [value] if has_value else []
        elif key is None:
            raise UsageError(f"unexpected argument '{arg}': give options as --option value.")
        else:
            values[key].append(arg)
    values.pop("config", None)
    recipe = {}
    for key, texts in values.items():
        parsed = [yaml_value(text) for text in texts]
        many = parser._option_string_actions[f"--{key}"].nargs in ("+", "*")
        recipe[key] = parsed if many else parsed[0] if len(parsed) == 1 else True if not parsed else parsed
    return recipe


def yaml_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def check_run(script_args, config, search: Search, path: str) -> None:
    if not script_args.eval_dataset_name and script_args.eval_split_ratio is None:
        raise UsageError(f"config '{path}': tune scores every trial on held-out pairs: set eval_dataset_name, or "
                         "eval_split_ratio to hold out a share of the training pairs.")
    if config.load_best_model_at_end:
        raise UsageError(f"config '{path}': load_best_model_at_end does not apply to tune (a trial's objective is "
                         "its trained model's last evaluation); remove it.")
    if search.pruner == "median" and config.eval_strategy == "no":
        raise UsageError(f"config '{path}': pruner: median compares trials' evaluations during training: set "
                         "eval_strategy: steps and eval_steps (or eval_strategy: epoch).")
