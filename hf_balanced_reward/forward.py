"""Scoring a collated batch: the plain layout (2B rows) and the shared-prompt layout (packed segments), plus the
check that the two agree on a model.

Rewards are read from the reward head's own output (captured with a forward hook), at explicit end positions, so the
model's "last non-pad token" guess is never used; they are returned in fp32 whatever the model's dtype.
"""

import torch
from accelerate.utils import extract_model_from_parallel

from .collator import PairCollator, flex_block_mask, shared_prompt_mask, unpack_pairs
from .modeling import find_reward_head


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


def score_plain(model, inputs, with_features: bool = False) -> tuple:
    """(chosen, rejected) rewards; with `with_features`, also the head's input features of each, (chosen, rejected)."""
    outputs, head_output, features = forward_with_head_output(
        model, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
    )
    if head_output is not None and head_output.dim() == 3:
        # Decoder heads score every position: read each sequence's real last token.
        rows = torch.arange(head_output.shape[0], device=head_output.device)
        rewards = head_output[rows, inputs["end_positions"], 0]
        features = features[rows, inputs["end_positions"]]
    else:
        rewards = outputs.logits[:, 0]  # encoder heads pool (e.g. [CLS]) themselves
    if with_features:
        return rewards.float().chunk(2), features.chunk(2)
    return rewards.float().chunk(2)


def score_shared_prompt(model, inputs, with_features: bool = False) -> tuple:
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
    scores = head_output.reshape(-1)
    rewards = scores[inputs["chosen_end"]].float(), scores[inputs["rejected_end"]].float()
    if with_features:
        features = features.reshape(-1, features.shape[-1])
        return rewards, (features[inputs["chosen_end"]], features[inputs["rejected_end"]])
    return rewards


def plain_inputs(pairs, like, pad_token_id) -> dict[str, torch.Tensor]:
    """`like` (a batch) with its model inputs replaced by the plain layout of `pairs`, on the same device."""
    plain = PairCollator(pad_token_id).plain_batch(pairs)
    return {**like, **{k: v.to(like["input_ids"].device) for k, v in plain.items()}}


def shared_prompt_difference(model, inputs, pad_token_id, full_precision: bool) -> tuple[float, float]:
    """Largest reward difference between the shared-prompt and plain layouts on two pairs of a batch, and the
    tolerance it must stay within (1e-3 in fp32, 5e-2 in half precision, relative to the reward scale)."""
    pairs = unpack_pairs(inputs)[:2]
    device = inputs["input_ids"].device
    packed = PairCollator(pad_token_id, shared_prompt=True).shared_prompt_batch(pairs)
    packed = {k: v.to(device) for k, v in packed.items()}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        fast = torch.cat(score_shared_prompt(model, packed))
        plain = torch.cat(score_plain(model, plain_inputs(pairs, {"input_ids": packed["input_ids"]}, pad_token_id)))
    model.train(was_training)
    tolerance = (1e-3 if full_precision else 5e-2) * (1 + plain.abs().max().item())
    return (fast - plain).abs().max().item(), tolerance
