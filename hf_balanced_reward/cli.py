"""Command line.

    hf-balanced-reward train --config recipes/X.yaml [--any_option value ...]
    hf-balanced-reward evaluate --model PATH --dataset FILE_OR_HUB_ID [--group_column source] [--output_dir DIR]
    hf-balanced-reward compare RUN_DIR RUN_DIR ...

Precedence for `train`: the config's defaults, then the YAML recipe, then command-line flags. The options besides
the config's are declared in `cli_arguments.py`.
"""

from __future__ import annotations  # annotations name classes imported only where used

import errno
import importlib.util
import logging
import os
import signal
import sys
import warnings
from dataclasses import fields
from typing import TYPE_CHECKING

# Only the stdlib and light modules at the top: `--help` and a mistyped command answer without torch or
# transformers; each command imports what it uses.
from .cli_arguments import EvaluateArguments, ScriptArguments
from .errors import ConfigError, DataError, TrainingStopped, UsageError, did_you_mean
from .recipe import check_keys, checked_recipe_values, config_path_in, load_recipe, recipe_keys_checked_early
from .paths import resolve_model_path
from .reports import compare, format_table, list_report_lines, pair_report_lines

if TYPE_CHECKING:
    from .config import BalancedRewardConfig

logger = logging.getLogger(__name__)

PROG = "hf-balanced-reward"
COMMANDS = ("train", "evaluate", "score", "compare", "serve", "tune")


class Interrupted(Exception):
    """Training stopped on SIGINT / SIGTERM after saving a checkpoint; exit status 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def parse_train_args(argv: list[str], recipe: dict | None = None) -> tuple[ScriptArguments, BalancedRewardConfig]:
    """Defaults, then the recipe, then the flags in `argv`. `recipe`: the recipe's values from a caller that read the
    YAML itself (`tune` takes its `search:` block out), used instead of reading `--config`."""
    from transformers import HfArgumentParser

    from .config import BalancedRewardConfig

    parser = HfArgumentParser((ScriptArguments, BalancedRewardConfig), prog=f"{PROG} train")
    valid_keys = [f.name for dc in (ScriptArguments, BalancedRewardConfig) for f in fields(dc) if f.init]
    config_path = config_path_in(argv)
    if recipe is None and config_path:
        recipe = load_recipe(config_path)
    if recipe:
        where = config_path or "recipe"
        check_keys(recipe, valid_keys, where)
        parser.set_defaults(**checked_recipe_values(parser, recipe, where))

    def usage_error(message):  # argparse would print its whole usage text, then the message
        raise UsageError(message)

    parser.error = usage_error
    try:
        script_args, config, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ConfigError:
        raise
    except ValueError as err:  # TrainingArguments' own checks (e.g. an unknown lr_scheduler_type)
        raise UsageError(str(err)) from None
    if unknown:
        flag = unknown[0].lstrip("-").split("=")[0]
        raise UsageError(f"unknown option '{unknown[0]}'{did_you_mean(flag, valid_keys)}.")
    for required in ("model_name_or_path", "dataset_name"):
        if not getattr(script_args, required):
            raise UsageError(f"{required} is required: set it in the recipe or pass --{required}.")
    return script_args, config


def peft_setup(script_args: ScriptArguments, config: BalancedRewardConfig):
    """The LoraConfig the flags ask for (None without --use_peft); with --load_in_4bit, the 4-bit loading options."""
    if not script_args.use_peft:
        if script_args.load_in_4bit:
            raise UsageError("load_in_4bit is QLoRA: it needs --use_peft too.")
        return None
    from peft import LoraConfig

    if script_args.load_in_4bit:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UsageError("load_in_4bit needs bitsandbytes: pip install bitsandbytes (on a CUDA machine).")
        import torch
        from transformers import BitsAndBytesConfig

        config.model_init_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
    return LoraConfig(
        task_type="SEQ_CLS", r=script_args.lora_r, lora_alpha=script_args.lora_alpha,
        lora_dropout=script_args.lora_dropout, target_modules=script_args.lora_target_modules or "all-linear",
    )


def load_datasets(script_args: ScriptArguments, seed: int):
    from .data import check_columns, load_preference_dataset
    from .listwise import is_listwise

    streaming = script_args.streaming
    if streaming and script_args.eval_split_ratio is not None:
        raise UsageError(f"eval_split_ratio={script_args.eval_split_ratio} cannot split a streamed dataset (its length "
                         "is unknown until it is read); name the held-out pairs with eval_dataset_name, or unset "
                         "streaming.")
    train = load_preference_dataset(script_args.dataset_name, script_args.dataset_train_split, streaming)
    if script_args.eval_dataset_name:
        return train, load_preference_dataset(script_args.eval_dataset_name, script_args.dataset_eval_split, streaming)
    if script_args.eval_split_ratio is not None:
        if not 0 < script_args.eval_split_ratio < 1:
            raise UsageError(f"eval_split_ratio must be between 0 and 1 (the share of pairs held out for evaluation), "
                             f"got {script_args.eval_split_ratio}.")
        if not is_listwise(train) and "response" not in train.column_names:  # lists, responses: checked when prepared
            check_columns(train, None, "train")  # a clearer message than a failed split of unusable data
        if script_args.eval_split_column is not None:
            return split_by_column(train, script_args.eval_split_column, script_args.eval_split_ratio, seed)
        try:
            split = train.train_test_split(test_size=script_args.eval_split_ratio, seed=seed)
        except ValueError as err:
            raise UsageError(f"eval_split_ratio={script_args.eval_split_ratio} cannot split {len(train)} pairs: {err}")
        return split["train"], split["test"]
    return train, None


def split_by_column(dataset, column: str, ratio: float, seed: int):
    """(train, eval): `ratio` of the values of `column` held out with all their rows (`listwise.split_by_document`'s
    seeded shuffle of the values), so that no value is on both sides."""
    import random

    if column not in dataset.column_names:
        raise UsageError(f"eval_split_column='{column}' is not a column of the dataset"
                         f"{did_you_mean(column, dataset.column_names)}; its columns are {dataset.column_names}.")
    values = sorted(set(map(str, dataset[column])))
    held_out = round(ratio * len(values))
    if not 0 < held_out < len(values):
        raise UsageError(f"eval_split_ratio={ratio} holds out {held_out} of the {len(values)} values of "
                         f"'{column}'; choose a ratio that leaves at least one on each side.")
    random.Random(seed).shuffle(values)
    evaluation = set(values[:held_out])
    held = [str(v) in evaluation for v in dataset[column]]
    return (dataset.select([i for i, h in enumerate(held) if not h]),
            dataset.select([i for i, h in enumerate(held) if h]))


def final_evaluation(trainer) -> dict:
    """The eval metrics of the trained model, computed once: those of an evaluation the run made at its last step
    (eval_strategy), else a new one (with a note when eval_strategy is 'no': the CLI evaluates a named eval set)."""
    step, metrics = trainer.state.global_step, {}
    if trainer.args.load_best_model_at_end or trainer.args.normalize_rewards:
        return trainer.evaluate()  # the saved model is not the one the last evaluation saw
    for log in reversed(trainer.state.log_history):  # one log per eval set
        if log.get("step") != step:
            break
        if any(k.startswith("eval_") and k.endswith("accuracy") for k in log):
            metrics.update({k: v for k, v in log.items() if k.startswith("eval_") or k == "epoch"})
    if metrics and step > 0:
        return metrics
    if trainer.args.eval_strategy == "no":
        logger.info("Evaluating the trained model on the eval set once (eval_strategy is 'no', so not during "
                    "training).")
    return trainer.evaluate()


def train_and_save(trainer, script_args: ScriptArguments, config: BalancedRewardConfig, eval_dataset, peft_config):
    """Evaluate first if asked, train, save the model (and the merged model of LoRA adapters), the metrics and the
    card; evaluate the trained model once. Returns (metrics before, train result, metrics after)."""
    before = trainer.evaluate() if eval_dataset is not None and script_args.evaluate_before_training else None
    result = trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    if trainer.signal_stop.stopped_at_step is not None:
        signum = trainer.signal_stop.received or signal.SIGTERM
        checkpoint = os.path.join(config.output_dir, f"checkpoint-{trainer.signal_stop.stopped_at_step}")
        raise Interrupted(
            f"stopped by {signal.Signals(signum).name} at step {trainer.signal_stop.stopped_at_step}; checkpoint saved "
            f"to {checkpoint}. Run the same command with --resume_from_checkpoint true to continue.",
            signum,
        )
    trainer.save_model(config.output_dir)
    if peft_config is not None:
        trainer.save_merged_model(os.path.join(config.output_dir, "merged"))
        if trainer.args.should_save:
            trainer.write_card(config.output_dir)  # now naming the merged model beside the adapters
    for name, report in trainer.data_report.items():
        result.metrics[f"{name}_dropped_rows"] = sum(report["dropped"].values())
    trainer.save_metrics("train", result.metrics)
    after = None
    if eval_dataset is not None:
        after = final_evaluation(trainer)
        trainer.save_metrics("eval", after)
        if trainer.args.should_save:
            trainer.write_card(config.output_dir)  # now with the final evaluation
    return before, result, after


def train(script_args: ScriptArguments, config: BalancedRewardConfig) -> dict:
    from .trainer import BalancedRewardTrainer  # imported here so that `--help` and config errors stay fast

    quiet_libraries()

    peft_config = peft_setup(script_args, config)
    train_dataset, eval_dataset = load_datasets(script_args, config.seed)
    trainer = BalancedRewardTrainer(
        model=resolve_model_path(script_args.model_name_or_path),
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=peft_config,
    )
    from .paths import dataset_label

    # The card names the data as the user named it (no local paths).
    trainer.dataset_names = {"train": dataset_label(script_args.dataset_name)}
    if eval_dataset is not None:
        trainer.dataset_names["eval"] = (
            dataset_label(script_args.eval_dataset_name) if script_args.eval_dataset_name
            else dataset_label(script_args.dataset_name, held_out=script_args.eval_split_ratio))
    with trainer.holding_output_dir():  # the run owns its folder through the final save and card too
        before, result, after = train_and_save(trainer, script_args, config, eval_dataset, peft_config)
    if trainer.is_world_process_zero():
        if after:
            print("\n" + format_table(before, after))
        print(f"\nModel saved to {os.path.abspath(config.output_dir)}")
    return after or result.metrics


def evaluate(argv: list[str]) -> dict:
    from .evaluation import evaluate_model

    quiet_libraries()

    from transformers import HfArgumentParser

    from .data import load_preference_dataset

    parser = HfArgumentParser(EvaluateArguments, prog=f"{PROG} evaluate")
    try:
        args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if unknown:
        valid = [f.name for f in fields(EvaluateArguments)]
        raise UsageError(f"unknown option '{unknown[0]}'{did_you_mean(unknown[0].lstrip('-').split('=')[0], valid)}.")
    for required in ("model", "dataset"):
        if not getattr(args, required):
            raise UsageError(f"evaluate needs --{required}.")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1 (pairs scored per batch), got {args.batch_size}.")
    dataset = load_preference_dataset(args.dataset, args.split)
    report = evaluate_model(resolve_model_path(args.model), dataset, args.output_dir, args.group_column,
                            args.max_length, args.batch_size, args.on_bad_rows, args.length_calibration, args.probes,
                            args.long_responses, dataset_name=args.dataset)
    if "lists" in report:
        print(list_report_lines(report, args.output_dir))
        return report
    print(pair_report_lines(report, args.output_dir))
    return report


def show_package_info(verbose: bool = False) -> None:
    """The CLI shows this package's info messages (fitted length slopes, layout chosen, resume point) on stderr, on
    the main process only (under a launcher every process runs this); as a library it leaves logging to the
    application. Without `verbose`, the libraries' progress bars and the warnings a user cannot act on are hidden."""
    package = logging.getLogger("hf_balanced_reward")
    main_process = int(os.environ.get("RANK", "0")) == 0
    package.setLevel(logging.INFO if main_process or verbose else logging.WARNING)
    os.environ["HF_BALANCED_REWARD_QUIET"] = "" if verbose else "1"  # read by `quiet_libraries`, once imported
    ours = [h for h in package.handlers if getattr(h, "hf_balanced_reward_cli", False)]
    if ours:
        ours[0].stream = sys.stderr  # main() called again in one process (tests): today's stderr (the old may be closed)
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.hf_balanced_reward_cli = True
    package.addHandler(handler)


# Warnings from libraries that say nothing a user of this command can act on.
NOISE = (r".*'pin_memory' argument is set as true but no accelerator is found.*",
         r".*TRANSFORMERS_CACHE.*", r".*`resume_download` is deprecated.*")


def quiet_libraries() -> None:
    """Per-row progress bars of datasets, transformers' info and advice, and `NOISE` off, unless --verbose; called
    by each command once it has imported what it uses (importing them here would slow `--help`)."""
    if not os.environ.get("HF_BALANCED_REWARD_QUIET"):
        return
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    for pattern in NOISE:
        warnings.filterwarnings("ignore", message=pattern)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {PROG} train [--config recipe.yaml] [--option value ...]\n"
              f"       {PROG} evaluate --model PATH --dataset FILE_OR_HUB_ID [--group_column COL] [--output_dir DIR]\n"
              f"       {PROG} score --model PATH --dataset FILE --output OUT.jsonl [--max_length N]\n"
              f"       {PROG} compare RUN_DIR RUN_DIR ...\n"
              f"       {PROG} serve MODEL_DIR [--host 127.0.0.1] [--port 8000] [--api_key KEY] [--option value ...]\n"
              f"       {PROG} tune --config recipe.yaml [--option value ...]\n"
              "Every command takes --verbose: the libraries' progress bars, info messages and warnings, and this "
              "package's messages from every process.")
        return 0 if argv else 2
    command, rest = argv[0], [a for a in argv[1:] if a != "--verbose"]
    show_package_info(verbose="--verbose" in argv[1:])
    if command not in COMMANDS:
        print(f"{PROG}: error: unknown command '{command}'{did_you_mean(command, COMMANDS)}; "
              f"use one of: {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    config = None  # train's, once parsed: where to look for checkpoints when the disk fills up
    try:
        if command == "evaluate":
            evaluate(rest)
        elif command == "score":  # `package:` model names resolve here, as for train and evaluate
            from .scoring import score_main

            quiet_libraries()
            return score_main([resolve_model_path(a) if a.startswith("package:") else a for a in rest])
        elif command == "compare":
            print(compare(rest))
        elif command == "serve":
            from .serve import serve_main

            return serve_main(rest)
        elif command == "tune":
            from .tune import tune_main

            return tune_main(rest)
        else:
            recipe_keys_checked_early(rest)  # a typo in the recipe answered before torch loads
            script_args, config = parse_train_args(rest)
            train(script_args, config)
    except (UsageError, ConfigError, DataError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:
        print(f"{PROG}: stopped: {err}", file=sys.stderr)
        return 1
    except Interrupted as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 128 + err.signum
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # Checkpoints are written beside their folder and renamed whole, so a full disk damages none of them.
        from .checkpoints import is_complete_checkpoint, list_checkpoints

        saved = config is not None and any(map(is_complete_checkpoint, list_checkpoints(config.output_dir)))
        then = ("every complete checkpoint is intact. Free some space, then run the same command with "
                "--resume_from_checkpoint true." if saved else
                "no checkpoint had been saved. Free some space, then run the same command again.")
        print(f"{PROG}: error: the disk is full ({err.strerror}{f': {err.filename}' if err.filename else ''}); "
              f"{then}", file=sys.stderr)
        return 2
    return 0
