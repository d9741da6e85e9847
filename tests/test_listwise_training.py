"""Lists, ties and graded scores through the data pipeline, the trainer, `evaluate` and the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from datasets import Dataset

from conftest import REPO, preference_rows, tiny_bert
from hf_balanced_reward import BalancedRewardConfig, BalancedRewardTrainer, ConfigError, DataError, prepare_dataset
from hf_balanced_reward.checkpoint_hooks import load_reward_state
from hf_balanced_reward.preparation import truncate_list


def list_rows(n: int = 12) -> list[dict]:
    """K = 2 to 4 completions per prompt, ranked (with ties) or scored; the polite answers are the better ones."""
    answers = [" Sure, here is a short and polite email.", " Hello, here is the email.", " No.", " No. world"]
    rows = []
    for i in range(n):
        k = 2 + i % 3
        row = {"prompt": f"Question {i}: please help me write an email?", "completions": answers[:k],
               "source": "big" if i % 4 else "small", "ranks": None, "scores": None}
        if i % 2:
            row["scores"] = [4.0, 3.5, 1.0, 1.0][:k]
        else:
            row["ranks"] = [1, 1, 2, 3][:k]  # the two polite answers tie
        rows.append(row)
    return rows


def config(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path / "out"), report_to="none", per_device_train_batch_size=4,
                    per_device_eval_batch_size=3, learning_rate=1e-2, logging_steps=1, save_strategy="no", seed=0,
                    group_column="source", max_length=64)
    return BalancedRewardConfig(**{**defaults, **kwargs})


def test_a_pair_is_tokenised_as_the_list_of_its_two_responses(tokenizer, tmp_path):
    conversation = {"prompt": [{"role": "user", "content": "Hello world"}],
                    "chosen": [{"role": "assistant", "content": "Paris is the capital."}],
                    "rejected": [{"role": "assistant", "content": "No."}]}
    for rows in ([{k: v for k, v in r.items() if k != "margin"} for r in preference_rows(4)], [conversation] * 2):
        args = config(tmp_path, group_column=None)
        pairs, _ = prepare_dataset(Dataset.from_list(rows), tokenizer, args)  # rendered as a pair, chosen first
        as_lists = [{"prompt": r["prompt"], "completions": [r["chosen"], r["rejected"]], "ranks": [1, 2]} for r in rows]
        lists, report = prepare_dataset(Dataset.from_list(as_lists), tokenizer, args)  # each completion on its own
        assert lists["completion_ids"] == pairs["completion_ids"]
        assert lists["ranks"] == pairs["ranks"] == [[1, 2]] * len(rows)
        assert lists["response_lengths"] == pairs["response_lengths"]
        assert report["lists"] == len(rows) and report["completions"] == 2 * len(rows)


def test_lists_keep_labels_and_ties(tokenizer, tmp_path):
    rows = list_rows(3) + [{"prompt": "Q", "completions": [" a", " b"], "ranks": None, "scores": None, "tie": True,
                            "source": "big"}]
    rows[0]["tie"] = rows[1]["tie"] = rows[2]["tie"] = None
    lists, report = prepare_dataset(Dataset.from_list(rows), tokenizer, config(tmp_path), lists=True)
    assert lists["ranks"] == [[1, 1], [1, 2, 3], [1, 1, 2, 3], [1, 1]]
    assert lists["scores"] == [None, [4.0, 3.5, 1.0], None, None]
    assert [len(c) for c in lists["completion_ids"]] == [2, 3, 4, 2]
    assert report == {"rows": 4, "lists": 4, "truncated": 0, "empty_responses": 0, "dropped": {}, "completions": 11}


def test_truncate_list_cuts_the_shared_prompt_from_the_left_and_keeps_bos():
    bos = 1
    sequences = [[bos, 5, 6, 7, 8, 20], [bos, 5, 6, 7, 8, 21, 22], [bos, 5, 6, 7, 8, 23]]
    assert truncate_list(sequences, 7, {bos}) == (sequences, "kept")
    assert truncate_list(sequences, 5, {bos}) == ([[bos, 7, 8, 20], [bos, 7, 8, 21, 22], [bos, 7, 8, 23]], "truncated")
    assert truncate_list(sequences, 3, {bos}) == ([[bos, 20], [bos, 21, 22], [bos, 23]], "truncated")
    assert truncate_list(sequences, 2, {bos})[1] == "dropped"  # the longest response and BOS need 3


def test_bad_list_rows_are_named_or_skipped_and_counted(tokenizer, tmp_path):
    rows = list_rows(4)
    rows[1]["scores"] = [1.0]  # one score for two completions
    rows[2]["completions"] = [" same", " same", " same", " same"][:4]
    rows[2]["ranks"] = [1, 2, 3, 4]
    with pytest.raises(DataError, match=r"row 1: column 'scores' has 1 entries for 3 completions"):
        prepare_dataset(Dataset.from_list(rows), tokenizer, config(tmp_path), lists=True)
    lists, report = prepare_dataset(Dataset.from_list(rows), tokenizer, config(tmp_path, on_bad_rows="skip"), lists=True)
    assert len(lists) == 2 and report["lists"] == 2 and sum(report["dropped"].values()) == 2


def test_a_margin_column_is_refused_on_the_list_path(tokenizer, tmp_path):
    rows = [{**r, "tie": False} for r in preference_rows(4)]
    with pytest.raises(DataError, match="has a 'margin' column, which the list losses do not read"):
        prepare_dataset(Dataset.from_list(rows), tokenizer, config(tmp_path), lists=True)


LIST_SETTINGS = [("plackett_luce", {}), ("graded", {"margin_scale": 0.5}), ("davidson", {"learn_tie": True}),
                 ("rao_kupper", {"log_tie": -1.0}), ("pairwise", {"pair_loss": "hinge"}), ("bradley_terry", {})]


@pytest.mark.parametrize("loss_type,loss_kwargs", LIST_SETTINGS, ids=[s[0] for s in LIST_SETTINGS])
def test_every_list_loss_trains_logs_and_evaluates(tmp_path, model_dir, loss_type, loss_kwargs):
    rows = list_rows(12)
    if loss_type == "graded":  # graded margins need every list's scores
        rows = [{**r, "ranks": None, "scores": [4.0, 3.5, 1.0, 1.0][: len(r["completions"])]} for r in rows]
    data = Dataset.from_list(rows)
    trainer = BalancedRewardTrainer(model=model_dir, args=config(tmp_path, loss_type=loss_type, loss_kwargs=loss_kwargs,
                                                                 max_steps=3), train_dataset=data, eval_dataset=data)
    batch = next(iter(trainer.get_train_dataloader()))
    assert {"ranks", "list_mask", "completion_ends", "group_id", "segment_ids"} <= set(batch)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)]
    assert "score.weight" in changed and any("layers" in n for n in changed)
    logged = trainer.state.log_history[0]
    assert np.isfinite(logged["loss"]) and np.isfinite(logged["accuracy"])
    if loss_kwargs.get("learn_tie"):
        assert logged["tie_parameter"] != pytest.approx(1.0, abs=1e-6)  # exp(log_tie) moved from its start, 1
    metrics = trainer.evaluate()
    for key in ("eval_loss", "eval_pairwise_accuracy", "eval_accuracy", "eval_kendall_tau", "eval_spearman_rho",
                "eval_top1_accuracy", "eval_tie_accuracy", "eval_accuracy_big", "eval_accuracy_small"):
        assert np.isfinite(metrics[key]), key
    assert metrics["eval_lists"] == 12


def test_evaluation_metrics_are_the_ranking_metrics_of_the_rewards(tmp_path, model_dir):
    data = Dataset.from_list(list_rows(9))
    trainer = BalancedRewardTrainer(model=model_dir, args=config(tmp_path, loss_type="plackett_luce"),
                                    eval_dataset=data)
    metrics = trainer.evaluate()
    model = trainer.model.eval()
    lists = trainer.eval_dataset
    pairs = correct = 0
    for completions, ranks in zip(lists["completion_ids"], lists["ranks"]):
        with torch.no_grad():
            rewards = [model(torch.tensor([ids])).logits[0, 0].item() for ids in completions]
        for i in range(len(ranks)):
            for j in range(len(ranks)):
                if ranks[i] < ranks[j]:
                    pairs += 1
                    correct += rewards[i] > rewards[j]
    assert metrics["eval_pairs"] == pairs
    assert metrics["eval_pairwise_accuracy"] == pytest.approx(correct / pairs)


def test_a_two_completion_list_loss_is_the_pair_loss(tmp_path, model_dir):
    """Pairs trained as K = 2 lists (a `tie` column of False) take the same first step as the pair path."""
    rows = [{k: v for k, v in r.items() if k != "margin"} for r in preference_rows(8)]
    losses = {}
    for name, data in (("pairs", rows), ("lists", [{**r, "tie": False} for r in rows])):
        args = config(tmp_path / name, loss_type="bradley_terry", max_steps=1, learning_rate=0.0)
        trainer = BalancedRewardTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(data))
        assert trainer.trains_lists == (name == "lists")
        trainer.train()
        losses[name] = trainer.state.log_history[0]["loss"]
    assert losses["lists"] == pytest.approx(losses["pairs"], abs=1e-5)


def test_tied_pairs_with_a_loss_that_ignores_them_are_pointed_out(tmp_path, model_dir, caplog):
    rows = [{k: v for k, v in r.items() if k != "margin"} | {"tie": i % 3 == 0} for i, r in enumerate(preference_rows(9))]
    BalancedRewardTrainer(model=model_dir, args=config(tmp_path, max_steps=1), train_dataset=Dataset.from_list(rows))
    assert "3 train lists have tied completions, and loss 'bradley_terry' leaves tied pairs out" in caplog.text


def test_learnt_log_tie_is_checkpointed_resumed_and_not_saved_with_the_model(tmp_path, model_dir):
    data = Dataset.from_list(list_rows(12))
    args = config(tmp_path, loss_type="davidson", loss_kwargs={"learn_tie": True, "log_tie": 0.25}, max_steps=2,
                  save_strategy="steps", save_steps=1)
    trainer = BalancedRewardTrainer(model=model_dir, args=args, train_dataset=data)
    trainer.train()
    with open(os.path.join(args.output_dir, "checkpoint-1", "reward_state.json")) as f:
        saved = json.load(f)["log_tie"]
    assert saved != pytest.approx(0.25, abs=1e-7)
    resumed = BalancedRewardTrainer(model=model_dir, args=args, train_dataset=data)
    load_reward_state(resumed, os.path.join(args.output_dir, "checkpoint-1"))
    assert resumed.log_tie.item() == pytest.approx(saved)
    trainer.save_model(str(tmp_path / "final"))
    with open(tmp_path / "final" / "config.json") as f:
        assert "log_tie" not in f.read()


def test_what_lists_cannot_do_is_named_before_loading(tmp_path, model_dir):
    data = Dataset.from_list(list_rows(4))
    with pytest.raises(ConfigError, match="loss_type='balanced' weighs pairs by their group and length direction"):
        BalancedRewardTrainer(model=model_dir, args=config(tmp_path, loss_type="balanced"), train_dataset=data)
    with pytest.raises(ConfigError, match="ties='first' is not a tie method of plackett_luce"):
        config(tmp_path, loss_type="plackett_luce", loss_kwargs={"ties": "first"})


def test_an_encoder_trains_lists_in_the_plain_layout(tmp_path, tokenizer):
    model = tiny_bert(tokenizer)
    data = Dataset.from_list(list_rows(8))
    trainer = BalancedRewardTrainer(model=model, args=config(tmp_path, loss_type="plackett_luce", max_steps=2),
                                    train_dataset=data, eval_dataset=data, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "segment_ids" not in batch and batch["input_ids"].shape[0] == int(batch["list_mask"].sum())
    trainer.train()
    assert np.isfinite(trainer.evaluate()["eval_kendall_tau"])


def test_cli_trains_and_evaluates_a_listwise_file(tmp_path, model_dir):
    data = tmp_path / "lists.jsonl"
    rows = [{k: v for k, v in r.items() if v is not None} for r in list_rows(11)]
    rows.append({"prompt": "Say hi.", "chosen": " Hi!", "rejected": " Hello!", "tie": True, "source": "small"})
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))  # lists with ranks, scores, ties, and a tied pair
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "run"
    train = subprocess.run(
        [sys.executable, "-m", "hf_balanced_reward", "train", "--model_name_or_path", model_dir, "--dataset_name",
         str(data), "--loss_type", "plackett_luce", "--max_steps", "2", "--output_dir", str(out), "--report_to",
         "none", "--per_device_train_batch_size", "4", "--eval_split_ratio", "0.25", "--group_column", "source"],
        capture_output=True, text=True, env=env, cwd=REPO)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "pairwise_accuracy" in train.stdout + train.stderr
    evaluate = subprocess.run(
        [sys.executable, "-m", "hf_balanced_reward", "evaluate", "--model", str(out), "--dataset", str(data),
         "--output_dir", str(tmp_path / "eval")], capture_output=True, text=True, env=env, cwd=REPO)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert "12 lists, " in evaluate.stdout and "Kendall tau" in evaluate.stdout
    with open(tmp_path / "eval" / "eval_report.json") as f:
        report = json.load(f)
    assert report["lists"] == 12 and 0 <= report["pairwise_accuracy"] <= 1


def test_a_model_that_breaks_the_k_branch_layout_falls_back_to_plain_rows(tmp_path, tokenizer, monkeypatch, caplog):
    import hf_balanced_reward.forward as forward_module
    from conftest import tiny_llama

    def causal_only(segment_ids, branch_ids):  # as if the model ignored the layout's mask: plain causal attention
        width = segment_ids.shape[1]
        return torch.ones(width, width, dtype=torch.bool).tril().expand(len(segment_ids), 1, width, width)

    monkeypatch.setattr(forward_module, "shared_prompt_mask", causal_only)
    data = Dataset.from_list(list_rows(8))
    trainer = BalancedRewardTrainer(model=tiny_llama(tokenizer), args=config(tmp_path, loss_type="plackett_luce",
                                                                             max_steps=2),
                                    train_dataset=data, processing_class=tokenizer)
    with caplog.at_level("WARNING"):
        trainer.train()
    assert "shared-prompt layout changes this model's rewards" in caplog.text and not trainer.shared_prompt
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert "segment_ids" not in batch and "completion_ends" in batch  # decided once: plain rows from then on


def test_the_model_card_of_a_list_model_shows_lists_and_ranking_metrics(tmp_path, model_dir):
    data = Dataset.from_list(list_rows(8))
    trainer = BalancedRewardTrainer(model=model_dir, args=config(tmp_path, loss_type="plackett_luce", max_steps=1),
                                    train_dataset=data, eval_dataset=data)
    trainer.train()
    trainer.evaluate()
    trainer.save_model(str(tmp_path / "final"))
    card = (tmp_path / "final" / "README.md").read_text()
    assert "| training lists | 8 |" in card and "| loss | plackett_luce |" in card
    assert "| Kendall tau per list (mean) |" in card and "| lists | 8 |" in card


def test_streamed_lists_train_and_evaluate_as_lists_in_memory(tmp_path, model_dir):
    rows = list_rows(12)
    rows[6]["completions"] = [" same", " same"]  # tied and identical: nothing to learn, dropped and counted
    data = Dataset.from_list(rows)
    args = config(tmp_path, loss_type="plackett_luce", max_steps=3, learning_rate=0.0)
    streamed = BalancedRewardTrainer(model=model_dir, args=args, train_dataset=data.to_iterable_dataset(),
                                     eval_dataset=data.to_iterable_dataset())
    in_memory = BalancedRewardTrainer(model=model_dir, args=args, train_dataset=data, eval_dataset=data)
    batch = next(iter(streamed.get_train_dataloader()))
    assert {"ranks", "list_mask", "completion_ends", "segment_ids"} <= set(batch)
    streamed.train()
    metrics, expected = streamed.evaluate(), in_memory.evaluate()
    for key in ("eval_lists", "eval_pairs", "eval_pairwise_accuracy", "eval_kendall_tau", "eval_loss"):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-5), key
    assert streamed.data_report["eval"]["lists"] == 11 and streamed.data_report["eval"]["dropped"] == {
        "all completions are identical (no preference to learn)": 1}


def test_a_users_compute_metrics_gets_the_rewards_ranks_and_mask_of_lists(tmp_path, model_dir):
    seen = {}

    def compute_metrics(prediction):
        ranks, mask = prediction.label_ids
        seen.update(shape=prediction.predictions.shape, ranks=ranks.shape, completions=int(mask.sum()))
        return {"best_reward_mean": float(prediction.predictions.max(axis=1).mean())}

    data = Dataset.from_list(list_rows(6))  # K = 2, 3, 4, 2, 3, 4: 18 completions
    trainer = BalancedRewardTrainer(model=model_dir, args=config(tmp_path, loss_type="plackett_luce"),
                                    eval_dataset=data, compute_metrics=compute_metrics)
    metrics = trainer.evaluate()
    assert seen == {"shape": (6, 4), "ranks": (6, 4), "completions": 18}
    assert np.isfinite(metrics["eval_best_reward_mean"]) and "eval_kendall_tau" in metrics


def test_graded_names_the_set_whose_lists_lack_scores_before_training(tmp_path, model_dir):
    scored = [{**r, "ranks": None, "scores": [4.0, 3.5, 1.0, 1.0][: len(r["completions"])]} for r in list_rows(6)]
    ranked = list_rows(4)  # rows 0 and 2 have ranks only
    args = config(tmp_path, loss_type="graded", max_steps=1)
    with pytest.raises(DataError, match=r"loss 'graded' reads every list's scores, and 2 of 4 eval lists have none"):
        BalancedRewardTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(scored),
                              eval_dataset=Dataset.from_list(ranked))
    BalancedRewardTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(scored))  # every list scored
