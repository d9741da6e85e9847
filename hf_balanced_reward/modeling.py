"""Loading reward models and checking what they support, before and after the weights are read."""

import os

import torch
from accelerate.utils import is_peft_model
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, set_seed

from .config import BalancedRewardConfig, ConfigError

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


def load_config_and_tokenizer(model_id: str, args: BalancedRewardConfig):
    if model_id.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(model_id)):
        raise ConfigError(f"model '{model_id}' does not exist: no such folder.")
    try:
        config = AutoConfig.from_pretrained(model_id, num_labels=1, trust_remote_code=args.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as err:  # a missing path, an unreachable hub id, a malformed config
        raise ConfigError(f"could not load model '{model_id}': {err}") from err
    return config, tokenizer


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
        return AutoModelForSequenceClassification.from_pretrained(
            model_id, num_labels=1, trust_remote_code=args.trust_remote_code, **init_kwargs
        )
    except (OSError, ValueError) as err:
        hint = ""
        if init_kwargs["use_safetensors"] and files is not None and any(f.endswith(".bin") for f in files):
            hint = (" It has no safetensors weights; if you trust its pickled weights, set "
                    "model_init_kwargs: {use_safetensors: false}.")
        raise ConfigError(f"could not load model '{model_id}': {err}{hint}") from err
    except Exception as err:
        if type(err).__name__ != "SafetensorError":
            raise
        raise ConfigError(f"the weights of model '{model_id}' cannot be read ({err}): the file is corrupt or was cut "
                          "short; save or download it again.") from err
