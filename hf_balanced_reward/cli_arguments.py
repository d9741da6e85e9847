"""The command-line options besides the training config's: `train`'s model, data and LoRA (`ScriptArguments`) and
`evaluate`'s (`EvaluateArguments`), as dataclasses that `HfArgumentParser` turns into flags.

Only the standard library: `--help` stays fast. `recipe.training_option_names` reads `ScriptArguments` from this
file's source, to check a recipe's keys before transformers is imported.
"""

from __future__ import annotations  # string annotations, as these classes had in cli.py

from dataclasses import dataclass, field


@dataclass
class ScriptArguments:
    """What a run needs besides training options: the model and the data."""

    config: str | None = field(default=None, metadata={"help": "YAML recipe whose keys are any of these options."})
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Model folder or hub id, loaded as AutoModelForSequenceClassification with one label. "
            "'package:NAME/SUBDIR' names a folder inside an installed Python package."
        },
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Training pairs: a hub id, a local folder or a .jsonl/.json/.parquet/.csv."}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split of dataset_name to train on."})
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "Held-out pairs (same forms as dataset_name); default: none."}
    )
    dataset_eval_split: str = field(default="test", metadata={"help": "Split of eval_dataset_name (hub/folder)."})
    eval_split_ratio: float | None = field(
        default=None,
        metadata={"help": "Hold out this fraction of the training pairs for evaluation, when no eval set is named."},
    )
    eval_split_column: str | None = field(
        default=None,
        metadata={"help": "With eval_split_ratio: hold out that fraction of this column's values (e.g. doc_id) with "
                  "all their rows, so that no document is on both sides."},
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream the train and eval data (datasets.IterableDataset): rows are read, checked and tokenised "
            "as training goes instead of all up front. Needs max_steps; the balanced loss first counts the train set "
            "in one pass. eval_split_ratio cannot split a stream: name an eval set instead."
        },
    )
    evaluate_before_training: bool = field(
        default=False, metadata={"help": "Evaluate the untrained model first, to show what training changed."}
    )
    # --- LoRA (peft) ---
    use_peft: bool = field(
        default=False,
        metadata={"help": "Train LoRA adapters plus the reward head instead of all weights; also saves a merged "
                  "model to OUTPUT_DIR/merged that loads without peft."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (alpha / r scales the update)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules that get adapters (default: every linear layer but the head)."}
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "QLoRA: load the frozen base weights in 4-bit (needs bitsandbytes, a GPU)."}
    )


@dataclass
class EvaluateArguments:
    """`evaluate`: score every pair of a dataset with a saved reward model."""

    model: str | None = field(
        default=None, metadata={"help": "Saved reward model: a folder or hub id (any one-label sequence classifier)."}
    )
    dataset: str | None = field(
        default=None, metadata={"help": "Pairs to score: a hub id, a local folder or a .jsonl/.json/.parquet/.csv."}
    )
    split: str = field(default="train", metadata={"help": "Split of a hub or folder dataset."})
    group_column: str | None = field(default=None, metadata={"help": "Column naming each pair's group (e.g. source)."})
    output_dir: str = field(default="eval_report", metadata={"help": "Where eval_report.json and plots/ go."})
    max_length: int | None = field(default=None, metadata={
        "help": "Most tokens per sequence (default: the max_length the model was trained with, saved in its config; "
        "else the model's position limit)."})
    batch_size: int = field(default=32, metadata={"help": "Pairs scored per batch."})
    on_bad_rows: str = field(
        default="skip",
        metadata={"help": "skip (default: score what can be scored, count the rest in the report) or error."},
    )
    length_calibration: bool = field(
        default=True,
        metadata={"help": "Also report accuracy after post-hoc length calibration: per group, a least-squares fit of "
                  "reward on log(1 + response length), made without labels, is subtracted (Huang et al. 2024)."},
    )
    long_responses: str = field(
        default="cut",
        metadata={"help": "A pair whose response alone is longer than max_length: 'cut' (default) scores each text cut "
                  "to its last tokens, as `score` and `pipeline` cut it, so every pair a client would score is "
                  "scored (counted in the report); 'drop' leaves it out, as training does.",
                  "choices": ["cut", "drop"]},
    )
    probes: bool = field(
        default=True,
        metadata={"help": "Also run the exploit probes (does the model read the prompt, can padding raise its reward; "
                  "see docs/evaluation.md): about 12 more texts scored per pair. --probes false skips them."},
    )
