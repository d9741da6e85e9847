"""Scoring a collated batch of pairs or lists: the plain layout (a row per sequence) and the shared-prompt layout
(packed segments), plus the run's `Layout`, decided once by checking that the two agree on the model.

Rewards are read from the reward head's own output (captured with a forward hook), at explicit end positions, so the
model's "last non-pad token" guess is never used; they are returned in fp32 whatever the model's dtype.
"""

import logging

import torch
from accelerate.utils import extract_model_from_parallel

from .collator import Layout, PairCollator, flex_block_mask, shared_prompt_mask
from .config import ConfigError
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


def plain_scores(model, inputs) -> tuple:
    """Reward of every row of a plain-layout batch (model dtype), and the features the head read for it."""
    outputs, head_output, features = forward_with_head_output(
        model, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
    )
    if head_output is not None and head_output.dim() == 3:
        # Decoder heads score every position: read each sequence's real last token.
        rows = torch.arange(head_output.shape[0], device=head_output.device)
        return head_output[rows, inputs["end_positions"], 0], features[rows, inputs["end_positions"]]
    return outputs.logits[:, 0], features  # encoder heads pool (e.g. [CLS]) themselves


def packed_scores(model, inputs) -> tuple:
    """Score of every cell of a shared-prompt batch, flattened so that the batch's flat end indices read it, and
    the head's input features of every cell, flattened the same way."""
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
    return head_output.reshape(-1), features.reshape(-1, features.shape[-1])


def score_plain(model, inputs, with_features: bool = False) -> tuple:
    """(chosen, rejected) rewards, plus the off-prompt sequences' when the batch has them (`off_prompt_end`); with
    `with_features`, also the head's input features of each, in the same order."""
    rewards, features = plain_scores(model, inputs)
    pairs = (len(rewards) - len(inputs.get("off_prompt_end", ()))) // 2
    ends = [slice(0, pairs), slice(pairs, 2 * pairs)] + ([inputs["off_prompt_end"]] if "off_prompt_end" in inputs else [])
    scored = tuple(rewards[end].float() for end in ends)
    if with_features:
        return scored, tuple(features[end] for end in ends)
    return scored


def score_shared_prompt(model, inputs, with_features: bool = False) -> tuple:
    scores, features = packed_scores(model, inputs)
    ends = [inputs[key] for key in ("chosen_end", "rejected_end", "off_prompt_end") if key in inputs]
    rewards = tuple(scores[end].float() for end in ends)
    if with_features:
        return rewards, tuple(features[end] for end in ends)
    return rewards


def score_lists(model, inputs, shared_prompt: bool) -> torch.Tensor:
    """Rewards [lists, Kmax] (fp32, 0.0 in padded slots) of a list batch in either layout: `completion_ends` indexes
    each completion's reward among the plain layout's rows or the packed layout's cells."""
    scores, _ = (packed_scores if shared_prompt else plain_scores)(model, inputs)
    return scores[inputs["completion_ends"]].float().masked_fill(~inputs["list_mask"], 0.0)


def shared_prompt_difference(model, examples, pad_token_id, full_precision: bool) -> tuple[float, float]:
    """Largest reward difference between the shared-prompt (pairs) or K-branch (lists) layout and the plain one of
    `examples` (tokenised pairs or lists), in eval mode without gradients; and the tolerance it must stay within
    (1e-3 in fp32, 5e-2 in half precision, relative to the reward scale)."""
    device = next(model.parameters()).device
    packed, plain = (PairCollator(pad_token_id, shared_prompt=shared)(examples) for shared in (True, False))
    packed, plain = ({k: v.to(device) for k, v in batch.items()} for batch in (packed, plain))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        if "completion_ends" in packed:
            fast, reference = score_lists(model, packed, shared_prompt=True), score_lists(model, plain, False)
        else:
            fast, reference = torch.cat(score_shared_prompt(model, packed)), torch.cat(score_plain(model, plain))
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
