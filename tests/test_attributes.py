"""Multi-attribute reward heads (`attributes.py`): data checks, weights, losses, folding the head, labels, metrics."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from scipy import stats
from transformers import AutoModelForSequenceClassification, RobertaConfig, RobertaForSequenceClassification, pipeline

from conftest import tiny_bert, tiny_llama
from hf_balanced_reward.attributes import (
    attribute_metrics, check_attribute_values, check_reward_weights, combine_head, save_combined, set_attribute_labels,
)
from hf_balanced_reward.config import ConfigError
from hf_balanced_reward.data import DataError
from hf_balanced_reward.losses import attribute_bradley_terry, attribute_loss, regression
from hf_balanced_reward.scoring import load_reward_model

NAMES = ["helpfulness", "correctness", "coherence", "verbosity"]
WEIGHTS = [0.5, 1.5, 0.25, -1.0]  # a negative weight: verbosity penalised, as ArmoRM does


# Head ---------------------------------------------------------------------------------------------------------------


def roberta(tokenizer):
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=130, pad_token_id=tokenizer.pad_token_id)
    return RobertaForSequenceClassification(config)


def attribute_model(kind: str, tokenizer):
    """A tiny classifier with one output per attribute, its last head layer drawn at std 1 (the default 0.02
    would leave logits too small to tell a wrong combination from rounding) with a non-zero bias where it has one."""
    base = {"llama": tiny_llama, "bert": tiny_bert, "roberta": roberta}[kind](tokenizer)
    torch.manual_seed(1)
    model = type(base)(set_attribute_labels(base.config, NAMES)).eval()
    layer = model.classifier.out_proj if kind == "roberta" else getattr(model, "score", None) or model.classifier
    with torch.no_grad():
        layer.weight.normal_()
        if layer.bias is not None:
            layer.bias.normal_()
    return model


def padded_batch(tokenizer, vocab: int):
    """Random ids, right-padded with the pad id (the Llama head pools the last token that is not padding)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (4, 9), generator=generator)
    mask = torch.ones_like(ids)
    for row, length in enumerate([9, 6, 3, 7]):
        ids[row, length:], mask[row, length:] = tokenizer.pad_token_id, 0
    return {"input_ids": ids, "attention_mask": mask}


def assert_weighted_sum(combined, model, batch):
    with torch.no_grad():
        attributes, reward = model(**batch).logits, combined(**batch).logits
    expected = attributes.double() @ torch.tensor(WEIGHTS, dtype=torch.float64)
    assert reward.shape == (4, 1)
    # fp32 logits from two summation orders: a few ulps of the largest term, ~1e-6 relative to the logits' scale.
    scale = (attributes.abs() @ torch.tensor(WEIGHTS).abs()).max().item()
    assert scale > 1.0  # the test can see a wrong weight or bias
    torch.testing.assert_close(reward[:, 0].double(), expected, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("kind", ["llama", "bert", "roberta"])
def test_combined_head_outputs_the_weighted_sum_of_attributes_before_and_after_saving(kind, tokenizer, tmp_path):
    model = attribute_model(kind, tokenizer)
    batch = padded_batch(tokenizer, model.config.vocab_size)
    combined = save_combined(model, tokenizer, WEIGHTS, str(tmp_path))
    assert model.config.num_labels == 4 and model(**batch).logits.shape == (4, 4)  # the attribute model is unchanged
    assert_weighted_sum(combined, model, batch)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert_weighted_sum(loaded, model, batch)
    assert loaded.config.num_labels == 1 and loaded.config.id2label == {0: "reward"}
    assert loaded.config.label2id == {"reward": 0}
    assert loaded.config.reward_attributes == {"names": NAMES, "weights": WEIGHTS}
    scorer, _ = load_reward_model(str(tmp_path), device="cpu")  # the one-output contract of scoring.py
    assert scorer.config.num_labels == 1


def test_combined_head_defaults_to_equal_weights_and_names_weights_by_attribute(tokenizer):
    model = attribute_model("bert", tokenizer)
    batch = padded_batch(tokenizer, model.config.vocab_size)
    with torch.no_grad():
        mean = model(**batch).logits.mean(-1)
        by_name = combine_head(model, dict(zip(NAMES, WEIGHTS)))(**batch).logits[:, 0]
        by_order = combine_head(model, WEIGHTS)(**batch).logits[:, 0]
        torch.testing.assert_close(combine_head(model, None)(**batch).logits[:, 0], mean, rtol=1e-5, atol=1e-5)
    assert torch.equal(by_name, by_order)
    output = combine_head(model, WEIGHTS)(**batch, labels=torch.zeros(4))  # the model's own loss sees one output
    torch.testing.assert_close(output.loss, output.logits.square().mean())


def test_combine_head_refuses_heads_it_cannot_fold(tokenizer):
    model = attribute_model("bert", tokenizer)
    model.classifier = torch.nn.Sequential(torch.nn.Linear(32, 4))
    with pytest.raises(ConfigError, match="'classifier' is a Sequential with no Linear 'out_proj'"):
        combine_head(model, WEIGHTS)
    model = attribute_model("llama", tokenizer)
    set_attribute_labels(model.config, NAMES[:3])
    with pytest.raises(ConfigError, match="the reward head has 4 outputs but the config names 3 attributes"):
        combine_head(model, WEIGHTS[:3])


def test_pipeline_returns_every_attribute_by_name(tokenizer, tmp_path):
    model = attribute_model("llama", tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    text = "Question: what is the capital of France? Answer: Paris."
    with torch.no_grad():
        logits = model(**tokenizer(text, return_tensors="pt")).logits[0]
    scores = pipeline("text-classification", model=str(tmp_path), top_k=None, function_to_apply="none")([text])[0]
    assert {s["label"]: s["score"] for s in scores} == pytest.approx(dict(zip(NAMES, logits.tolist())), abs=1e-5)


def test_attribute_labels_must_be_distinct_names(tokenizer):
    with pytest.raises(ConfigError, match=r"attributes must be distinct, non-empty names.*\['a', 'a'\]"):
        set_attribute_labels(tiny_bert(tokenizer).config, ["a", "a"])


# Weights ------------------------------------------------------------------------------------------------------------


def test_reward_weights():
    assert check_reward_weights(None, NAMES) == [0.25] * 4
    assert check_reward_weights({"verbosity": -1, "helpfulness": 2, "correctness": 0, "coherence": 0},
                                NAMES) == [2.0, 0.0, 0.0, -1.0]
    assert check_reward_weights(np.array(WEIGHTS), NAMES) == WEIGHTS


@pytest.mark.parametrize("weights, problem", [
    ([1.0, 2.0], r"got \[1.0, 2.0\] \(2 given\)"),
    ([1.0, math.nan, 0.0, 0.0], r"entry 1 \(correctness\) is NaN"),
    ([1.0, "2", 0.0, 0.0], r"entry 1 \(correctness\) is '2' \(str\), not a number"),
    ([1.0, True, 0.0, 0.0], r"entry 1 \(correctness\) is True \(bool\), not a number"),
    ([0, 0.0, 0, 0], "are all zero"),
    ({"helpfulness": 1.0, "tone": 1.0}, "unknown: tone; missing: correctness, coherence, verbosity"),
])
def test_bad_reward_weights_are_refused_naming_the_option_and_attributes(weights, problem):
    with pytest.raises(ConfigError, match=r"reward_weights.*" + problem) as raised:
        check_reward_weights(weights, NAMES)
    if not isinstance(weights, dict):
        assert "4 numbers, one per attribute (helpfulness, correctness, coherence, verbosity)" in str(raised.value)


# Losses -------------------------------------------------------------------------------------------------------------


def test_regression_by_hand():
    predicted = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    targets = torch.tensor([[0.0, 2.0], [5.0, 1.0]])
    assert regression(predicted, targets).tolist() == [0.5, 6.5]  # ((1-0)^2 + 0) / 2, ((3-5)^2 + (4-1)^2) / 2
    # standardised targets: ((0-1)/2, (2-2)/0.5) = (-0.5, 0), ((5-1)/2, (1-2)/0.5) = (2, -2)
    assert regression(predicted, targets, standardize=([1.0, 2.0], [2.0, 0.5])).tolist() == [3.125, 18.5]


def test_regression_leaves_absent_attributes_out_of_loss_and_gradient():
    predicted = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], requires_grad=True)
    targets = torch.tensor([[0.0, math.nan], [5.0, 1.0], [7.0, 7.0]])  # NaN: not scored
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    loss = regression(predicted, targets, mask)
    assert loss.tolist() == [1.0, 4.0, 0.0]  # the mean over each row's present attributes; none present: 0
    loss.sum().backward()
    assert predicted.grad.tolist() == [[2.0, 0.0], [-4.0, 0.0], [0.0, 0.0]]  # d/dp (p - t)^2 / n, no NaN


def test_attribute_bradley_terry_pushes_each_attribute_its_own_way_and_pulls_ties_together():
    chosen = torch.tensor([[0.0, 0.0, 1.0]], requires_grad=True)
    rejected = torch.tensor([[0.0, 0.0, -1.0]], requires_grad=True)
    # chosen better on attribute 0, worse on 1, equal on 2
    loss = attribute_bradley_terry(chosen, rejected, torch.tensor([[4.0, 1.0, 3.0]]), torch.tensor([[2.0, 3.0, 3.0]]))
    loss.sum().backward()
    assert chosen.grad[0, 0] < 0 < rejected.grad[0, 0]  # descent raises chosen's reward 0
    assert chosen.grad[0, 1] > 0 > rejected.grad[0, 1]  # and lowers chosen's reward 1
    assert chosen.grad[0, 2] > 0 > rejected.grad[0, 2]  # and brings attribute 2's rewards (1, -1) together


def test_attribute_bradley_terry_is_bradley_terry_per_attribute_without_ties():
    chosen, rejected = torch.tensor([[0.3, -1.2, 2.0]]), torch.tensor([[0.5, 0.4, -1.0]])
    chosen_targets, rejected_targets = torch.tensor([[1.0, 0.0, 5.0]]), torch.tensor([[0.0, 2.0, 1.0]])
    # oriented differences (better - worse): 0.3 - 0.5, 0.4 - (-1.2), 2.0 - (-1.0)
    expected = -F.logsigmoid(torch.tensor([-0.2, 1.6, 3.0])).mean()
    # Davidson with a vanishing tie weight is Bradley-Terry; the pair seen from the other side costs the same.
    loss = attribute_bradley_terry(chosen, rejected, chosen_targets, rejected_targets, log_tie=-40.0)
    swapped = attribute_bradley_terry(rejected, chosen, rejected_targets, chosen_targets, log_tie=-40.0)
    torch.testing.assert_close(loss, expected.reshape(1))
    torch.testing.assert_close(swapped, loss)


def test_attribute_bradley_terry_averages_over_the_attributes_a_pair_has():
    chosen = torch.tensor([[1.0, 5.0, 2.0], [1.0, 1.0, 1.0]], requires_grad=True)
    rejected = torch.zeros(2, 3)
    chosen_targets = torch.tensor([[1.0, math.nan, 1.0], [1.0, 1.0, 1.0]])
    rejected_targets = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [False, False, False]])
    loss = attribute_bradley_terry(chosen, rejected, chosen_targets, rejected_targets, mask, tie_loss="rao_kupper")
    kept = attribute_bradley_terry(chosen[:1, [0, 2]], rejected[:1, [0, 2]], chosen_targets[:1, [0, 2]],
                                   rejected_targets[:1, [0, 2]], tie_loss="rao_kupper")
    assert loss[0] == kept[0] and loss[1] == 0.0
    loss.sum().backward()
    assert chosen.grad[0, 1] == 0 and not chosen.grad[1].any() and chosen.grad[0, 0] < 0


def test_attribute_loss_is_the_weighted_sum_of_its_parts():
    chosen, rejected = torch.tensor([[1.0, 0.5]]), torch.tensor([[0.0, 2.0]])
    chosen_targets, rejected_targets = torch.tensor([[3.0, 1.0]]), torch.tensor([[1.0, 1.0]])
    parts = ((regression(chosen, chosen_targets) + regression(rejected, rejected_targets)) / 2,
             attribute_bradley_terry(chosen, rejected, chosen_targets, rejected_targets))
    loss = attribute_loss(chosen, rejected, chosen_targets, rejected_targets, regression_weight=0.3, ranking_weight=2)
    torch.testing.assert_close(loss, 0.3 * parts[0] + 2 * parts[1])
    with pytest.raises(ValueError, match="regression_weight and ranking_weight must be >= 0 and not both 0"):
        attribute_loss(chosen, rejected, chosen_targets, rejected_targets, regression_weight=0, ranking_weight=0)


# Data ---------------------------------------------------------------------------------------------------------------


def scored_rows(**columns) -> Dataset:
    rows = {"prompt": ["p0", "p1", "p2", "p3"], "response": ["r0", "r1", "r2", "r3"],
            "helpfulness": [3.0, 2.0, 4.0, 1.0], "coherence": [4, 4, 3, 2]}
    return Dataset.from_dict({**rows, **columns})


@pytest.mark.parametrize("coherence, problem", [
    ([4.0, 3.0, math.nan, 1.0], "row 2: column 'coherence' is NaN"),
    ([4.0, None, 3.0, 1.0], "row 1: column 'coherence' is null"),
    ([4.0, 3.0, 2.0, math.inf], "row 3: column 'coherence' is inf: infinite, or beyond float32's range"),
    ([4.0, 3.0, 2.0, 1e39], "row 3: column 'coherence' is 1e[+]39: infinite, or beyond float32's range"),
    (["4", "good", "3", "1"], "4 bad row\\(s\\) of 4: row 0: column 'coherence' is '4' \\(str\\), not a number"),
    ([True, False, True, True], "row 0: column 'coherence' is True \\(bool\\), not a number"),
])
def test_bad_attribute_values_are_refused_naming_row_column_and_value(coherence, problem):
    with pytest.raises(DataError, match=f"^train dataset has .*{problem}.*on_bad_rows: skip"):
        check_attribute_values(scored_rows(coherence=coherence), ["helpfulness", "coherence"], "train")
    with pytest.raises(DataError, match=problem):  # 'auto' stops too: a row without usable scores cannot be read
        check_attribute_values(scored_rows(coherence=coherence), ["coherence"], "train", on_bad_rows="auto")


def test_a_missing_attribute_column_is_named_with_the_columns_present():
    with pytest.raises(DataError, match=r"eval dataset has no column for attribute 'coherance'.*\(did you mean "
                                        r"'coherence'\?\); its columns are \['prompt', 'response', 'helpfulness', "
                                        r"'coherence'\]"):
        check_attribute_values(scored_rows(), ["helpfulness", "coherance"], "eval")


def test_skip_drops_bad_rows_and_counts_them():
    kept, dropped = check_attribute_values(scored_rows(coherence=[4.0, math.nan, 3.0, None]), ["coherence"], "train",
                                           on_bad_rows="skip")
    assert dropped == 2 and kept["prompt"] == ["p0", "p2"] and kept["coherence"] == [4.0, 3.0]
    good = scored_rows()
    assert check_attribute_values(good, ["helpfulness", "coherence"], "train") == (good, 0)
    with pytest.raises(ConfigError, match="on_bad_rows='skp' is not an option \\(did you mean 'skip'\\?\\)"):
        check_attribute_values(good, ["coherence"], "train", on_bad_rows="skp")


def test_pair_columns_are_checked_per_completion():
    pairs = Dataset.from_dict({"chosen": ["a", "b"], "rejected": ["c", "d"], "coherence_chosen": [3.0, 2.0],
                               "coherence_rejected": [1.0, math.nan]})
    with pytest.raises(DataError, match="1 bad row\\(s\\) of 2: row 1: column 'coherence_rejected' is NaN"):
        check_attribute_values(pairs, ["coherence"], "train")
    assert check_attribute_values(pairs, ["coherence_chosen"], "train")[1] == 0


def test_list_columns_are_checked_per_element():
    lists = Dataset.from_dict({
        "prompt": ["p0", "p1", "p2", "p3"],
        "completions": [["a", "b", "c"], ["a", "b"], ["a", "b", "c"], ["a", "b"]],
        "coherence": [[1.0, 2.0, 3.0], [1.0, 2.0], [1.0, math.nan, 2.0], [1.0, 2.0, 3.0]],
    })
    with pytest.raises(DataError, match="2 bad row\\(s\\) of 4: row 2: column 'coherence' item 1 is NaN; row 3: "
                                        "column 'coherence' has 3 entries for 2 completions; give one per completion"):
        check_attribute_values(lists, ["coherence"], "train")
    kept, dropped = check_attribute_values(lists, ["coherence"], "train", on_bad_rows="skip")
    assert dropped == 2 and kept["prompt"] == ["p0", "p1"]


# Metrics ------------------------------------------------------------------------------------------------------------


def test_attribute_metrics_by_hand_with_ties():
    predicted = np.array([[1.0, 9.0], [2.0, 1.0], [2.0, 3.0], [7.0, 2.0]])
    expert = np.array([[1.0, math.nan], [3.0, 1.0], [2.0, 2.0], [2.0, 3.0]])
    metrics = attribute_metrics(predicted, expert, ["a", "b c"], pairs=[(0, 1), (1, 2), (2, 3), (0, 3)])
    # Attribute a: Pearson of (1, 2, 2, 7) and (1, 3, 2, 2): cov 1, sums of squares 22 and 2 -> 1 / sqrt(44).
    # Ranks (1, 2.5, 2.5, 4) and (1, 4, 2.5, 2.5) -> Spearman 2.25 / 4.5. Kendall tau-b: 3 concordant, 1 discordant,
    # one pair tied in each: (3 - 1) / sqrt((6 - 1)(6 - 1)) = 0.4.
    assert metrics["pearson_a"] == pytest.approx(1 / math.sqrt(44))
    assert metrics["spearman_a"] == pytest.approx(0.5)
    assert metrics["kendall_a"] == pytest.approx(0.4)
    # Pairs with different expert scores: (0, 1) right, (1, 2) a predicted tie: wrong, (0, 3) right; (2, 3) tied.
    assert (metrics["pair_accuracy_a"], metrics["pairs_a"]) == (pytest.approx(2 / 3), 3)
    # Attribute "b c": row 0 has no expert score; (1, 3, 2) against (1, 2, 3): tau = (2 - 1) / 3.
    assert metrics["scored_b_c"] == 3 and metrics["kendall_b_c"] == pytest.approx(1 / 3)
    assert (metrics["pair_accuracy_b_c"], metrics["pairs_b_c"]) == (0.5, 2)  # (1, 2) right, (2, 3) wrong


def test_attribute_metrics_agree_with_scipy_and_are_nan_where_undefined():
    generator = np.random.default_rng(0)
    expert = generator.integers(0, 5, size=(40, 2)).astype(float)  # Likert scores: many ties
    predicted = expert + generator.normal(size=(40, 2))
    predicted[:, 1] = 3.0  # a constant prediction has no correlation
    metrics = attribute_metrics(predicted, expert, ["x", "y"])
    assert metrics["pearson_x"] == pytest.approx(stats.pearsonr(predicted[:, 0], expert[:, 0]).statistic)
    assert metrics["spearman_x"] == pytest.approx(stats.spearmanr(predicted[:, 0], expert[:, 0]).statistic)
    assert metrics["kendall_x"] == pytest.approx(stats.kendalltau(predicted[:, 0], expert[:, 0]).statistic)
    assert all(math.isnan(metrics[f"{name}_y"]) for name in ("pearson", "spearman", "kendall"))
    assert "pair_accuracy_x" not in metrics
