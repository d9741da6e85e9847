"""Loading reward models, checking what they support (before and after the weights are read), fitting them to the
tokenizer and LoRA, and the trainable parameters that live beside them."""

import logging
import os

import numpy as np
import torch
from accelerate.utils import is_peft_model
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, set_seed

from .config import BalancedRewardConfig, ConfigError
from .data import is_stream
from .errors import TrainingStopped, hub_kernels_hint
from .preflight import check_token_ids
from .streaming import real_pairs

logger = logging.getLogger(__name__)

# Attribute names of the scalar head in *ForSequenceClassification models (decoders: score, encoders: classifier).
HEAD_NAMES = ("score", "classifier")
# Attention implementations that take the custom mask of the shared-prompt layout.
SHARED_PROMPT_ATTENTION = ("sdpa", "eager", "flex_attention")


def is_causal_decoder(model: torch.nn.Module) -> bool:
    """True when every attention layer is causal: only then can chosen and rejected share the prompt's states."""
    flags = [m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    return bool(flags) and all(flags)


def shared_prompt_blocker(model: torch.nn.Module) -> str | None:
    """Why the shared-prompt layout cannot be used for this model, or None when it can."""
    if not is_causal_decoder(model):
        return (
            f"{type(model).__name__} is not a causal decoder: its prompt tokens attend to the response, so the "
            "prompt cannot be shared between chosen and rejected"
        )
    attention = model.config._attn_implementation
    if attention not in SHARED_PROMPT_ATTENTION:
        return (
            f"attn_implementation='{attention}' cannot take the layout's attention mask; load the model with "
            f"attn_implementation set to one of {', '.join(SHARED_PROMPT_ATTENTION)}"
        )
    return None


def use_shared_prompt(model: torch.nn.Module, args: BalancedRewardConfig) -> bool:
    """Whether to pack pairs with a shared prompt: as asked, or by default where the model supports it."""
    blocker = shared_prompt_blocker(model)
    if blocker is None:
        return args.shared_prompt is not False
    if args.shared_prompt:
        raise ConfigError(f"shared_prompt=true does not apply here: {blocker}. Set shared_prompt: false.")
    if args.shared_prompt is None:
        logger.info(f"Plain two-sequence layout: {blocker}.")
    return False


def head_labels(args) -> dict:
    """from_pretrained's label options: one output (a reward model), or one per attribute, named (`attributes`)."""
    if not getattr(args, "attributes", None):
        return {"num_labels": 1}
    return {"id2label": dict(enumerate(args.attributes)), "label2id": {n: i for i, n in enumerate(args.attributes)}}


def find_reward_head(model: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    base = model.get_base_model() if is_peft_model(model) else model
    for name in HEAD_NAMES:
        head = getattr(base, name, None)
        if isinstance(head, torch.nn.Module):
            return name, head
    raise ConfigError(
        f"{type(base).__name__} has no reward head named {' or '.join(HEAD_NAMES)}; load the model with "
        "AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)."
    )


def config_and_tokenizer(model, tokenizer, args: BalancedRewardConfig):
    """(config, tokenizer) of `model` (a name or path, or a loaded model) before any weights load: `tokenizer` if
    given, else the model's; a shared-prompt request is checked on the model's weightless skeleton."""
    if not isinstance(model, str):
        return model.config, tokenizer or AutoTokenizer.from_pretrained(model.config._name_or_path)
    if model.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(model)):
        raise ConfigError(f"model '{model}' does not exist: no such folder.")
    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=args.trust_remote_code, **head_labels(args))
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(model, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as err:  # a missing path, an unreachable hub id, a malformed config
        raise ConfigError(f"could not load model '{model}': {err}") from err
    if not args.attributes:
        check_not_attribute_model(model, args)
    if args.shared_prompt:
        use_shared_prompt(skeleton_model(config, args), args)
    return config, tokenizer


def check_not_attribute_model(model: str, args: BalancedRewardConfig) -> None:
    """A multi-attribute model loaded as a one-output one would fail in transformers on the head's shape: say what
    to do instead."""
    from .scoring import SAVED_ATTRIBUTES, is_attribute_model

    saved = AutoConfig.from_pretrained(model, trust_remote_code=args.trust_remote_code)
    if is_attribute_model(saved):
        names = getattr(saved, SAVED_ATTRIBUTES)["names"]
        raise ConfigError(f"model '{model}' is a multi-attribute reward model ({saved.num_labels} outputs: "
                          f"{', '.join(names)}); to train it further set attributes: [{', '.join(names)}] and an "
                          "attribute loss, or start a one-output run from its combined export (OUTPUT/combined, "
                          "written with export_combined: true).")


def skeleton_model(config, args: BalancedRewardConfig) -> PreTrainedModel:
    """The model's architecture without weights (meta device): enough to check options before loading."""
    options = {k: v for k, v in args.model_init_kwargs.items() if k == "attn_implementation"}
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config, trust_remote_code=args.trust_remote_code, **options)


def fold_affine_into_head(model: torch.nn.Module, mean: float, std: float) -> bool:
    """Make the reward head output (reward - mean) / std: divide its weight by std and, where it has a bias, take
    mean from the bias first. Returns whether the shift was folded (False for a head without a bias)."""
    _, head = find_reward_head(model)
    head = head.modules_to_save["default"] if hasattr(head, "modules_to_save") else head  # PEFT's trained copy
    with torch.no_grad():
        head.weight.div_(std)
        if head.bias is None:
            return False
        head.bias.sub_(mean).div_(std)
    return True


def normalize_head(model: torch.nn.Module, mean: float, std: float, pairs: int) -> dict:
    """Fold the standardisation of rewards measured on `pairs` pairs into the reward head, and record it in the
    model's config as `reward_normalization`."""
    shift_folded = fold_affine_into_head(model, mean, std)
    record = {"mean": mean, "std": std, "pairs": pairs, "shift_folded": shift_folded}
    model.config.reward_normalization = record
    logger.info(f"Rewards normalised: mean {mean:.4f}, std {std:.4f} on {pairs} pairs folded into the head"
                + ("." if shift_folded else f"; the head has no bias, so the mean stays at {mean / std:.4f} std."))
    return record


def normalize_rewards(trainer, dataset=None) -> dict:
    """`normalize_head` with the mean and standard deviation of the trainer's rewards on `dataset` (default: the eval
    set, else up to 1,000 training rows), every real completion counted."""
    if dataset is None:
        dataset = trainer.eval_dataset if trainer.eval_dataset is not None else trainer.train_dataset
        dataset = next(iter(dataset.values())) if isinstance(dataset, dict) else dataset
        dataset = dataset.take(1000) if is_stream(dataset) else dataset.select(range(min(len(dataset), 1000)))
    predictions, labels = real_pairs(trainer.predict(dataset, metric_key_prefix="normalize"))
    rows = len(predictions[0])  # pairs, or lists
    rewards = predictions[0][labels[2] == 1].astype(np.float64)  # the real completions'
    mean, std = float(rewards.mean()), float(rewards.std())
    if not std > 0:
        raise TrainingStopped(f"normalize_rewards: the rewards on {rows} pairs all equal {mean}; there is no scale to "
                              "normalise.")
    return normalize_head(trainer.accelerator.unwrap_model(trainer.model), mean, std, rows)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json", ".gguf")


def load_model(model_id: str, args: BalancedRewardConfig) -> PreTrainedModel:
    set_seed(args.seed)  # the reward head is freshly initialised: make it reproducible
    # safetensors only, unless asked: a pickled checkpoint (.bin) can run code when it is loaded.
    init_kwargs = {"dtype": torch.float32, "use_safetensors": True, **args.model_init_kwargs}
    files = os.listdir(model_id) if os.path.isdir(model_id) else None
    if files is not None and not any(f.endswith(WEIGHT_SUFFIXES) for f in files):
        raise ConfigError(f"model folder '{model_id}' has no weights file (model.safetensors or pytorch_model.bin); "
                          "save the model with save_pretrained, or download it again.")
    try:
        # A multi-attribute head has A outputs: a saved one-output head is replaced by a fresh one.
        resize = {"ignore_mismatched_sizes": True} if args.attributes else {}
        return AutoModelForSequenceClassification.from_pretrained(
            model_id, trust_remote_code=args.trust_remote_code, **head_labels(args), **resize, **init_kwargs
        )
    except (OSError, ValueError) as err:
        hint = hub_kernels_hint(err)
        if init_kwargs["use_safetensors"] and files is not None and any(f.endswith(".bin") for f in files):
            hint = (" It has no safetensors weights; if you trust its pickled weights, set "
                    "model_init_kwargs: {use_safetensors: false}.")
        raise ConfigError(f"could not load model '{model_id}': {err}{hint}") from err
    except Exception as err:
        if type(err).__name__ != "SafetensorError":
            raise
        raise ConfigError(f"the weights of model '{model_id}' cannot be read ({err}): the file is corrupt or was cut "
                          "short; save or download it again.") from err


def prepare_model(model, tokenizer, args: BalancedRewardConfig, added_tokens: list[int], max_length: int | None):
    """A loaded model readied for training: matched to the tokenizer, its config carrying what scoring needs."""
    from trl.trainer.utils import disable_dropout_in_model

    match_model_to_tokenizer(model, tokenizer, args, added_tokens)
    model.config.pad_token_id = tokenizer.pad_token_id  # lets pipeline() batch the saved model
    # Saved with the model: `evaluate`, `score` and `reward_function` render and cut texts as training did.
    model.config.reward_max_length = max_length
    model.config.reward_append_eos_token = args.append_eos_token
    if args.attributes:  # the outputs named; scoring combines them with these weights (`scoring.py`)
        from .attributes import set_attribute_labels

        set_attribute_labels(model.config, args.attributes)
        model.config.reward_attributes = {"names": list(args.attributes), "weights": list(args.reward_weights)}
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # no generation here; a cache only costs memory
    if args.disable_dropout:
        disable_dropout_in_model(model)


def ready_model(model, tokenizer, args: BalancedRewardConfig, added_tokens: list[int], max_length: int | None, layout,
                peft_config=None, token_check_sets: dict | None = None):
    """A loaded model readied for the run (the trainer's model, and each one `model_init` gives): `prepare_model`, its
    vocabulary checked against the data's token ids, the shared-prompt `layout` chosen afresh for it (and checked
    again before the next dataloader), LoRA-wrapped with `peft_config`, its one-output head found."""
    prepare_model(model, tokenizer, args, added_tokens, max_length)
    if token_check_sets:
        check_token_ids(token_check_sets, model.get_input_embeddings().num_embeddings)  # resized, not yet wrapped
    layout.shared_prompt, layout.decided = use_shared_prompt(model, args), False
    if peft_config is not None:
        model = wrap_peft(model, peft_config, args, added_tokens)
    find_reward_head(model)  # fail now, not at the first step, if there is no one-output head
    return model


def match_model_to_tokenizer(model, tokenizer, args: BalancedRewardConfig, added_tokens: list[int]) -> None:
    """After eos_token / chat_template_path changed the tokenizer: the model's eos id, and embeddings for the
    tokens a copied chat template added (as trl's clone_chat_template does)."""
    if args.eos_token is not None or args.chat_template_path is not None:
        model.config.get_text_config().eos_token_id = tokenizer.eos_token_id
    if added_tokens and len(tokenizer.get_vocab()) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer.get_vocab()))


def wrap_peft(model, peft_config, args: BalancedRewardConfig, added_tokens=()):
    from peft import get_peft_model, prepare_model_for_kbit_training

    head_name, _ = find_reward_head(model)
    modules_to_save = list(peft_config.modules_to_save or [])
    if head_name not in modules_to_save:
        peft_config.modules_to_save = modules_to_save + [head_name]  # the head is new: it must be trained and saved
    if added_tokens and not isinstance(peft_config.trainable_token_indices, dict):
        # Tokens a copied chat template added have untrained embeddings: train them too (a dict names its own).
        peft_config.trainable_token_indices = list(peft_config.trainable_token_indices or []) + list(added_tokens)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):  # QLoRA
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    elif args.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need an input grad
    return get_peft_model(model, peft_config)


def save_merged(adapter_dir: str, output_dir: str, tokenizer, dtype, trust_remote_code: bool) -> None:
    """Reload the LoRA model saved in `adapter_dir`, fold its adapters in and save it to `output_dir` as a plain
    AutoModelForSequenceClassification, with the tokenizer."""
    from peft import AutoPeftModelForSequenceClassification

    reloaded = AutoPeftModelForSequenceClassification.from_pretrained(
        adapter_dir, num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code
    )
    merged = reloaded.merge_and_unload()
    merged.config.pad_token_id = tokenizer.pad_token_id
    merged.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


# Trainable parameters beside the model: trained with it, kept in checkpoints, never in the saved model.
def average_gradients(parameters, accelerator) -> None:
    """Outside the DDP-wrapped model, so DDP does not average their gradients across processes: do it here."""
    if accelerator.num_processes > 1:
        for parameter in parameters:
            parameter.register_hook(lambda grad: accelerator.reduce(grad, reduction="mean"))


def make_length_head(model, device, accelerator) -> torch.nn.Linear:
    """The second head of `length_head` (ODIN-style): on the reward head's input features, in fp32."""
    head = torch.nn.Linear(model.config.get_text_config().hidden_size, 1).to(device)
    average_gradients(head.parameters(), accelerator)
    return head


def make_log_tie(value: float, device, accelerator) -> torch.nn.Parameter:
    """The tie losses' log_tie when `learn_tie` is set (scoring does not need it)."""
    log_tie = torch.nn.Parameter(torch.tensor(float(value), device=device))
    average_gradients([log_tie], accelerator)
    return log_tie
