"""Scoring a collated batch (pairs and lists alike): the plain layout (a row per sequence) and the shared-prompt layout
(packed segments), plus the run's `Layout`, decided once by checking that the two agree on the model.

Rewards are read from the reward head's own output (captured with a forward hook), at explicit end positions, so the
model's "last non-pad token" guess is never used; they are returned in fp32 whatever the model's dtype.
"""

import logging

import torch
from accelerate.utils import extract_model_from_parallel
from transformers.integrations import is_deepspeed_zero3_enabled

from .collator import Layout, RewardCollator, flex_block_mask, shared_prompt_mask
from .config import ConfigError
from .data import is_stream
from .modeling import find_reward_head

logger = logging.getLogger(__name__)


def forward_with_head_output(model, **inputs) -> tuple:
    """Run the model; also return what its reward head produced (every position's score for decoders) and the
    features it read (its input), or None for both if the head was not called."""
    _, head = find_reward_head(extract_model_from_parallel(model))
    captured = []
    handle = head.register_forward_hook(lambda module, args, output: captured.append((output, args[0])))
    try:
        outputs = model(**inputs)
    finally:
        handle.remove()
    head_output, features = captured[-1] if captured else (None, None)
    return outputs, head_output, features


def plain_scores(model, inputs, output=0) -> tuple:
    """Reward of every row of a plain-layout batch (model dtype), and the features the head read for it. `output`:
    which head output (0, a reward model's one), or `slice(None)` for all of them ([rows, A])."""
    outputs, head_output, features = forward_with_head_output(
        model, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
    )
    if head_output is not None and head_output.dim() == 3:
        # Decoder heads score every position: read each sequence's real last token.
        rows = torch.arange(head_output.shape[0], device=head_output.device)
        return head_output[rows, inputs["end_positions"], output], features[rows, inputs["end_positions"]]
    return outputs.logits[:, output], features  # encoder heads pool (e.g. [CLS]) themselves


def packed_scores(model, inputs, output=0) -> tuple:
    """Score of every cell of a shared-prompt batch, flattened so that the batch's flat end indices read it, and
    the head's input features of every cell, flattened the same way. `output`: 0 (a reward model's one output), or
    `slice(None)` for every output ([cells, A])."""
    segment_ids, branch_ids = inputs["segment_ids"], inputs["branch_ids"]
    attention = extract_model_from_parallel(model).config._attn_implementation
    if attention == "flex_attention":
        mask = flex_block_mask(segment_ids, branch_ids)
    else:
        mask = shared_prompt_mask(segment_ids, branch_ids)
        if attention == "eager":  # eager attention adds the mask to its scores
            mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    _, head_output, features = forward_with_head_output(
        model, input_ids=inputs["input_ids"], attention_mask=mask, position_ids=inputs["position_ids"]
    )
    scores = head_output.reshape(-1) if output == 0 else head_output.reshape(-1, head_output.shape[-1])
    return scores, features.reshape(-1, features.shape[-1])


def score_batch(model, inputs, with_features: bool = False) -> tuple:
    """(rewards [rows, Kmax] in fp32 with 0 in padded slots, the off-prompt rewards [rows] or None, and with
    `with_features` the features [rows, Kmax, hidden] the reward head read, else None) of a collated batch in one
    forward pass: `completion_ends` indexes each completion's reward among the plain layout's rows or the packed
    layout's cells."""
    scores, features = (packed_scores if "segment_ids" in inputs else plain_scores)(model, inputs)
    ends = inputs["completion_ends"]
    rewards = scores[ends].float().masked_fill(~inputs["list_mask"], 0.0)
    off_prompt = scores[inputs["off_prompt_end"]].float() if "off_prompt_end" in inputs else None
    return rewards, off_prompt, features[ends] if with_features else None


def score_attributes(model, inputs) -> torch.Tensor:
    """Every head output of every completion of a collated batch [rows, Kmax, A] in fp32, 0 in padded slots: the
    per-attribute rewards of a multi-attribute head (`attribute_training.py`), read as `score_batch` reads one."""
    scores, _ = (packed_scores if "segment_ids" in inputs else plain_scores)(model, inputs, slice(None))
    return scores[inputs["completion_ends"]].float().masked_fill(~inputs["list_mask"][..., None], 0.0)


def shared_prompt_difference(model, examples, pad_token_id, full_precision: bool) -> tuple[float, float]:
    """Largest reward difference between the shared-prompt layout and the plain one of `examples` (prepared rows),
    in eval mode without gradients; and the tolerance it must stay within
    (1e-3 in fp32, 5e-2 in half precision, relative to the reward scale)."""
    device = next(model.parameters()).device
    packed, plain = (RewardCollator(pad_token_id, shared_prompt=shared)(examples) for shared in (True, False))
    packed, plain = ({k: v.to(device) for k, v in batch.items()} for batch in (packed, plain))
    was_training = model.training
    model.eval()
    with torch.no_grad():  # every head output: a multi-attribute head's too
        fast, reference = score_attributes(model, packed), score_attributes(model, plain)
    model.train(was_training)
    tolerance = (1e-3 if full_precision else 5e-2) * (1 + reference.abs().max().item())
    return (fast - reference).abs().max().item(), tolerance


def decide_layout(layout: Layout, model, examples, pad_token_id, full_precision: bool, required: bool) -> None:
    """Settle `layout` once, before the first batch is collated: keep the shared prompt if `examples` (the first
    rows of a dataset) get the plain forward's rewards from it on this model; else stop if it was `required`
    (shared_prompt=true), or fall back to plain rows for the rest of the run. Guards attention that ignores the
    layout's mask or position ids."""
    if layout.decided or not layout.shared_prompt or not examples:
        return
    layout.decided = True
    difference, tolerance = shared_prompt_difference(model, examples, pad_token_id, full_precision)
    if difference <= tolerance:
        logger.info(f"Shared-prompt layout checked against the plain layout: max reward difference {difference:.2e}.")
        return
    message = (
        f"the shared-prompt layout changes this model's rewards (max difference {difference:.3g} on the first "
        f"rows, tolerance {tolerance:.3g}); its attention does not follow the layout's mask or position ids."
    )
    if required:
        raise ConfigError(f"{message} Set shared_prompt: false.")
    logger.warning(f"{message} Using the plain layout.")
    layout.shared_prompt = False


def decide_layout_on(dataset, layout: Layout, collator, model, pad_token_id, args) -> None:
    """`decide_layout` with a dataset's first two rows, before a dataloader of it is built: once per model, so every
    batch of the run is collated in the layout it keeps. Not for a collator of the user's (it chooses its batches'
    layout), nor under DeepSpeed ZeRO-3 (partitioned weights allow no forward outside the engine)."""
    if layout.decided or not layout.shared_prompt or dataset is None or getattr(collator, "layout", None) is not layout:
        return
    if is_deepspeed_zero3_enabled():
        layout.decided = True
        logger.warning("shared_prompt: the check of the packed layout against the plain one is skipped under "
                       "DeepSpeed ZeRO-3; set shared_prompt: false if this model's attention ignores custom masks.")
        return
    examples = list(dataset.take(2) if is_stream(dataset) else dataset.select(range(min(2, len(dataset)))))
    full_precision = not (args.bf16 or args.fp16) and model.dtype == torch.float32
    decide_layout(layout, model, examples, pad_token_id, full_precision, required=bool(args.shared_prompt))
