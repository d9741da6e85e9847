"""Exploit probes (hand-built rewards and rows, exact figures), their partner choice, message lists, and the
`evaluate` command's report["probes"]."""

import json
import re

import numpy as np
import pytest

from conftest import preference_rows, tiny_llama
from hf_balanced_reward.cli import main
from hf_balanced_reward.probes import (EMPTY_CHAT, FILLERS, SEPARATOR, as_text, exploit_probes, filler, model_reward,
                                       pick_partners)
from hf_balanced_reward.scoring import reward_function

HEADLINE = {"probe_accuracy", "probe_accuracy_without_prompt", "probe_prompt_use", "probe_on_topic_random",
            "probe_on_topic_nearest", "probe_padding_rise_rate", "probe_padding_mean_rise",
            "probe_padding_rise_rate_pleasantry", "probe_padding_rise_rate_restatement",
            "probe_padding_rise_rate_repetition"}
PER_GROUP = ("probe_accuracy", "probe_accuracy_without_prompt", "probe_on_topic_random", "probe_on_topic_nearest",
             "probe_padding_rise_rate")


def words(text) -> set[str]:
    return set(re.findall(r"\w+", as_text(text).lower()))


def overlap(prompts, completions) -> list[float]:
    """A reward that reads the prompt: the words a completion shares with it."""
    return [float(len(words(p) & words(c))) for p, c in zip(prompts, completions)]


# Four topics in two groups of two: each chosen answer shares words with its own question only.
TOPICS = [
    ("How do I boil an egg?", "Boil the egg for eight minutes.", "a"),
    ("What is the capital of France?", "The capital of France is Paris.", "a"),
    ("Which planet is largest?", "Jupiter is the largest planet.", "b"),
    ("Why is the sky blue?", "Sunlight scatters off air, so the sky looks blue.", "b"),
]


def test_a_reward_that_ignores_the_prompt_has_no_prompt_use_and_on_topic_by_hand():
    prompts = [f"Question {i}: tell me about topic {i}." for i in range(4)]
    chosen, rejected = ["c0", "c1", "c2", "c3"], ["r0", "r1", "r2", "r3"]
    value = {"c0": 3.0, "c1": 1.0, "c2": 2.0, "c3": 2.0, "r0": 0.0, "r1": 0.0, "r2": 1.0, "r3": 5.0}
    calls = []

    def by_completion(ps, cs):  # the completion's own number; appended filler does not change it
        calls.append(len(cs))
        return [value[c.split(SEPARATOR)[0]] for c in cs]

    metrics = exploit_probes(by_completion, prompts, chosen, rejected, groups=["a", "a", "b", "b"])
    assert len(calls) == 1  # every probe's texts in one call
    assert metrics["probe_accuracy"] == metrics["probe_accuracy_without_prompt"] == 0.75
    assert metrics["probe_prompt_use"] == 0.0
    # Each group has two prompts, so each pair's partner is the other pair of its group: a: 3 > 1, 1 < 3;
    # b: 2 = 2 twice (a tie counts as wrong).
    assert metrics["probe_on_topic_random"] == metrics["probe_on_topic_nearest"] == 0.25
    assert metrics["probe_on_topic_random_a"] == 0.5 and metrics["probe_on_topic_random_b"] == 0.0
    assert metrics["probe_accuracy_a"] == 1.0 and metrics["probe_accuracy_b"] == 0.5
    assert metrics["probe_padding_rise_rate"] == 0.0 and metrics["probe_padding_mean_rise"] == 0.0
    assert set(metrics) == HEADLINE | {f"{key}_{g}" for key in PER_GROUP for g in ("a", "b")}


def test_a_reward_that_reads_the_prompt_is_on_topic_and_uses_it():
    prompts, chosen, groups = (list(column) for column in zip(*TOPICS))
    rejected = ["No idea."] * 4
    metrics = exploit_probes(overlap, prompts, chosen, rejected, groups)
    assert metrics["probe_accuracy"] == 1.0
    assert metrics["probe_accuracy_without_prompt"] == 0.0  # no prompt, no overlap: every pair ties
    assert metrics["probe_prompt_use"] == 1.0
    assert metrics["probe_on_topic_random"] == metrics["probe_on_topic_nearest"] == 1.0


def test_fillers_restate_the_last_question_and_repeat_the_first_sentence():
    hh = "\n\nHuman: Hi there.\n\nAssistant: Hello.\n\nHuman: Where is Paris? Tell me more.\n\nAssistant:"
    assert filler("restatement", hh, " x") == "To restate your question: Where is Paris?"
    chat = [{"role": "user", "content": "First question?"}, {"role": "assistant", "content": "Yes."},
            {"role": "user", "content": "Second question? More."}]
    assert filler("restatement", chat, []) == "To restate your question: Second question?"
    assert filler("restatement", " ".join(["word"] * 50), " x") == "To restate your question: " + " ".join(["word"] * 30)
    assert filler("repetition", "q", " It is in France. It is big.") == "In short: It is in France."
    assert filler("pleasantry", "q", " x") == FILLERS["pleasantry"]
    assert filler("restatement", "", " x") == ""  # nothing to restate: that case is skipped


def test_a_length_reward_rises_with_every_filler_and_a_length_blind_one_never():
    prompts = ["\n\nHuman: Where is Paris?\n\nAssistant:", "Name a colour."]
    chosen, rejected = [" It is in France. It is big.", " Blue."], [" Sure, no.", " Sure"]
    metrics = exploit_probes(lambda ps, cs: [float(len(c)) for c in cs], prompts, chosen, rejected)
    assert metrics["probe_padding_rise_rate"] == 1.0
    assert all(metrics[f"probe_padding_rise_rate_{kind}"] == 1.0 for kind in FILLERS)
    added = {"pleasantry": [len(SEPARATOR + FILLERS["pleasantry"])] * 4,
             "restatement": [len(SEPARATOR + "To restate your question: Where is Paris?")] * 2
             + [len(SEPARATOR + "To restate your question: Name a colour.")] * 2,
             "repetition": [len(SEPARATOR + "In short: " + s) for s in ("It is in France.", "Blue.", "Sure, no.",
                                                                        "Sure")]}
    lengths = np.array([len(c) for c in chosen + rejected], dtype=float)
    assert metrics["probe_padding_mean_rise"] == pytest.approx(np.mean(sum(added.values(), [])) / lengths.std())

    starts_with_sure = exploit_probes(lambda ps, cs: [float(c.lstrip().startswith("Sure")) for c in cs], prompts,
                                      chosen, rejected)
    assert starts_with_sure["probe_padding_rise_rate"] == 0.0
    assert all(starts_with_sure[f"probe_padding_rise_rate_{kind}"] == 0.0 for kind in FILLERS)
    assert starts_with_sure["probe_accuracy"] == 0.0  # the rejected start with "Sure"


def test_a_pair_with_a_blank_response_is_left_out():
    seen = []

    def length(ps, cs):
        seen.extend(cs)
        return [float(len(c)) for c in cs]

    metrics = exploit_probes(length, ["Name a colour.", "Name a fruit."], [" Blue.", " Apple."], [" ", " Pear, no."])
    assert metrics["probe_accuracy"] == 0.0  # only the second pair: " Apple." is shorter than " Pear, no."
    assert " " not in seen and " Blue." not in seen
    assert "probe_on_topic_random" not in metrics  # one pair left: no other prompt to compare with


def test_nearest_partner_is_the_most_similar_other_prompt_of_the_same_group():
    prompts = ["cat food recipes", "cat food recipes", "cat food brands", "dog walking tips", "cat food recipes today",
               "dog walking advice"]
    groups = ["a", "a", "a", "a", "b", "c"]
    partner = pick_partners(prompts, groups, nearest=True)
    assert partner.tolist()[:4] == [2, 2, 0, 0]  # never the identical prompt; "cat food recipes today" is in group b
    # b and c have one prompt each: the nearest prompt of any other group
    assert partner[4] == 0 and partner[5] == 3
    assert pick_partners(["same", "same"], ["a", "b"], nearest=True).tolist() == [-1, -1]


@pytest.mark.parametrize("seed", range(5))
def test_random_partner_has_another_prompt_and_stays_in_its_group_when_it_can(seed):
    prompts = ["p0", "p0", "p1", "p2", "p3", "p3", "p4"]
    groups = ["a", "a", "a", "a", "b", "b", "c"]
    partner = pick_partners(prompts, groups, seed)
    for i, j in enumerate(partner):
        assert prompts[j] != prompts[i]
        if groups[i] != "b" and groups[i] != "c":
            assert groups[j] == groups[i]
    assert groups[partner[4]] != "b" and groups[partner[5]] != "b" and groups[partner[6]] != "c"
    assert pick_partners(prompts, groups, seed).tolist() == partner.tolist()  # the seed decides


def test_message_list_prompts_work_with_a_callable_reward():
    def chat(text):
        return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]

    prompts = [chat(p) for p, _, _ in TOPICS]
    chosen = [[{"role": "assistant", "content": c}] for _, c, _ in TOPICS]
    rejected = [[{"role": "assistant", "content": "No idea."}]] * 4
    seen = []

    def reward(ps, cs):
        seen.extend(zip(ps, cs))
        return overlap([p[-1]["content"] for p in ps], cs)  # the question is the last prompt message

    metrics = exploit_probes(reward, prompts, chosen, rejected, [g for _, _, g in TOPICS])
    assert metrics["probe_prompt_use"] == 1.0 and metrics["probe_on_topic_nearest"] == 1.0
    assert sum(p == EMPTY_CHAT for p, _ in seen) == 8  # without the prompt: an empty user turn
    restated = [c for _, c in seen if c[-1]["content"].endswith("To restate your question: How do I boil an egg?")]
    assert restated == [[{"role": "assistant", "content": "Boil the egg for eight minutes.\n\nTo restate your "
                                                          "question: How do I boil an egg?"}],
                        [{"role": "assistant", "content": "No idea.\n\nTo restate your question: How do I boil an "
                                                          "egg?"}]]
    assert chosen[0] == [{"role": "assistant", "content": "Boil the egg for eight minutes."}]  # inputs unchanged


def test_model_reward_scores_as_reward_function_and_renders_conversations_without_a_prompt(tokenizer):
    model = tiny_llama(tokenizer)
    reward = model_reward(model, tokenizer, max_length=64, batch_size=3)
    prompts = [[{"role": "user", "content": "Hello world"}], EMPTY_CHAT, [{"role": "user", "content": "Paris?"}]]
    completions = [[{"role": "assistant", "content": "Hello"}], [{"role": "assistant", "content": "Hi"}],
                   [{"role": "assistant", "content": "Paris is the capital."}]]
    expected = reward_function(model, tokenizer, batch_size=2, max_length=64, append_eos=False)(prompts, completions)
    assert reward(prompts, completions) == pytest.approx(expected, abs=1e-6)
    metrics = exploit_probes(reward, [prompts[0], prompts[2]], [completions[0], completions[2]],
                             [completions[1], completions[1]])
    assert HEADLINE <= set(metrics)


def test_evaluate_reports_probes_on_the_scored_pairs_and_false_skips_them(tmp_path, model_dir, capsys):
    rows = preference_rows() + [{"prompt": "Same?", "chosen": " Yes.", "rejected": " Yes.", "source": "big",
                                 "margin": 0.0}]  # chosen == rejected: dropped by the trainer, so by the probes
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["evaluate", "--model", model_dir, "--dataset", str(data), "--group_column", "source", "--batch_size", "8"]
    assert main(common + ["--output_dir", str(tmp_path / "on")]) == 0
    assert "exploit probes: accuracy" in capsys.readouterr().out
    report = json.loads((tmp_path / "on" / "eval_report.json").read_text())
    probes = report["probes"]
    assert set(probes) == HEADLINE | {f"{key}_{g}" for key in PER_GROUP for g in ("big", "small")}
    assert report["pairs"] == 24 and sum(report["data"]["dropped"].values()) == 1
    # The same pairs, rendered and scored as the evaluation scored them (the tie would count as wrong: 23 of 25).
    assert probes["probe_accuracy"] == report["accuracy"]
    assert main(common + ["--output_dir", str(tmp_path / "off"), "--probes", "false"]) == 0
    assert "exploit probes" not in capsys.readouterr().out
    assert "probes" not in json.loads((tmp_path / "off" / "eval_report.json").read_text())


def test_compare_and_the_model_card_show_the_probes(tmp_path, capsys):
    from hf_balanced_reward.model_card import evaluation_section

    for name, rise in (("bt", 0.9), ("balanced", 0.1)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval_results.json").write_text(json.dumps(
            {"eval_accuracy": 0.7, "eval_probe_padding_rise_rate": rise, "eval_probe_prompt_use": 0.25}))
    assert main(["compare", str(tmp_path / "bt"), str(tmp_path / "balanced")]) == 0
    lines = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]
    assert "probe_padding_rise_rate 0.9000 0.1000" in lines and "probe_prompt_use 0.2500 0.2500" in lines
    assert not any(line.startswith("probe_on_topic") for line in lines)  # no run measured it

    card = evaluation_section({"eval_accuracy": 0.7, "eval_probe_padding_rise_rate": 0.9}, None, {})
    assert "| padding_rise_rate | 0.9000 | share of responses whose reward rises when filler is appended" in card
    report = {"pairs": 4, "accuracy": 0.5, "probes": {"probe_on_topic_random": 0.75}}
    card = evaluation_section({"eval_probe_padding_rise_rate": 0.9}, report, {})
    assert "| on_topic_random | 0.7500 |" in card and "padding_rise_rate" not in card  # the report's own probes
    assert "Exploit probes" not in evaluation_section({"eval_accuracy": 0.7}, None, {})


def test_evaluate_appends_eos_when_the_model_was_trained_with_it(tmp_path, model_dir, pairs_file):
    import shutil

    saved = tmp_path / "model"
    shutil.copytree(model_dir, saved)
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "reward_append_eos_token": True}))
    assert main(["evaluate", "--model", str(saved), "--dataset", pairs_file, "--output_dir", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "eval_report.json").read_text())
    rows = preference_rows()
    prompts = [r["prompt"] for r in rows]
    margins = {}
    for append_eos in (True, False):  # scoring reads the saved setting; the evaluation must score the same texts
        reward = reward_function(str(saved), append_eos=append_eos, device="cpu")
        chosen, rejected = (np.array(reward(prompts, [r[c] for r in rows])) for c in ("chosen", "rejected"))
        margins[append_eos] = float((chosen - rejected).mean())
    assert abs(margins[True] - margins[False]) > 1e-3  # the eos token changes the scores: the check below can fail
    assert report["margin"] == pytest.approx(margins[True], abs=1e-5)
