"""The study of `tune` in `output_dir/study.db`: safe to stop and to share; its trials; what it reports.

- A trial records the host and pid of its process. A running trial whose process has ended (killed, crashed) is
  marked failed and queued to run again with the same values, by Optuna's retry callback; the same callback serves
  Optuna's heartbeat, which catches the trials of processes on other hosts.
- `study.lock`, a file lock that the kernel drops when its process dies, is held from deciding that the study needs
  another trial until that trial is in the study: processes side by side never run more trials than asked.
- The study keeps the settings that made it (recipe, flags, search) and refuses to go on with others.
- Trials run one `hyperparameter_search` of one trial at a time, on one trainer set up once per process.
- Results: the trials as a table (printed) and as `trials.csv`, the best trial as `best_recipe.yaml` (a recipe to
  train from) and Optuna's history and importance plots in `plots/`.
"""

import contextlib
import csv
import dataclasses
import fcntl
import json
import logging
import os
import socket
import warnings

import yaml
from transformers import TrainerCallback

from .errors import TrainingStopped, UsageError

logger = logging.getLogger(__name__)

STUDY_FILE, LOCK_FILE = "study.db", "study.lock"
PROCESS_ATTR = "process"  # user attribute of a trial: the host and pid of the process that runs it
MAX_RETRIES = 3  # an interrupted trial is run again at most this many times
HEARTBEAT_S = 60  # a trial whose process (on another host) misses 3 heartbeats is failed by Optuna


class Study:
    """The Optuna study of one search; `current` is the trial this process runs."""

    name = "search"

    def __init__(self, output_dir: str, search, settings: dict):
        import optuna

        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        if os.environ.get("HF_BALANCED_REWARD_QUIET"):
            optuna.logging.set_verbosity(optuna.logging.WARNING)  # `tune` logs one line per trial itself
        os.makedirs(output_dir, exist_ok=True)
        self.optuna, self.search, self.path = optuna, search, os.path.join(output_dir, STUDY_FILE)
        self.lock_fd, self.current, self.sampler = None, None, None
        self.pruner = optuna.pruners.MedianPruner(**search.pruner_options) if search.pruner == "median" else None
        self.retry = retry_class()(max_retry=MAX_RETRIES)
        renamed = hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")
        retry_argument = "heartbeat_stale_trial_callback" if renamed else "failed_trial_callback"
        with self.locked():  # one process at a time creates the tables and the study
            self.storage = optuna.storages.RDBStorage(
                f"sqlite:///{os.path.abspath(self.path)}", engine_kwargs={"connect_args": {"timeout": 120}},
                heartbeat_interval=HEARTBEAT_S, grace_period=3 * HEARTBEAT_S, **{retry_argument: self.retry})
            self.optuna_study = optuna.create_study(storage=self.storage, study_name=self.name,
                                                    direction=search.direction, load_if_exists=True)
            self.check_settings(settings)

    def check_settings(self, settings: dict) -> None:
        search = {k: v for k, v in dataclasses.asdict(self.search).items() if k != "n_trials"}
        made_with = json.loads(json.dumps({"recipe": settings, "search": search}, default=str, sort_keys=True))
        stored = self.optuna_study.user_attrs.get("settings")
        if stored is None:
            self.optuna_study.set_user_attr("settings", made_with)
            return
        changed = [key if part == "recipe" else f"search.{key}" for part in ("recipe", "search")
                   for key in sorted(set(stored[part]) | set(made_with[part]))
                   if stored[part].get(key) != made_with[part].get(key)]
        if changed:
            raise UsageError(f"{self.path} holds a search made with other settings (changed: {', '.join(changed)}); "
                             "run it with the settings that made it (n_trials may change), give this search another "
                             f"output_dir, or delete {self.path} to start over.")

    @contextlib.contextmanager
    def locked(self):
        self.lock_fd = os.open(os.path.join(os.path.dirname(self.path), LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
        try:
            yield self
        finally:
            self.release()

    def release(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # closing the only descriptor of the lock lets it go
            self.lock_fd = None

    def trials(self, *states) -> list:
        return self.optuna_study.get_trials(deepcopy=False, states=states or None)

    def needs_trial(self) -> bool:
        """Fail and queue again the running trials whose process has ended; then, do finished and running trials
        fall short of n_trials? Call holding the lock."""
        states = self.optuna.trial.TrialState
        self.optuna.storages.fail_stale_trials(self.optuna_study)  # other hosts' trials, by their heartbeat
        for trial in self.trials(states.RUNNING):
            if process_ended(trial.user_attrs.get(PROCESS_ATTR)):
                try:
                    frozen = self.optuna_study.tell(trial.number, state=states.FAIL)
                except RuntimeError:  # finished meanwhile
                    continue
                logger.info(f"Trial {trial.number} was interrupted (its process has ended): it runs again.")
                self.retry(self.optuna_study, frozen)
        return len(self.trials(states.COMPLETE, states.PRUNED, states.RUNNING)) < self.search.n_trials

    def failures(self) -> list:
        """Failed trials other than interrupted ones (those run again)."""
        retried = {n for t in self.trials() for n in self.retry.retry_history(t)}
        return [t for t in self.trials(self.optuna.trial.TrialState.FAIL) if t.number not in retried]

    def started(self, trial) -> None:
        """A trial of this process has started: it is in the study, so the lock can go."""
        trial.set_user_attr(PROCESS_ATTR, {"host": socket.gethostname(), "pid": os.getpid()})
        self.current = trial
        self.release()

    def objective_function(self):
        """`compute_objective` for hyperparameter_search: the objective in an evaluation's metrics. The shortcut
        metrics are kept with the trial, for the table."""
        from .reports import SHORTCUT_METRICS

        objective = self.search.objective

        def compute_objective(metrics: dict) -> float:
            if f"eval_{objective}" not in metrics:
                reported = sorted(k[len("eval_"):] for k in metrics if k.startswith("eval_"))
                raise UsageError(f"search: objective '{objective}' is not in this evaluation's metrics "
                                 f"({', '.join(reported)}); length_balanced_accuracy needs a length cell with enough "
                                 "pairs. Choose another objective, and another output_dir (a study keeps its own).")
            kept = [objective] + [m for m in SHORTCUT_METRICS if m != objective]
            self.current.set_user_attr("metrics", {m: metrics[f"eval_{m}"] for m in kept if f"eval_{m}" in metrics})
            return metrics[f"eval_{objective}"]

        return compute_objective

    def log_current(self) -> None:
        """One line for the trial this process has just run."""
        trial = self.optuna_study.trials[self.current.number]
        value = trial.user_attrs.get("metrics", {}).get(self.search.objective)
        seconds = trial.duration.total_seconds() if trial.duration else float("nan")
        logger.info(f"Trial {trial.number} {trial.state.name.lower()}: {self.search.objective} "
                    f"{'-' if value is None else f'{value:.4f}'}, {trial.params}, {seconds:.0f} s")

    def retry_interrupted(self) -> None:
        """After Ctrl-C, which Optuna records as a failure of the trial under way: queue it to run again."""
        trial = self.optuna_study.trials[self.current.number] if self.current else None
        if trial is not None and trial.state == self.optuna.trial.TrialState.FAIL:
            self.retry(self.optuna_study, trial)


def process_ended(owner: dict | None) -> bool:
    """Whether a running trial's process is known to have ended: it ran on this host and its pid is gone (a trial of
    another host is left to the heartbeat)."""
    if not owner or owner.get("host") != socket.gethostname():
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def run_trials(study: Study, script_args, config, search, hp_space) -> None:
    """Load the data, set up one trainer, then run trials while the study needs them: a `hyperparameter_search` of
    one trial at a time, since the study, not this process, counts the trials."""
    from .cli import load_datasets, peft_setup
    from .paths import resolve_model_path
    from .trainer import BalancedRewardTrainer

    with study.locked():
        if not study.needs_trial():
            return  # a finished study: nothing to load
    peft_config = peft_setup(script_args, config)
    train_dataset, eval_dataset = load_datasets(script_args, config.seed)
    model_name = resolve_model_path(script_args.model_name_or_path)

    def model_init(trial=None):
        if trial is not None:
            study.started(trial)
        return model_name  # loaded by the trainer with the seed set: every trial starts from the same weights

    quiet = os.environ.get("HF_BALANCED_REWARD_QUIET")  # one line per trial (`log_current`), not every step's log
    if quiet:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # loading the weights, once per trial
    trainer = BalancedRewardTrainer(model_init=model_init, args=config, train_dataset=train_dataset,
                                    eval_dataset=eval_dataset, peft_config=peft_config,
                                    callbacks=[EvaluateLastStep()])
    trainer.remove_callback(trainer.signal_stop)  # SIGTERM ends the process; its trial runs again next time
    if quiet:
        from transformers import PrinterCallback, ProgressCallback

        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
    search_kwargs = dict(hp_space=hp_space, compute_objective=study.objective_function(), n_trials=1,
                         direction=search.direction, backend="optuna", storage=study.storage, study_name=study.name,
                         load_if_exists=True, pruner=study.pruner)
    while True:
        with study.locked():
            if not study.needs_trial():
                return
            failures = study.failures()
            if len(failures) >= search.n_trials:
                raise TrainingStopped(f"{len(failures)} trials failed (the messages above say why); fix the cause or "
                                      "narrow the search, then run the command again.")
            run_one_trial(trainer, study, search_kwargs, config.seed)
        study.log_current()
        study.current = None  # between trials, Ctrl-C interrupts none


def run_one_trial(trainer, study: Study, search_kwargs: dict, seed: int) -> None:
    import torch

    # Seeded by the number of trials before: a resumed or second process does not repeat the first one's draws.
    study.sampler = study.sampler or study.optuna.samplers.TPESampler(seed=seed + len(study.trials()))
    try:
        trainer.hyperparameter_search(sampler=study.sampler, **search_kwargs)
    except (TrainingStopped, torch.OutOfMemoryError) as err:  # Optuna marked the trial failed; the search goes on
        logger.warning(f"Trial {study.current.number} failed: {err}")
    except ValueError as err:
        # hyperparameter_search ends with study.best_trial, which raises this while no trial has completed (the
        # first were pruned, or their objective was NaN); any other ValueError is the trial's own.
        if str(err) != "No trials are completed yet.":
            raise


class EvaluateLastStep(TrainerCallback):
    """Evaluate the last step too, when a run evaluates every eval_steps: `hyperparameter_search` takes a trial's
    objective from its last evaluation, which must be of the trained model."""

    def on_step_end(self, args, state, control, **kwargs):
        if args.eval_strategy == "steps" and state.global_step >= state.max_steps:
            control.should_evaluate = True


def trial_rows(study, search) -> list[dict]:
    """One row per trial: its number, state, the objective and the shortcut metrics of its last evaluation, its
    values, seconds, and the trial it retries."""
    rows = []
    for trial in study.trials:
        metrics = trial.user_attrs.get("metrics", {})
        row = {"trial": trial.number, "state": trial.state.name.lower(),
               search.objective: metrics.get(search.objective)}
        row.update({k: v for k, v in metrics.items() if k != search.objective})
        row.update({name: trial.params.get(name) for name in search.params})
        row["seconds"] = round(trial.duration.total_seconds(), 1) if trial.duration else None
        row["retry_of"] = retried_trial(trial)
        rows.append(row)
    return rows


def retry_class():
    """Optuna's callback that queues an interrupted trial to run again (renamed in Optuna 4.9)."""
    from optuna import storages

    return getattr(storages, "RetryHeartbeatStaleTrialCallback", None) or storages.RetryFailedTrialCallback


def retried_trial(trial) -> int | None:
    """The number of the interrupted trial that `trial` runs again."""
    return retry_class().retried_trial_number(trial)


def format_table(rows: list[dict], search, best: int | None) -> str:
    """The trials aligned in columns: the objective, accuracy (what a search by accuracy would pick) and the
    searched values; the best trial marked with *."""
    columns = ["trial", "state", search.objective] + ["accuracy"] * (search.objective != "accuracy")
    columns += list(search.params) + ["seconds"]

    def cell(row, column):
        value = row.get(column)
        if column == "trial":
            return f"{value}{'*' if value == best else ''}"
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4f}" if column in (search.objective, "accuracy") else f"{value:.4g}"
        return str(value)

    table = [columns] + [[cell(row, c) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in table)


def write_atomically(path: str, write) -> None:
    """`write(file)` into a file beside `path`, then renamed over it: a reader (or a second process writing the same
    results) never sees half a file."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8", newline="") as f:
        write(f)
    os.replace(temporary, path)


def write_csv(rows: list[dict], path: str) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def write(f):
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)

    write_atomically(path, write)


def write_best_recipe(trial, search, settings: dict, seed: int, output_dir: str, path: str) -> None:
    """The recipe (with the command line's options) and the best trial's values, training into output_dir/best with
    the trial's seed: training it repeats the trial."""
    from .tune import with_values

    recipe = {**with_values(settings, trial.params), "output_dir": os.path.join(output_dir, "best"), "seed": seed}
    header = (f"# Trial {trial.number} of the search in {os.path.join(output_dir, STUDY_FILE)}, the best by "
              f"{search.objective} ({trial.value:.4f}), as a recipe; training it repeats the trial:\n"
              f"#   hf-balanced-reward train --config {path}\n")
    write_atomically(path, lambda f: f.write(header + yaml.safe_dump(recipe, sort_keys=False)))


def save_plots(study, search, folder: str) -> list[str]:
    """Optuna's optimization history and parameter importances, as PNG; a plot Optuna cannot draw yet (importances
    need two finished trials) is left out."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances

    os.makedirs(folder, exist_ok=True)
    saved = []
    for name, plot in (("optimization_history", plot_optimization_history),
                       ("param_importances", plot_param_importances)):
        try:
            axes = plot(study, target_name=search.objective)
        except (ValueError, RuntimeError) as err:
            logger.info(f"No {name} plot: {err}")
            continue
        path, temporary = os.path.join(folder, f"{name}.png"), os.path.join(folder, f"{name}.{os.getpid()}.png")
        axes.figure.set_size_inches(8, 5)
        axes.figure.savefig(temporary, dpi=120, bbox_inches="tight")
        os.replace(temporary, path)  # whole, also when a process side by side writes it too
        plt.close(axes.figure)
        saved.append(path)
    return saved


def report(study, search, settings: dict, seed: int, output_dir: str) -> None:
    """Print the table of trials; write trials.csv, best_recipe.yaml and the plots."""
    finished = [t for t in study.trials if t.state.name == "COMPLETE"]
    best = study.best_trial if finished else None
    rows = trial_rows(study, search)
    write_csv(rows, os.path.join(output_dir, "trials.csv"))
    print(format_table(rows, search, best.number if best else None))
    states = [t.state.name.lower() for t in study.trials]
    counts = ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states))
    lines = [f"{len(states)} trials ({counts}) for n_trials {search.n_trials}; table: "
             f"{os.path.join(output_dir, 'trials.csv')}"]
    if best is not None:
        recipe_path = os.path.join(output_dir, "best_recipe.yaml")
        write_best_recipe(best, search, settings, seed, output_dir, recipe_path)
        lines.append(f"Best: trial {best.number}, {search.objective} {best.value:.4f}. Train it: hf-balanced-reward "
                     f"train --config {recipe_path}")
    plots = save_plots(study, search, os.path.join(output_dir, "plots")) if finished else []
    if plots:
        lines.append(f"Plots: {', '.join(plots)}")
    print("\n".join(lines))
