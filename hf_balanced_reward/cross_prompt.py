"""Cross-prompt negatives (RRM, Liu et al. 2024): a response written for another prompt is worse than the pair's
chosen response, whatever its length or fluency.

Pairs that share a prompt give the prompt no gradient (it is in both texts), so plain Bradley-Terry has no reason to
learn to read it. With `loss_kwargs: {cross_prompt: gamma}` of the balanced loss, every training pair i gets a third
sequence, its own prompt followed by the chosen response of a partner pair j (another prompt, of the same group when
the group has one), and the loss adds `gamma * loss(r(x_i, y_i^chosen), r(x_i, y_j^chosen))`.

Partners are fixed before training from the seed, so a resumed run sees the same ones. "nearest" (the default) picks
the most similar other prompt of the group by TF-IDF over its prompt tokens (the hardest off-topic response: same
kind of question, different question); "random" draws one.

The prompt of a tokenised pair is the tokens its two sequences share (`shared_prefix_length`), which can include
identical opening words of both responses; the off-prompt sequence then starts its partner's response after them.
It stays a response written for another prompt, which is all the term needs.
"""

import numpy as np

from .balancing import PARTNER_CHOICES
from .collator import shared_prefix_length


def choose_partners(prompt_ids: list[list[int]], group_ids, how: str = "nearest", seed: int = 0) -> np.ndarray:
    """Index of each pair's partner: a pair whose prompt differs, of the same group when the group holds another
    prompt, else of any group. `prompt_ids`: each pair's prompt tokens (equal lists mean the same prompt)."""
    if how not in PARTNER_CHOICES:
        raise ValueError(f"cross_prompt_partners must be one of {', '.join(PARTNER_CHOICES)}, got {how!r}.")
    keys = {}
    prompt_key = np.array([keys.setdefault(tuple(p), len(keys)) for p in prompt_ids])
    if len(keys) < 2:
        raise ValueError("cross_prompt needs at least two different prompts in the train set; it has one.")
    group_ids = np.asarray(group_ids)
    rng = np.random.default_rng(seed)
    if how == "nearest":
        from sklearn.feature_extraction.text import TfidfVectorizer

        # The tokens themselves are the words: works for any tokenizer and needs no text. Rows are L2-normalised,
        # so a product of rows is their cosine similarity.
        tfidf = TfidfVectorizer(analyzer=lambda ids: ids, sublinear_tf=True).fit_transform(prompt_ids)
    partners = np.empty(len(prompt_ids), dtype=np.int64)
    for group in np.unique(group_ids):
        members = np.flatnonzero(group_ids == group)
        # Another prompt of the group if there is one; a group with a single prompt borrows from the others.
        pool = members if len(np.unique(prompt_key[members])) > 1 else np.arange(len(prompt_ids))
        if how == "random":
            for i in members:
                candidates = pool[prompt_key[pool] != prompt_key[i]]
                partners[i] = candidates[rng.integers(len(candidates))]
            continue
        similarity = (tfidf[members] @ tfidf[pool].T).toarray()
        similarity[prompt_key[members][:, None] == prompt_key[pool][None, :]] = -np.inf  # never the same prompt
        partners[members] = pool[similarity.argmax(axis=1)]
    return partners


def off_prompt_sequence(own_ids: list[int], own_prompt: int, partner_ids: list[int], partner_prompt: int,
                        max_length: int | None) -> list[int]:
    """The pair's prompt followed by the partner's response. When longer than `max_length` the response is cut from
    the right, keeping its last token (the scored one: EOS, SEP), so the prompt stays the pair's own."""
    prompt, response = own_ids[:own_prompt], partner_ids[partner_prompt:]
    if max_length is not None and len(prompt) + len(response) > max_length:
        room = max(max_length - len(prompt), 1)
        response = response[: room - 1] + response[-1:]
    return prompt + response


def add_off_prompt_responses(dataset, how: str, seed: int, max_length: int | None):
    """The prepared train set with an `off_prompt_ids` column (see the module docstring)."""
    chosen, rejected = dataset["chosen_ids"], dataset["rejected_ids"]
    prompts = [shared_prefix_length(c, r) for c, r in zip(chosen, rejected)]
    partners = choose_partners([c[:p] for c, p in zip(chosen, prompts)], dataset["group_id"], how, seed)
    off_prompt = [off_prompt_sequence(chosen[i], prompts[i], chosen[j], prompts[j], max_length)
                  for i, j in enumerate(partners)]
    return dataset.add_column("off_prompt_ids", off_prompt)
