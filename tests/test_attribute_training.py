"""Multi-attribute reward models through the trainer (`attribute_training.py`): data, collator, losses in training,
per-attribute evaluation, the saved model and its combined export, and the clients (pipeline, reward_function,
score) that read them."""

import json
import math
import os

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import pipeline

from conftest import SHARED_DATA, preference_rows, tiny_bert
from hf_balanced_reward import BalancedRewardConfig, BalancedRewardTrainer, ConfigError
from hf_balanced_reward.attribute_training import BAD_SCORES, content_key, evaluation_metrics, row_losses
from hf_balanced_reward.attributes import attribute_metrics
from hf_balanced_reward.cli import main, split_by_column
from hf_balanced_reward.collator import RewardCollator
from hf_balanced_reward.data import DataError
from hf_balanced_reward.errors import UsageError
from hf_balanced_reward.losses import LOSSES, attribute_bradley_terry, regression
from hf_balanced_reward.scoring import reward_function

NAMES = ["helpful", "brief"]
WEIGHTS = [0.75, -0.5]  # a negative weight: a penalty, as ArmoRM penalises verbosity
SUMMEVAL = os.path.join(SHARED_DATA, "summeval", "summeval.jsonl")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def attribute_rows(n: int = 24) -> list[dict]:
    """preference_rows with two attributes per response: `helpful` (chosen higher) and `brief` (the shorter response
    higher; equal on every third pair, a tie)."""
    rows = preference_rows(n)
    for i, row in enumerate(rows):
        del row["margin"]
        row.update(helpful_chosen=4.0 + (i % 2), helpful_rejected=1.0 + (i % 3),
                   brief_chosen=2.0, brief_rejected=2.0 if i % 3 == 0 else 3.0 + (i % 2))
    return rows


def config(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path / "out"), report_to="none", per_device_train_batch_size=4,
                    per_device_eval_batch_size=5, learning_rate=1e-2, logging_steps=1, save_strategy="no", seed=0,
                    loss_type="attribute_loss", attributes=NAMES, reward_weights=WEIGHTS)
    return BalancedRewardConfig(**{**defaults, **kwargs})


def texts(rows, side):
    return [r["prompt"] for r in rows], [r[side] for r in rows]


# Losses and collator --------------------------------------------------------------------------------------------


def test_attribute_losses_are_named_in_LOSSES():
    assert LOSSES["regression"] is regression and LOSSES["attribute_bradley_terry"] is attribute_bradley_terry
    assert "attribute_loss" in LOSSES


def test_row_losses_average_a_list_over_its_pairs_and_completions():
    """A K = 3 list and a K = 2 pair padded to 3: each row's loss is the mean over its real pairs (pair losses) or
    real completions (regression), by hand from the loss functions on single pairs."""
    generator = torch.Generator().manual_seed(0)
    rewards, targets = torch.randn(2, 3, 2, generator=generator), torch.randn(2, 3, 2, generator=generator)
    targets[1, 2] = float("nan")
    mask = torch.tensor([[True, True, True], [True, True, False]])
    pair = row_losses("attribute_bradley_terry", {}, rewards, targets, mask)
    by_hand = [sum(attribute_bradley_terry(rewards[0, i:i + 1], rewards[0, j:j + 1], targets[0, i:i + 1],
                                           targets[0, j:j + 1]) for i, j in ((0, 1), (0, 2), (1, 2))) / 3,
               attribute_bradley_terry(rewards[1, :1], rewards[1, 1:2], targets[1, :1], targets[1, 1:2])]
    torch.testing.assert_close(pair, torch.cat(by_hand))
    mse = row_losses("regression", {}, rewards, targets, mask)
    torch.testing.assert_close(mse, torch.stack([regression(rewards[0], targets[0]).mean(),
                                                 regression(rewards[1, :2], targets[1, :2]).mean()]))


def test_collator_stacks_attribute_scores_per_completion_nan_in_padded_slots():
    rows = [{"completion_ids": [[1, 5, 6], [1, 5, 7], [1, 5, 8]], "ranks": [1, 2, 3],
             "attribute_scores": [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]},
            {"completion_ids": [[1, 9], [1, 10]], "ranks": [1, 2], "attribute_scores": [[7.0, 8.0], [9.0, 0.5]]}]
    batch = RewardCollator(pad_token_id=0)(rows)
    nan = float("nan")
    expected = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], [[7.0, 8.0], [9.0, 0.5], [nan, nan]]])
    torch.testing.assert_close(batch["attribute_scores"], expected, equal_nan=True)


# Training, evaluation, saving -------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type,loss_kwargs", [("regression", {}), ("regression", {"standardize": True}),
                                                   ("attribute_bradley_terry", {}),
                                                   ("attribute_loss", {"ranking_weight": 0.5})])
def test_every_attribute_loss_trains_and_evaluates_per_attribute(tmp_path, model_dir, loss_type, loss_kwargs):
    data = Dataset.from_list(attribute_rows())
    trainer = BalancedRewardTrainer(model=model_dir, args=config(tmp_path, loss_type=loss_type,
                                                                 loss_kwargs=loss_kwargs, max_steps=3),
                                    train_dataset=data, eval_dataset=data)
    assert trainer.model.config.num_labels == 2 and trainer.model.score.weight.shape[0] == 2
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)]
    assert "score.weight" in changed and any("layers" in n for n in changed)
    assert np.isfinite(trainer.state.log_history[0]["loss"]) and "accuracy" in trainer.state.log_history[0]
    metrics = trainer.evaluate()
    for name in NAMES:
        for metric in ("pearson", "spearman", "kendall"):
            assert -1 <= metrics[f"eval_{metric}_{name}"] <= 1, (metric, name)
        assert metrics[f"eval_scored_{name}"] == 48  # both responses of 24 pairs
    assert metrics["eval_pairs_helpful"] == 24 and metrics["eval_pairs_brief"] == 16  # 8 ties have no order
    assert 0 <= metrics["eval_accuracy"] <= 1 and np.isfinite(metrics["eval_loss"])
    if loss_kwargs.get("standardize"):  # (mean, std) of every response's scores in the train set
        scores = np.array([[[r["helpful_chosen"], r["brief_chosen"]], [r["helpful_rejected"], r["brief_rejected"]]]
                           for r in attribute_rows()]).reshape(-1, 2)
        np.testing.assert_allclose(trainer.loss_options["standardize"], (scores.mean(0), scores.std(0)))


def test_evaluation_metrics_are_those_of_the_rewards_that_scoring_gives(tmp_path, model_dir):
    """evaluate()'s per-attribute metrics and the combined reward's accuracy agree with the texts scored one by one
    through `reward_function` (the plain layout), whatever layout evaluation used (shared-prompt here)."""
    rows = attribute_rows()
    data = Dataset.from_list(rows)
    trainer = BalancedRewardTrainer(model=model_dir, args=config(tmp_path, max_steps=4), train_dataset=data,
                                    eval_dataset=data)
    trainer.train()
    assert trainer.shared_prompt  # the packed layout scored the evaluation
    metrics = trainer.evaluate()
    per_attribute = reward_function(trainer.model, trainer.processing_class, per_attribute=True)
    chosen, rejected = (per_attribute(*texts(rows, side)) for side in ("chosen", "rejected"))
    predicted = np.array([[[c[n] for n in NAMES], [r[n] for n in NAMES]] for c, r in zip(chosen, rejected)])
    expert = np.array([[[r["helpful_chosen"], r["brief_chosen"]], [r["helpful_rejected"], r["brief_rejected"]]]
                       for r in rows])
    prediction = trainer.predict(trainer.eval_dataset)
    evaluated = prediction.predictions[2]  # [rows, 2, A]: what evaluate() computed its metrics from
    # The packed and plain layouts agree to float rounding (forward.shared_prompt_difference checks 1e-3).
    np.testing.assert_allclose(evaluated, predicted, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(prediction.label_ids[4], expert)
    keys = np.array([[content_key(r["prompt"], r[side]) for side in ("chosen", "rejected")] for r in rows])
    np.testing.assert_array_equal(prediction.label_ids[5], keys)
    expected = evaluation_metrics(evaluated, expert, np.ones((len(rows), 2)), NAMES, keys)
    for key, value in expected.items():
        assert metrics[f"eval_{key}"] == pytest.approx(value, rel=1e-9, nan_ok=True), key
    reference = evaluation_metrics(predicted, expert, np.ones((len(rows), 2)), NAMES, keys)
    for name in NAMES:  # Pearson moves by less than the rewards do; rank statistics may flip on near ties
        assert metrics[f"eval_pearson_{name}"] == pytest.approx(reference[f"pearson_{name}"], abs=1e-3)
    combined = predicted @ np.array(WEIGHTS)
    gaps = combined[:, 0] - combined[:, 1]
    near = int((np.abs(gaps) < 1e-4).sum())  # pairs whose order a layout's rounding could flip
    assert abs(metrics["eval_accuracy"] - (gaps > 0).mean()) <= near / len(rows)
    reward = reward_function(trainer.model, trainer.processing_class)  # the weighted sum, as RL reads it
    np.testing.assert_allclose(reward(*texts(rows, "chosen")), combined[:, 0], rtol=1e-5, atol=1e-5)


def test_evaluation_metrics_count_each_completion_and_each_pair_once():
    predicted = np.array([[[1.0], [0.0], [2.0]], [[0.5], [0.7], [-9.0]]])
    expert = np.array([[[3.0], [1.0], [2.0]], [[1.0], [2.0], [0.0]]])
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    metrics = evaluation_metrics(predicted, expert, mask, ["a"])
    flat_predicted, flat_expert = np.array([[1.0], [0.0], [2.0], [0.5], [0.7]]), np.array([[3.0], [1.0], [2.0],
                                                                                           [1.0], [2.0]])
    assert metrics == attribute_metrics(flat_predicted, flat_expert, ["a"], [(0, 1), (0, 2), (1, 2), (3, 4)])
    assert metrics["pairs_a"] == 4 and metrics["pair_accuracy_a"] == 0.75  # (0, 2) ordered the wrong way


def test_a_response_in_several_rows_counts_once_in_the_attribute_metrics():
    """SummEval's shape: summary 7 is in both pairs. Counted once, with its first occurrence's reward; the pair
    (7, 9) given twice is one pair."""
    predicted = np.array([[[1.0], [0.0]], [[1.0], [3.0]], [[1.0], [0.0]]])
    expert = np.array([[[3.0], [1.0]], [[3.0], [2.0]], [[3.0], [1.0]]])
    keys = np.array([[7, 9], [7, 8], [7, 9]])
    metrics = evaluation_metrics(predicted, expert, np.ones((3, 2)), ["a"], keys)
    distinct = attribute_metrics(np.array([[1.0], [3.0], [0.0]]), np.array([[3.0], [2.0], [1.0]]), ["a"],
                                 [(0, 2), (0, 1)])  # keys 7, 8, 9 in sorted order
    assert metrics == distinct
    assert metrics["scored_a"] == 3 and metrics["pairs_a"] == 2 and metrics["pair_accuracy_a"] == 0.5
    assert evaluation_metrics(predicted, expert, np.ones((3, 2)), ["a"])["scored_a"] == 6  # no keys: per row


def test_content_keys_tell_responses_apart_by_prompt_and_text():
    assert content_key("p", "r") == content_key("p", "r") != content_key("p", "r2") != content_key("q", "r")
    assert content_key(None, [1, 2]) != content_key(None, [1, 3]) and 0 <= content_key("p", "r") < 2 ** 63


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_saved_model_names_its_attributes_and_its_combined_export_gives_the_weighted_sum(tmp_path, model_dir,
                                                                                         tokenizer, kind):
    rows = attribute_rows()
    data = Dataset.from_list(rows)
    model = model_dir
    if kind == "bert":  # a model object: its head must already have one output per attribute (named afresh)
        base = tiny_bert(tokenizer)
        base.config.id2label, base.config.label2id = {0: "x", 1: "y"}, {"x": 0, "y": 1}
        model = type(base)(base.config)
    trainer = BalancedRewardTrainer(model=model, args=config(tmp_path, max_steps=2, export_combined=True),
                                    train_dataset=data, processing_class=tokenizer)
    trainer.train()
    out = str(tmp_path / "out")
    trainer.save_model(out)
    saved = json.load(open(os.path.join(out, "config.json")))
    assert saved["id2label"] == {"0": "helpful", "1": "brief"}
    assert saved["reward_attributes"] == {"names": NAMES, "weights": WEIGHTS}
    prompts, chosen = texts(rows[:6], "chosen")
    per_attribute = reward_function(out, per_attribute=True)(prompts, chosen)
    classify = pipeline("text-classification", model=out, top_k=None, function_to_apply="none", device="cpu")
    for prompt, response, expected in zip(prompts, chosen, per_attribute):
        scores = {item["label"]: item["score"] for item in classify([prompt + response])[0]}
        assert scores == pytest.approx(expected, abs=1e-5)
    weighted = [sum(w * r[n] for n, w in zip(NAMES, WEIGHTS)) for r in per_attribute]
    combined = reward_function(os.path.join(out, "combined"))
    assert combined.model.config.num_labels == 1
    # fp32 rounding of a 2-term sum of rewards of size ~1 (the head folded in float64, stored in float32)
    scale = 1 + max(abs(v) for r in per_attribute for v in r.values())
    np.testing.assert_allclose(combined(prompts, chosen), weighted, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(reward_function(out)(prompts, chosen), weighted, rtol=0, atol=1e-5 * scale)
    card = open(os.path.join(out, "README.md")).read()
    assert "helpful 0.75, brief -0.5" in card and "`combined/`" in card


def test_a_lora_run_exports_a_plain_combined_model(tmp_path, model_dir):
    from peft import LoraConfig

    rows = attribute_rows(8)
    trainer = BalancedRewardTrainer(model=model_dir, args=config(tmp_path, max_steps=2, export_combined=True),
                                    train_dataset=Dataset.from_list(rows),
                                    peft_config=LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8))
    trainer.train()
    out = str(tmp_path / "out")
    trainer.save_model(out)
    assert not os.path.exists(os.path.join(out, "combined", "adapter_config.json"))
    prompts, chosen = texts(rows, "chosen")
    trained = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
    per_attribute = reward_function(trained, trainer.processing_class, per_attribute=True)(prompts, chosen)
    weighted = [sum(w * r[n] for n, w in zip(NAMES, WEIGHTS)) for r in per_attribute]
    scale = 1 + max(abs(v) for r in per_attribute for v in r.values())
    np.testing.assert_allclose(reward_function(os.path.join(out, "combined"))(prompts, chosen), weighted, rtol=0,
                               atol=1e-5 * scale)


def test_score_writes_the_weighted_reward_and_each_attribute_on_request(tmp_path, model_dir):
    rows = attribute_rows(8)
    trainer = BalancedRewardTrainer(model=model_dir, args=config(tmp_path, max_steps=1),
                                    train_dataset=Dataset.from_list(rows))
    trainer.train()
    out = str(tmp_path / "out")
    trainer.save_model(out)
    data = tmp_path / "responses.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "completions": [r["chosen"], r["rejected"]]}) + "\n"
                            for r in rows))
    assert main(["score", "--model", out, "--dataset", str(data), "--output", str(tmp_path / "s.jsonl"),
                 "--attributes"]) == 0
    scored = [json.loads(line) for line in open(tmp_path / "s.jsonl")]
    for line in scored:
        weighted = [sum(w * a[n] for n, w in zip(NAMES, WEIGHTS)) for a in line["attribute_rewards"]]
        assert line["rewards"] == pytest.approx(weighted, abs=1e-5) and line["reward"] == max(line["rewards"])
    with pytest.raises(ConfigError, match="per_attribute=True needs a multi-attribute model"):
        reward_function(model_dir, per_attribute=True)
    from hf_balanced_reward.serve_batching import RewardModel

    served = RewardModel(out, "cpu", "float32", None)  # the server scores an attribute model by its weights
    ids, _ = served.tokenize(*texts(rows, "chosen"))
    expected = reward_function(out)(*texts(rows, "chosen"))
    np.testing.assert_allclose(served.score_batch(ids), expected, rtol=0, atol=1e-5)


# The evaluate command ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def attribute_model(tmp_path_factory, model_dir):
    """A saved two-attribute model (4 steps: its outputs differ between responses)."""
    out = tmp_path_factory.mktemp("attribute-model")
    trainer = BalancedRewardTrainer(model=model_dir, args=config(out, max_steps=4),
                                    train_dataset=Dataset.from_list(attribute_rows()))
    trainer.train()
    trainer.save_model(str(out / "model"))
    return str(out / "model")


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_evaluate_reports_each_attribute_over_distinct_responses_and_plots_them(tmp_path, attribute_model, capsys):
    """Each response once, as the texts score one by one: the first pair repeated as a third of the data changes
    nothing but the pair metrics' counts."""
    rows = attribute_rows()
    data = write_jsonl(tmp_path / "pairs.jsonl", rows + [rows[0]] * 8)
    assert main(["evaluate", "--model", attribute_model, "--dataset", data, "--output_dir",
                 str(tmp_path / "report"), "--probes", "false"]) == 0
    report = json.load(open(tmp_path / "report" / "eval_report.json"))
    per_attribute = reward_function(attribute_model, per_attribute=True)
    chosen, rejected = (per_attribute(*texts(rows, side)) for side in ("chosen", "rejected"))
    predicted = np.array([[[c[n] for n in NAMES], [r[n] for n in NAMES]] for c, r in zip(chosen, rejected)])
    expert = np.array([[[r["helpful_chosen"], r["brief_chosen"]], [r["helpful_rejected"], r["brief_rejected"]]]
                       for r in rows])
    expected = attribute_metrics(predicted.reshape(-1, 2), expert.reshape(-1, 2), NAMES,
                                 [(2 * i, 2 * i + 1) for i in range(len(rows))])
    assert report["pairs"] == len(rows) + 8 and report["scored_helpful"] == 2 * len(rows)
    for key, value in expected.items():  # the command's layout against one-by-one scoring: float rounding
        assert report[key] == pytest.approx(value, abs=1e-3 if key.startswith(("pearson", "spearman", "kendall"))
                                            else 1e-12), key
    assert report["attribute_weights"] == dict(zip(NAMES, WEIGHTS))
    assert os.path.getsize(tmp_path / "report" / report["plots"]["attributes"]) > 0
    printed = capsys.readouterr().out
    assert "helpful (0.75): Pearson" in printed and "brief (-0.5): Pearson" in printed


def test_evaluate_without_attribute_columns_scores_the_combined_reward(tmp_path, attribute_model):
    rows = attribute_rows()
    plain = [{k: v for k, v in r.items() if k in ("prompt", "chosen", "rejected")} for r in rows]
    data = write_jsonl(tmp_path / "pairs.jsonl", plain)
    assert main(["evaluate", "--model", attribute_model, "--dataset", data, "--output_dir",
                 str(tmp_path / "report"), "--probes", "false"]) == 0
    report = json.load(open(tmp_path / "report" / "eval_report.json"))
    reward = reward_function(attribute_model)
    gaps = np.array(reward(*texts(rows, "chosen"))) - np.array(reward(*texts(rows, "rejected")))
    near = int((np.abs(gaps) < 1e-4).sum())  # pairs whose order a layout's rounding could flip
    assert abs(report["accuracy"] - (gaps > 0).mean()) <= near / len(rows)
    assert "attribute_weights" not in report and "pearson_helpful" not in report


def test_evaluate_single_scored_responses_reports_the_attributes(tmp_path, attribute_model, capsys):
    rows = response_rows()
    data = write_jsonl(tmp_path / "responses.jsonl", rows)
    assert main(["evaluate", "--model", attribute_model, "--dataset", data, "--output_dir",
                 str(tmp_path / "report")]) == 0
    report = json.load(open(tmp_path / "report" / "eval_report.json"))
    scored = reward_function(attribute_model, per_attribute=True)([r["prompt"] for r in rows],
                                                                 [r["response"] for r in rows])
    expected = attribute_metrics([[s[n] for n in NAMES] for s in scored], [[r[n] for n in NAMES] for r in rows],
                                 NAMES, np.zeros((0, 2)))
    distinct = len({(r["prompt"], r["response"]) for r in rows})  # the prompts differ: each row its own response
    assert report["scored_helpful"] == distinct == len(rows)
    assert report["pearson_helpful"] == pytest.approx(expected["pearson_helpful"], abs=1e-3)
    assert "24 scored responses" in capsys.readouterr().out


def test_exploit_probes_score_the_combined_reward_of_an_attribute_model(tmp_path, model_dir):
    rows = attribute_rows()
    data = Dataset.from_list(rows)
    trainer = BalancedRewardTrainer(model=model_dir, args=config(tmp_path, max_steps=2, exploit_probes=True),
                                    train_dataset=data, eval_dataset=data)
    trainer.train()
    metrics = trainer.evaluate()
    reward = reward_function(trainer.model, trainer.processing_class)  # the weighted sum
    gaps = np.array(reward(*texts(rows, "chosen"))) - np.array(reward(*texts(rows, "rejected")))
    near = int((np.abs(gaps) < 1e-4).sum())
    assert abs(metrics["eval_probe_accuracy"] - (gaps > 0).mean()) <= near / len(rows)
    assert 0 <= metrics["eval_probe_padding_rise_rate"] <= 1 and "eval_probe_on_topic_random" in metrics


def test_a_multi_attribute_model_is_not_loaded_as_a_one_output_one(tmp_path, attribute_model):
    with pytest.raises(ConfigError, match=r"multi-attribute reward model \(2 outputs: helpful, brief\); to train it "
                                          r"further set attributes: \[helpful, brief\]"):
        BalancedRewardTrainer(model=attribute_model, args=BalancedRewardConfig(output_dir=str(tmp_path),
                                                                               report_to="none"),
                              train_dataset=Dataset.from_list(preference_rows(4)))


def response_rows(n: int = 24) -> list[dict]:
    """One scored response per row (HelpSteer-style): a polite answer is helpful, a curt one is not."""
    return [{"prompt": f"Question {i}: please help me write an email?",
             "response": " Sure, here is a short and polite email." + " Hello" * (i % 3) if i % 2 else " No.",
             "helpful": 4.0 + (i % 4 == 1) if i % 2 else 1.0, "brief": 2.0 + i % 3} for i in range(n)]


def test_single_scored_responses_train_a_regression_head_as_scoring_reads_it(tmp_path, model_dir):
    rows = response_rows()
    data = Dataset.from_list(rows)
    trainer = BalancedRewardTrainer(model=model_dir, args=config(tmp_path, loss_type="regression", max_steps=8),
                                    train_dataset=data, eval_dataset=data)
    assert trainer.data_report["train"]["responses"] == 24
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["list_mask"].shape[1] == 1 and batch["attribute_scores"].shape[1:] == (1, 2)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] < before / 2  # the scores are learnt: squared error at least halved
    assert metrics["eval_scored_helpful"] == 24 and metrics["eval_pairs_helpful"] == 0  # no pairs to order
    assert -1 <= metrics["eval_pearson_helpful"] <= 1
    prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
    scored = reward_function(trainer.model, trainer.processing_class, per_attribute=True)(prompts, responses)
    evaluated = trainer.predict(trainer.eval_dataset).predictions[2][:, 0]  # [rows, A], as evaluate() read them
    np.testing.assert_allclose(evaluated, [[s[n] for n in NAMES] for s in scored], rtol=0, atol=1e-4)


def test_single_responses_need_the_regression_loss_and_text_fields(tmp_path, model_dir, no_model_load):
    data = Dataset.from_list(response_rows())
    with pytest.raises(DataError, match=r"scores one response per row .* loss_type='attribute_loss' compares"):
        BalancedRewardTrainer(model=model_dir, args=config(tmp_path), train_dataset=data)
    bad = Dataset.from_list(with_row(response_rows(), 4, response=""))
    with pytest.raises(DataError, match=r"row 4: column 'response' is empty"):
        BalancedRewardTrainer(model=model_dir, args=config(tmp_path, loss_type="regression", on_bad_rows="error"),
                              train_dataset=bad)


# Bad data and options ---------------------------------------------------------------------------------------------


def with_row(rows, index, **values):
    rows = [dict(r) for r in rows]
    rows[index].update(values)
    return rows


@pytest.mark.parametrize("rows,message", [
    (with_row(attribute_rows(), 3, brief_rejected=float("nan")), r"row 3: column 'brief_rejected' is NaN"),
    ([{k: v for k, v in r.items() if k != "brief_chosen"} for r in attribute_rows()],
     r"no column for attribute 'brief'"),
], ids=["nan", "missing column"])
def test_bad_attribute_data_is_refused_before_the_model_loads(tmp_path, model_dir, no_model_load, rows, message):
    with pytest.raises(DataError, match=message):
        BalancedRewardTrainer(model=model_dir, args=config(tmp_path), train_dataset=Dataset.from_list(rows))


def test_a_string_score_in_a_file_is_named_by_row_and_column(tmp_path, model_dir, capsys):
    rows = with_row(attribute_rows(), 5, helpful_chosen="high")
    data = tmp_path / "attributes.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["train", "--model_name_or_path", model_dir, "--dataset_name", str(data), "--output_dir",
            str(tmp_path / "out"), "--loss_type", "regression", "--attributes", "helpful", "brief", "--report_to",
            "none", "--max_steps", "1"]
    assert main(argv) == 2
    assert "row 5: column 'helpful_chosen' is 'high' (str), not a number" in capsys.readouterr().err


def test_skip_drops_rows_with_bad_scores_and_counts_them(tmp_path, model_dir):
    rows = with_row(with_row(attribute_rows(), 2, helpful_chosen=None), 7, brief_chosen=float("inf"))
    trainer = BalancedRewardTrainer(model=model_dir, args=config(tmp_path, on_bad_rows="skip", max_steps=1),
                                    train_dataset=Dataset.from_list(rows))
    report = trainer.data_report["train"]
    assert report["dropped"] == {BAD_SCORES: 2} and report["rows"] == 24 and report["pairs"] == 22


@pytest.mark.parametrize("options,message", [
    (dict(attributes=None), r"loss_type='attribute_loss' trains one head output per attribute"),
    (dict(loss_type="bradley_terry"), r"needs an attribute loss, and loss_type='bradley_terry' is not one"),
    (dict(reward_weights=[1.0, 2.0, 3.0]), r"reward_weights must be 2 numbers, one per attribute \(helpful, brief\)"),
    (dict(reward_weights=[0.0, 0.0]), r"reward_weights are all zero"),
    (dict(attributes=["helpful", "helpful"]), r"attributes must be distinct"),
    (dict(loss_kwargs={"tie_loss": "gumbel"}), r"loss_kwargs of loss 'attribute_loss': tie_loss='gumbel'"),
    (dict(loss_kwargs={"ranking_weigth": 1.0}), r"unknown option 'ranking_weigth'.*did you mean 'ranking_weight'"),
    (dict(normalize_rewards=True), r"normalize_rewards is not applied to a multi-attribute model"),
    (dict(attributes=None, loss_type="bradley_terry", export_combined=True, reward_weights=None),
     r"export_combined applies to a multi-attribute model"),
], ids=["no attributes", "pair loss", "weights length", "zero weights", "duplicate", "tie loss", "typo",
        "normalize", "export without attributes"])
def test_attribute_options_are_checked_in_the_config(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, **options)


def test_a_model_object_with_the_wrong_number_of_outputs_is_refused(tmp_path, tokenizer, no_model_load):
    with pytest.raises(ConfigError, match=r"attributes names 2 head outputs \(helpful, brief\), and this model has "
                                          r"num_labels=1"):
        BalancedRewardTrainer(model=tiny_bert(tokenizer), args=config(tmp_path), processing_class=tokenizer,
                              train_dataset=Dataset.from_list(attribute_rows()))


def test_eval_split_column_holds_out_whole_documents():
    rows = [{"doc": f"d{i % 10}", "n": i} for i in range(50)]
    train, evaluation = split_by_column(Dataset.from_list(rows), "doc", 0.2, seed=0)
    assert len(set(evaluation["doc"])) == 2 and len(evaluation) == 10 and len(train) == 40
    assert not set(train["doc"]) & set(evaluation["doc"])
    assert split_by_column(Dataset.from_list(rows), "doc", 0.2, seed=0)[1]["n"] == evaluation["n"]  # seeded
    with pytest.raises(UsageError, match=r"eval_split_column='dok' is not a column.*did you mean 'doc'"):
        split_by_column(Dataset.from_list(rows), "dok", 0.2, seed=0)


# SummEval through the command line --------------------------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists(SUMMEVAL), reason="needs ../shared/data/summeval")
def test_summeval_recipe_trains_evaluates_and_exports_through_the_cli(tmp_path, model_dir):
    """The shipped recipe with the tiny model instead of MiniLM and two steps: four named outputs, per-attribute
    metrics on held-out documents, and a combined export that gives the weighted reward."""
    out = tmp_path / "summeval"
    argv = ["train", "--config", os.path.join(REPO, "recipes", "summeval_attributes.yaml"), "--model_name_or_path",
            model_dir, "--dataset_name", SUMMEVAL, "--output_dir", str(out), "--max_steps", "2", "--max_length", "256",
            "--long_responses", "cut",
            "--per_device_eval_batch_size", "128"]
    assert main(argv) == 0
    metrics = json.load(open(out / "eval_results.json"))
    attributes = ["coherence", "consistency", "fluency", "relevance"]
    for name in attributes:
        assert math.isfinite(metrics[f"eval_pearson_{name}"]) and metrics[f"eval_pairs_{name}"] > 0
    assert 0 <= metrics["eval_accuracy"] <= 1
    total = sum(1 for _ in open(SUMMEVAL))  # 100 documents, ~29 pairs each: a fifth of them held out
    assert 0.1 * total < metrics["eval_pairs"] < 0.3 * total
    saved = json.load(open(out / "config.json"))
    assert [saved["id2label"][str(i)] for i in range(4)] == attributes
    rows = [json.loads(line) for line in open(SUMMEVAL)][:4]
    per_attribute = reward_function(str(out), per_attribute=True)(*texts(rows, "chosen"))
    combined = reward_function(str(out / "combined"))(*texts(rows, "chosen"))
    scale = 1 + max(abs(v) for r in per_attribute for v in r.values())
    np.testing.assert_allclose(combined, [sum(r.values()) / 4 for r in per_attribute], rtol=0, atol=1e-5 * scale)
    card = open(out / "README.md").read()
    assert "| coherence |" in card and "Pearson" in card
