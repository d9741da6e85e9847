"""Checks of a run's options against its data and model, made by the trainer before the (slow) weight load; and
`as_config`, which takes in a trl or transformers config without losing an option."""

import dataclasses
import logging
import os

from .config import BalancedRewardConfig, ConfigError
from .data import check_columns, column_names, is_stream
from .listwise import is_listwise
from .losses import learns_from_ties
from .paths import dataset_label

logger = logging.getLogger(__name__)


def as_config(args, model) -> BalancedRewardConfig:
    """`args` as a BalancedRewardConfig. A trl.RewardConfig (or TrainingArguments, or another trl config) keeps
    every option: BalancedRewardConfig has a field for each of RewardConfig's. An option it has no field for is
    refused by name when it is set to anything but its default, never dropped."""
    if args is None:
        name = model if isinstance(model, str) else model.config._name_or_path
        return BalancedRewardConfig(output_dir=f"{os.path.basename(str(name).rstrip('/')) or 'model'}-reward")
    if isinstance(args, BalancedRewardConfig):
        return args
    ours = {f.name for f in dataclasses.fields(BalancedRewardConfig) if f.init}
    if type(args).__module__.startswith("trl.") and type(args).__name__ == "RewardConfig":
        # One difference a trl user would not expect is the text scored: say it once, with the option.
        logger.warning(
            "trl.RewardConfig converted to BalancedRewardConfig; one difference in what is scored: trl.RewardTrainer "
            "appends the eos token to plain-text chosen/rejected texts, this trainer does not by default (so "
            "pipeline(...) on the plain text scores the token training scored). Pass BalancedRewardConfig(..., "
            "append_eos_token=True) to score the texts trl scores."
        )
    kept = {}
    for f in dataclasses.fields(args):
        if not f.init:
            continue
        value = getattr(args, f.name)
        if f.name in ours:
            kept[f.name] = value
        elif value != (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default):
            raise ConfigError(
                f"{type(args).__name__} option {f.name}={value!r} has no counterpart in BalancedRewardConfig, so "
                f"this trainer cannot honour it; leave it at its default ({f.default!r}) or train with "
                f"{type(args).__name__}'s own trainer."
            )
    return BalancedRewardConfig(**kept)


def check_datasets(args: BalancedRewardConfig, train_dataset, eval_dataset) -> dict[str, str]:
    """Each dataset's columns (group_column's among them), and a streamed train set's options; returns how the model
    card names each dataset (no local paths; the CLI replaces them with the names it was given)."""
    named = {"train": train_dataset, **(eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset})}
    for name, dataset in named.items():
        if dataset is not None and "group_id" not in column_names(dataset) and not is_listwise(dataset) \
                and not (args.attributes and {"prompt", "response"} <= set(column_names(dataset))):
            check_columns(dataset, args.group_column, name)  # scored responses: `attribute_training` checks them
    if is_stream(train_dataset):
        check_stream_options(args)
    return {name: dataset_label(data) for name, data in named.items() if data is not None}


def check_stream_options(args: BalancedRewardConfig) -> None:
    """A streamed train set needs max_steps, and every process reading the stream itself (no dispatch_batches)."""
    if args.max_steps is None or args.max_steps <= 0:
        raise ConfigError(
            f"the train dataset is streamed (an IterableDataset, which has no length), so max_steps must be set: "
            f"got max_steps={args.max_steps}. Set it to the number of optimizer steps to train (pairs / "
            "(per_device_train_batch_size x gradient_accumulation_steps x processes) for one pass)."
        )
    if args.accelerator_config.dispatch_batches:
        logger.warning("dispatch_batches=true is turned off for a streamed train set: batches of different widths "
                       "cannot be concatenated across processes.")
    args.accelerator_config.dispatch_batches = False  # every process reads the stream and keeps its share


def check_list_options(args: BalancedRewardConfig, loss_fn) -> None:
    """What lists cannot be trained with (when a run trains lists), named before anything is loaded."""
    if args.loss_type == "balanced" and loss_fn is None:
        raise ConfigError(
            "loss_type='balanced' weighs pairs by their group and length direction, and this train set holds "
            "lists ('completions') or pairs with ties ('tie'), which have no one length direction; train them "
            "with plackett_luce, graded, davidson or bradley_terry, or give the balanced loss pairs without a "
            "'tie' column."
        )


def warn_unused_ties(train_dataset, args: BalancedRewardConfig, loss, loss_fn) -> None:
    """`loss` is the loss trained with; `loss_fn` the user's, or None for args.loss_type."""
    tied = sum(len(set(ranks)) < len(ranks) for ranks in train_dataset["ranks"])
    if tied and not learns_from_ties(loss, args.loss_kwargs):
        name = args.loss_type if loss_fn is None else "loss_fn"
        logger.warning(f"{tied} train lists have tied completions, and loss '{name}' leaves tied pairs out; "
                       "davidson, rao_kupper or plackett_luce learn from them (they pull tied rewards together).")


def check_model_options(args: BalancedRewardConfig, model_config, tokenizer) -> int | None:
    """Options the model's config (read without its weights) and tokenizer rule out; sets a missing pad token to
    eos. Returns max_length, cut to the model's positions."""
    if args.activation_offloading and args.device.type == "cpu":
        raise ConfigError(
            "activation_offloading=true moves activations from accelerator memory to CPU memory, and this run is on "
            "the CPU; unset it here (it applies on a GPU), or use gradient_checkpointing to save memory."
        )
    if args.attributes:
        if model_config.num_labels != len(args.attributes):
            raise ConfigError(
                f"attributes names {len(args.attributes)} head outputs ({', '.join(args.attributes)}), and this model "
                f"has num_labels={model_config.num_labels}; give a model folder or hub id (its head is made with one "
                "output per attribute), or build the model with id2label naming the attributes."
            )
    elif model_config.num_labels != 1:
        raise ConfigError(
            f"a reward model has one output, this model has num_labels={model_config.num_labels}; load it with "
            "AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)."
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token.")
        tokenizer.pad_token = tokenizer.eos_token
    max_length = args.max_length
    positions = getattr(model_config.get_text_config(), "max_position_embeddings", None)
    if positions and (max_length is None or max_length > positions):
        logger.warning(f"max_length={max_length} is more than the model's {positions} positions; using {positions}.")
        max_length = positions
    return max_length


def check_launch(args: BalancedRewardConfig) -> None:
    """A launcher started several processes (WORLD_SIZE > 1) but the run is not distributed: each process would train
    the whole data alone into the same output_dir. This happens with a GPU launcher config on a machine without GPUs."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and args.world_size == 1:
        raise ConfigError(
            f"this process is 1 of {launched} started by a launcher (WORLD_SIZE={launched}), but training is not "
            f"distributed (device {args.device.type}), so each process would train alone on all the data into the "
            "same output_dir. On CPUs add --use_cpu true --ddp_backend gloo (or launch with "
            "accelerate_configs/cpu_ddp.yaml and those two options); on GPUs check that they are visible "
            "(CUDA_VISIBLE_DEVICES)."
        )


def check_output_dir(args: BalancedRewardConfig) -> None:
    """output_dir can be created and written, checked by doing it (permissions alone mislead as root or on
    read-only mounts) before anything is loaded or trained."""
    import tempfile

    try:
        os.makedirs(args.output_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=args.output_dir, prefix=".write-check-"):
            pass
    except OSError as err:
        raise ConfigError(f"output_dir '{args.output_dir}' cannot be written ({err.strerror}); choose a folder you can "
                          "write to.") from None


def check_hub_reachable(args: BalancedRewardConfig) -> None:
    """With push_to_hub, the Hub must answer and know who pushes, before hours of training, not after."""
    if not args.push_to_hub:
        return
    from huggingface_hub import HfApi
    from huggingface_hub.constants import HF_HUB_OFFLINE

    if HF_HUB_OFFLINE:
        raise ConfigError("push_to_hub is set, but the Hub is switched off here (HF_HUB_OFFLINE=1); unset "
                          "HF_HUB_OFFLINE, or set push_to_hub: false and push the saved folder later.")
    try:
        HfApi().whoami(token=args.hub_token)
    except Exception as err:  # no token, a refused token, no network: each stops the push at the end
        raise ConfigError(f"push_to_hub is set, but the Hub cannot be used from here ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else 'no detail'}); log in with `hf auth login`, "
                          "check the network, or set push_to_hub: false.") from None


def check_token_ids(datasets: dict, vocab_size: int) -> None:
    """Token ids in the prepared sets (`completion_ids`) must index the model's embeddings; named by dataset, row and
    sequence before training (the model would fail with an IndexError inside its forward). Arrow finds the extremes
    without reading rows into Python."""
    import pyarrow.compute as pc

    from .errors import DataError

    for name, dataset in datasets.items():
        values = dataset.with_format("arrow")["completion_ids"]  # the kept rows (preparation filters with an index map)
        extremes = pc.min_max(pc.list_flatten(pc.list_flatten(values))).as_py()
        if extremes["min"] is None or (0 <= extremes["min"] and extremes["max"] < vocab_size):
            continue
        bad = extremes["max"] if extremes["max"] >= vocab_size else extremes["min"]
        row, sequence = next(((r, k) for r, row in enumerate(dataset["completion_ids"])
                              for k, ids in enumerate(row) if bad in ids), ("?", "?"))
        raise DataError(f"{name} dataset row {row}: its sequence {sequence} (a pair's chosen_ids are 0, rejected_ids "
                        f"1) holds token id {bad}, outside the model's vocabulary (0 to {vocab_size - 1}); tokenise "
                        "with the model's own tokenizer, or resize its embeddings to the tokenizer.")


def check_free_disk(args: BalancedRewardConfig, model) -> None:
    """Enough free space in output_dir for the final model (else refuse: hours of training could not be saved), and
    for one checkpoint (weights plus two optimizer moments; else warn)."""
    import shutil

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    free = shutil.disk_usage(args.output_dir).free
    if free < weights:
        raise ConfigError(f"output_dir '{args.output_dir}' has {free / 2**20:.0f} MiB free, and the trained model alone "
                          f"needs {weights / 2**20:.0f} MiB; free some space or choose another output_dir.")
    if args.save_strategy != "no" and free < 3 * weights:
        logger.warning(f"output_dir '{args.output_dir}' has {free / 2**20:.0f} MiB free; a checkpoint of this model "
                       f"(weights and optimizer state) needs about {3 * weights / 2**20:.0f} MiB.")
