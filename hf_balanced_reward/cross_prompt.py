"""Cross-prompt negatives (RRM, Liu et al. 2024): a response written for another prompt is worse than the pair's
chosen response, whatever its length or fluency.

Pairs that share a prompt give the prompt no gradient (it is in both texts), so plain Bradley-Terry has no reason to
learn to read it. With `loss_kwargs: {cross_prompt: gamma}` of the balanced loss, every training pair i gets a third
sequence, its own prompt followed by the chosen response of a partner pair j (another prompt, of the same group when
the group has one), and the loss adds `gamma * loss(r(x_i, y_i^chosen), r(x_i, y_j^chosen))`.

Partners are fixed before training from the seed, so a resumed run sees the same ones. "nearest" (the default) picks
the most similar other prompt of the group by TF-IDF over the prompt texts (the hardest off-topic response: same kind
of question, different question); "random" draws one. Prompts are told apart by their text as given, so two pairs of
one prompt are never each other's partner. The exploit probes choose their other prompts with the same function.

The prompt of a tokenised pair is the tokens its two sequences share (`shared_prefix_length`), which can include
identical opening words of both responses; the off-prompt sequence then starts its partner's response after them.
It stays a response written for another prompt, which is all the term needs.
"""

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer

from .collator import shared_prefix_length


def as_text(value) -> str:
    """A prompt or response as plain text: a message list's text contents joined by newlines."""
    if isinstance(value, str):
        return value
    return "\n".join(m["content"] for m in value if isinstance(m.get("content"), str))


CHUNK = 512  # prompts whose TF-IDF similarities are held at once


def pick_partners(prompt_texts, groups=None, seed: int = 0, nearest: bool = False) -> np.ndarray:
    """For each pair, the index of another pair whose prompt text differs, from the same group when the group has
    another prompt, else from any group; -1 when every pair has the same prompt. `nearest`: the pair whose prompt is
    most similar (TF-IDF cosine; the first on a tie), else one drawn with numpy default_rng(seed)."""
    n, ids = len(prompt_texts), {}
    prompt_id = np.asarray([ids.setdefault(text, len(ids)) for text in prompt_texts], dtype=int)
    distinct = list(ids)
    groups = np.asarray([str(g) for g in groups] if groups is not None else [""] * n)
    partner = np.full(n, -1)

    def candidates(i):
        other = prompt_id != prompt_id[i]
        same_group = np.flatnonzero(other & (groups == groups[i]))
        return same_group if len(same_group) else np.flatnonzero(other)

    if not nearest:
        rng = np.random.default_rng(seed)
        for i in range(n):
            if len(found := candidates(i)):
                partner[i] = rng.choice(found)
        return partner
    try:
        vectors = TfidfVectorizer().fit_transform(distinct)
    except ValueError:  # no prompt has a word (e.g. only punctuation): compare characters instead
        vectors = TfidfVectorizer(analyzer="char").fit_transform(distinct)
    for start in range(0, len(distinct), CHUNK):
        similarity = (vectors[start : start + CHUNK] @ vectors.T).toarray()  # rows are L2-normalised: cosine
        for i in np.flatnonzero((prompt_id >= start) & (prompt_id < start + CHUNK)):
            if len(found := candidates(i)):
                partner[i] = found[np.argmax(similarity[prompt_id[i] - start, prompt_id[found]])]
    return partner


def off_prompt_sequence(own_ids: list[int], own_prompt: int, partner_ids: list[int], partner_prompt: int,
                        max_length: int | None) -> list[int]:
    """The pair's prompt followed by the partner's response. When longer than `max_length` the response is cut from
    the right, keeping its last token (the scored one: EOS, SEP), so the prompt stays the pair's own."""
    prompt, response = own_ids[:own_prompt], partner_ids[partner_prompt:]
    if max_length is not None and len(prompt) + len(response) > max_length:
        room = max(max_length - len(prompt), 1)
        response = response[: room - 1] + response[-1:]
    return prompt + response


def add_off_prompt_responses(dataset, prompt_texts: list | None, how: str, seed: int, max_length: int | None):
    """The prepared train set with an `off_prompt_ids` column (see the module docstring). `prompt_texts`: each
    prepared pair's prompt as given (text or messages), which tells prompts apart and finds the nearest; None for
    data given as token ids, where the prompt tokens stand in for it."""
    pairs = dataset["completion_ids"]  # chosen, rejected
    chosen = [pair[0] for pair in pairs]
    prompts = [shared_prefix_length(*pair) for pair in pairs]
    if prompt_texts is None:
        prompt_texts = [" ".join(f"t{token}" for token in c[:p]) for c, p in zip(chosen, prompts)]
    partners = pick_partners([as_text(p) for p in prompt_texts], dataset["group_id"], seed, nearest=how == "nearest")
    if (partners < 0).any():
        raise ValueError("cross_prompt needs at least two different prompts in the train set; it has one.")
    off_prompt = [off_prompt_sequence(chosen[i], prompts[i], chosen[j], prompts[j], max_length)
                  for i, j in enumerate(partners)]
    return dataset.add_column("off_prompt_ids", off_prompt)
