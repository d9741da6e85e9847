"""`BalancedRewardConfig`: every reward-specific option, validated before any model is loaded."""

import inspect
import json
import os
from dataclasses import dataclass, field, fields

from transformers import TrainingArguments

from .balancing import BalanceOptions
from .errors import ConfigError, did_you_mean
from .losses import (ATTRIBUTE_INPUTS, ATTRIBUTE_LOSS_NAMES, LEARN_TIE, LISTWISE_INPUTS, LOSSES, PAIR_LOSSES,
                     as_list_loss, trains_lists)


ON_BAD_ROWS = ("auto", "skip", "error")
LONG_RESPONSES = ("drop", "cut")
NAN_POLICIES = ("stop", "skip")



def loss_option_defaults(loss_fn) -> dict:
    """The options a loss takes through `loss_kwargs`, with their defaults: its keyword parameters after its inputs
    (rewards, `margin`, `tie`; for a list loss rewards, ranks, mask, scores), and `learn_tie` for a tie loss. The
    balanced loss's are `BalanceOptions`' fields: the trainer applies them, not the loss function."""
    if loss_fn is LOSSES["balanced"]:
        return {option.name: option.default for option in fields(BalanceOptions)}
    params = inspect.signature(loss_fn).parameters
    fixed = {"chosen_rewards", "rejected_rewards", "margin", "tie", *LISTWISE_INPUTS, *ATTRIBUTE_INPUTS}
    options = {name: p.default for name, p in params.items() if name not in fixed and p.kind is not p.VAR_KEYWORD}
    return {**options, LEARN_TIE: False} if "log_tie" in options else options


def loss_option_names(loss_fn) -> list[str]:
    return list(loss_option_defaults(loss_fn))


def check_loss_kwargs(loss_kwargs: dict, loss_fn, loss_name: str) -> None:
    """Reject a misspelled or unknown loss option, listing the valid ones."""
    params = inspect.signature(loss_fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return  # the loss takes anything; it checks its own options
    valid = loss_option_names(loss_fn)
    for key in loss_kwargs:
        if key not in valid:
            allowed = ", ".join(valid) if valid else "none"
            raise ConfigError(
                f"loss_kwargs has unknown option '{key}' for loss '{loss_name}'{did_you_mean(key, valid)}. "
                f"Options of '{loss_name}': {allowed}."
            )


@dataclass
class BalancedRewardConfig(TrainingArguments):
    """Training options for `BalancedRewardTrainer`: all of `TrainingArguments` plus the reward-model ones below.

    The same field help texts document the Python API, `--help` on the CLI and the keys of a YAML recipe.
    """

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["loss_kwargs", "model_init_kwargs"]

    # Defaults that differ from TrainingArguments: reward runs are short, so log often.
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps (a float < 1 is a ratio)."})

    # --- loss ---
    loss_type: str = field(
        default="bradley_terry",
        metadata={"help": f"Preference loss: pairwise ({', '.join(PAIR_LOSSES)}), one that trains every row as a "
                          "ranked list ("
                          + ", ".join(n for n in LOSSES if n not in PAIR_LOSSES and n not in ATTRIBUTE_LOSS_NAMES)
                          + f"), or an attribute loss ({', '.join(ATTRIBUTE_LOSS_NAMES)}; needs `attributes`)."},
    )
    loss_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Options of the chosen loss, e.g. {'hinge_margin': 0.5} for hinge or "
            "{'length_expert': 0.5} for balanced. A misspelled option is an error."
        },
    )
    center_rewards_coefficient: float | None = field(
        default=None,
        metadata={"help": "If set, adds coefficient * mean((r_chosen + r_rejected)^2) to keep rewards centred at 0."},
    )
    normalize_rewards: bool = field(
        default=False,
        metadata={
            "help": "After training, measure the mean and std of rewards on the eval set (or on up to 1,000 training "
            "pairs without one) and fold (reward - mean) / std into the reward head, so the saved model gives "
            "standardised rewards (for RL) through plain transformers. The scale always folds; the shift needs a head "
            "with a bias (encoders have one; most decoders' `score` has none: there, train with "
            "center_rewards_coefficient to keep the mean near 0). Both are saved in config.json."
        },
    )
    group_column: str | None = field(
        default=None,
        metadata={
            "help": "Dataset column that names each pair's group (e.g. 'source'). The balanced loss balances length "
            "direction within each group, and metrics are reported per group and per length cell. When unset, all "
            "pairs form one group."
        },
    )
    attributes: list[str] | None = field(
        default=None,
        metadata={
            "help": "Train a multi-attribute reward model: one head output per name, e.g. [coherence, fluency], read "
            "from the column of that name (a number per response, or a list per completion) or a pair's "
            "<name>_chosen / <name>_rejected. Needs loss_type regression, attribute_bradley_terry or attribute_loss "
            "(docs/attributes.md)."
        },
    )
    reward_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "With attributes: the weight of each attribute in the one reward (for RL, pair metrics, the "
            "combined export), one number per attribute in order. Default: equal weights 1/A."
        },
    )
    export_combined: bool = field(
        default=False,
        metadata={
            "help": "With attributes: save_model also writes OUTPUT/combined, a one-output model whose reward is the "
            "weighted sum of the attributes (reward_weights), for any one-output client (trl, pipeline)."
        },
    )
    # --- model ---
    model_init_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for AutoModelForSequenceClassification.from_pretrained (e.g. dtype)."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow models and tokenizers that run their own code from the Hub. Off unless asked."},
    )
    disable_dropout: bool = field(
        default=True,
        metadata={"help": "Turn dropout off, so chosen and rejected are scored by the same network."},
    )
    # --- data ---
    max_length: int | None = field(
        default=1024,
        metadata={
            "help": "Most tokens per sequence (prompt + response). Longer pairs lose prompt tokens from the left; "
            "the response end is never cut; a pair whose response alone is too long is dropped (see on_bad_rows). "
            "Capped by the model's own position limit."
        },
    )
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Processes for dataset tokenisation (datasets.map num_proc)."}
    )
    append_eos_token: bool = field(
        default=False,
        metadata={
            "help": "Append the tokenizer's eos token to every text before scoring. Off by default so that "
            "pipeline('text-classification') on the plain text scores the same token as training did."
        },
    )
    on_bad_rows: str = field(
        default="auto",
        metadata={
            "help": "'auto' (as trl): drop pairs with nothing to learn (a response longer than max_length, chosen "
            "== rejected), keep empty responses, and stop only on rows that cannot be read (null or non-text "
            "fields, malformed messages, NaN/infinite margin or weight, negative weight, no group); 'skip': drop "
            "the unreadable rows too instead of stopping (empty responses are still kept); 'error': stop on any of "
            "them, empty responses included. Stops happen before the model is "
            "loaded and name rows and problems; drops are counted per reason in the log and data_report.json."
        },
    )
    nan_policy: str = field(
        default="stop",
        metadata={
            "help": "A NaN or inf loss or reward: 'stop' saves a checkpoint of the last good step and stops with the "
            "step and batch; 'skip' leaves that batch out of the update and counts it (logged as skipped_batches)."
        },
    )
    long_responses: str = field(
        default="drop",
        metadata={
            "help": "A pair whose response alone is longer than max_length: 'drop' it (training's default: its text "
            "cannot fit whole with any of its prompt), or 'cut' each text to its leading special tokens and last "
            "tokens, as `score` and `pipeline` cut one text (`evaluate`'s default, so it scores every pair a client "
            "would). Counted in the log and data_report.json either way.",
            "choices": ["drop", "cut"],
        },
    )
    exploit_probes: bool = field(
        default=False,
        metadata={
            "help": "Also measure, at every evaluation of an eval set of pairs with text, what an RL policy could "
            "exploit (logged as eval_probe_*): accuracy with the prompt removed, whether a prompt's own response beats "
            "another prompt's, and whether appending content-free text raises the reward (docs/evaluation.md). Costs "
            "about 12 texts scored per pair."
        },
    )
    reward_drift_limit: float | None = field(
        default=10.0,
        metadata={
            "help": "Warn when the logged mean or std of training rewards exceeds this (rewards drifting to large "
            "values destabilise RL with the model). None turns the check off."
        },
    )
    shared_prompt: bool | None = field(
        default=None,
        metadata={
            "help": "Score each pair in one packed sequence, prompt + chosen + rejected, computing the prompt once and "
            "almost no padding. Unset: on for causal decoders with sdpa, eager or flex_attention attention, plain "
            "layout otherwise. true: require it (an error if the model cannot). false: always the plain layout."
        },
    )
    pad_to_multiple_of: int | None = field(
        default=None, metadata={"help": "Pad batch sequence length to a multiple of this (e.g. 8 for tensor cores)."}
    )
    # --- the rest of trl.RewardConfig's options: a RewardConfig passed as `args` keeps every one of them ---
    chat_template_path: str | None = field(
        default=None,
        metadata={
            "help": "Set the tokenizer's chat template before any conversation is rendered: a .jinja / .j2 file, or a "
            "tokenizer folder or hub id whose template is copied with its added tokens and eos token (the model's "
            "embeddings grow to match; new embeddings are trained with LoRA too), as trl.RewardConfig does."
        },
    )
    eos_token: str | None = field(
        default=None,
        metadata={
            "help": "Make this token (it must be in the tokenizer's vocabulary) the tokenizer's eos token, and the "
            "model config's: what a chat template renders as {{ eos_token }}, what append_eos_token appends, and the "
            "pad token when the tokenizer has none."
        },
    )
    pad_token: str | None = field(
        default=None,
        metadata={
            "help": "Pad with this token (it must be in the tokenizer's vocabulary) instead of the tokenizer's own pad "
            "token (or its eos token when it has none). trl deprecates it: setting tokenizer.pad_token does the same."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start a new run in an output_dir that holds an earlier run's checkpoints (refused without it, so "
            "that two runs' checkpoints never mix). Those checkpoints are renamed to _replaced-checkpoint-N, never "
            "resumed from, and deleted once this run has saved a checkpoint or finished. To continue the earlier run "
            "instead, set resume_from_checkpoint."
        },
    )
    activation_offloading: bool = field(
        default=False,
        metadata={
            "help": "Move activations saved for the backward pass to CPU memory during each training step (trl's "
            "offloading context), trading transfer time for accelerator memory. Needs a GPU or other accelerator."
        },
    )

    def __post_init__(self):
        for name in ("loss_kwargs", "model_init_kwargs"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    setattr(self, name, json.loads(value))
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{name} must be a JSON object, got {value!r} ({err.msg}).") from None
            if getattr(self, name) is None:
                setattr(self, name, {})
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"{name} must be a mapping, got {type(getattr(self, name)).__name__}.")
        # Before TrainingArguments' own checks, whose messages for these are about something else.
        if self.bf16 and self.fp16:
            raise ConfigError("bf16 and fp16 are both set; choose one: bf16 on GPUs that support it (Ampere or newer), "
                              "fp16 on older ones.")
        if self.output_dir and os.path.isfile(self.output_dir):
            raise ConfigError(f"output_dir '{self.output_dir}' is a file; give the path of a folder to write to.")
        super().__post_init__()
        self.validate_reward_options()

    def validate_list_loss_options(self) -> None:
        """A tie or listwise loss's options, checked by computing the loss once on a small list (its own checks
        name the option and the allowed values)."""
        import torch

        options = dict(self.loss_kwargs)
        if not isinstance(options.pop(LEARN_TIE, False), bool):
            raise ConfigError(f"loss_kwargs {LEARN_TIE} must be true or false, got {self.loss_kwargs[LEARN_TIE]!r}.")
        loss = as_list_loss(LOSSES[self.loss_type], options)
        try:
            loss(torch.zeros(1, 3), torch.tensor([[1, 2, 2]]), None, torch.tensor([[3.0, 1.0, 1.0]]))
        except (ValueError, TypeError, RuntimeError) as err:
            raise ConfigError(f"loss_kwargs of loss '{self.loss_type}': {err}") from err

    def validate_reward_options(self) -> None:
        if self.loss_type not in LOSSES:
            raise ConfigError(
                f"loss_type='{self.loss_type}' is not a known loss{did_you_mean(self.loss_type, LOSSES)}. "
                f"Choose one of: {', '.join(sorted(LOSSES))}."
            )
        check_loss_kwargs(self.loss_kwargs, LOSSES[self.loss_type], self.loss_type)
        if self.loss_type == "balanced":
            BalanceOptions(**self.loss_kwargs)  # checks each value
        if trains_lists(LOSSES[self.loss_type]):
            self.validate_list_loss_options()
        check_attribute_options(self)
        if self.learning_rate < 0:
            raise ConfigError(f"learning_rate must be >= 0, got {self.learning_rate}; a negative rate climbs the loss.")
        hinge_margin = self.loss_kwargs.get("hinge_margin", 1.0)
        if self.loss_type == "hinge" and (isinstance(hinge_margin, bool) or not isinstance(hinge_margin, (int, float))):
            raise ConfigError(f"loss_kwargs hinge_margin must be a number, got {hinge_margin!r}; write it without "
                              "quotes, e.g. hinge_margin: 1.0.")
        if self.loss_type == "hinge" and hinge_margin < 0:
            raise ConfigError(
                f"loss_kwargs hinge_margin must be >= 0, got {self.loss_kwargs['hinge_margin']}: "
                "a negative margin rewards ranking the rejected response higher."
            )
        for name, choices in (("on_bad_rows", ON_BAD_ROWS), ("nan_policy", NAN_POLICIES),
                              ("long_responses", LONG_RESPONSES)):
            value = getattr(self, name)
            if value not in choices:
                raise ConfigError(
                    f"{name}='{value}' is not an option{did_you_mean(value, choices)}; choose one of: {', '.join(choices)}."
                )
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"max_length must be at least 2 (or None for no limit), got {self.max_length}.")
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise ConfigError(
                f"center_rewards_coefficient must be >= 0, got {self.center_rewards_coefficient}; "
                "leave it unset to turn centring off."
            )


def check_attribute_options(args) -> None:
    """`attributes`, `reward_weights`, `export_combined` and the loss agree: an attribute loss needs attributes and
    attributes need one; weights are one per attribute."""
    attribute_loss = args.loss_type in ATTRIBUTE_LOSS_NAMES
    if not args.attributes:
        if attribute_loss:
            raise ConfigError(f"loss_type='{args.loss_type}' trains one head output per attribute, and `attributes` "
                              "is not set; name the score columns, e.g. attributes: [coherence, fluency].")
        for name in ("reward_weights", "export_combined"):
            if getattr(args, name):
                raise ConfigError(f"{name} applies to a multi-attribute model and `attributes` is not set; set "
                                  f"attributes, or remove {name}.")
        return
    from .attributes import check_reward_weights, set_attribute_labels  # torch and scipy: only when used

    if isinstance(args.attributes, str):
        args.attributes = [args.attributes]
    if not attribute_loss:
        raise ConfigError(f"attributes={args.attributes} needs an attribute loss, and loss_type='{args.loss_type}' "
                          f"is not one; choose one of: {', '.join(ATTRIBUTE_LOSS_NAMES)}.")
    set_attribute_labels(type("Labels", (), {})(), args.attributes)  # distinct, non-empty names
    args.reward_weights = check_reward_weights(args.reward_weights, args.attributes)
    for name, value in (("normalize_rewards", args.normalize_rewards),
                        ("center_rewards_coefficient", args.center_rewards_coefficient),
                        (f"loss_kwargs {LEARN_TIE}", args.loss_kwargs.get(LEARN_TIE))):
        if value:
            raise ConfigError(f"{name} is not applied to a multi-attribute model (attributes={args.attributes}); "
                              f"remove it, or train a one-output model with a preference loss.")
    from .attribute_training import check_loss_options

    check_loss_options(args.loss_type, args.loss_kwargs, args.attributes)
