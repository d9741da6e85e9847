"""Cross-prompt negatives: partner choice, the off-prompt sequence, its loss term and both layouts' rewards."""

import math

import pytest
import torch
from datasets import Dataset, IterableDataset

from conftest import build_tokenizer, pair_row, preference_rows
from hf_balanced_reward import BalancedRewardConfig, BalancedRewardTrainer, ConfigError, PairCollator
from hf_balanced_reward.collator import shared_prefix_length
from unpacking import unpack_rows
from hf_balanced_reward.cross_prompt import off_prompt_sequence, pick_partners
from test_shared_prompt import TEXTS, smollm2_shaped


def config(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path / "out"), report_to="none", per_device_train_batch_size=4,
                    learning_rate=1e-2, logging_steps=1, save_strategy="no", seed=0, loss_type="balanced",
                    group_column="source")
    return BalancedRewardConfig(**{**defaults, **kwargs})


# 0 and 1 are the same prompt; 2 is nearest to 0; 3 and 4 are another group's.
PROMPTS = ["How do I boil an egg?", "How do I boil an egg?", "How do I boil an egg quickly?", "Where is Paris?",
           "Who wrote Hamlet?"]
GROUPS = [0, 0, 0, 1, 1]


@pytest.mark.parametrize("nearest", [True, False])
def test_partners_are_another_prompt_of_the_same_group(nearest):
    for seed in range(20):
        partners = pick_partners(PROMPTS, GROUPS, seed, nearest)
        for i, j in enumerate(partners):
            assert PROMPTS[i] != PROMPTS[j]
            assert GROUPS[i] == GROUPS[j]
    # Prompts 0 and 1 (equal) have one other prompt in their group; 3 and 4 each have one.
    assert list(pick_partners(PROMPTS, GROUPS, 0, nearest)[[0, 1, 3, 4]]) == [2, 2, 4, 3]


def test_nearest_partner_is_the_most_similar_prompt():
    prompts = ["boil an egg", "boil an egg quickly", "capital of France", "capital of Spain"]
    assert list(pick_partners(prompts, [0, 0, 0, 0], nearest=True)) == [1, 0, 3, 2]
    random_partners = {tuple(pick_partners(prompts, [0, 0, 0, 0], seed)) for seed in range(10)}
    assert len(random_partners) > 1  # random partners depend on the seed


def test_a_group_with_one_prompt_borrows_another_groups():
    partners = pick_partners(["a b", "a b", "c d", "e f"], [0, 0, 1, 1], nearest=True)
    assert partners[0] in (2, 3) and partners[1] in (2, 3)


def test_pairs_of_one_prompt_are_never_partners_even_when_their_responses_open_alike(tmp_path, model_dir):
    """Two pairs of one prompt whose chosen and rejected responses share their first words: the tokens the pair's
    sequences share run past the prompt, but partners are chosen by the prompt's text."""
    rows = [{"prompt": "Question: how do I boil an egg?", "chosen": " Sure, put it in boiling water.",
             "rejected": " Sure, no.", "source": "a"},
            {"prompt": "Question: how do I boil an egg?", "chosen": " Well, eight minutes.", "rejected": " Well, fry it.",
             "source": "a"},
            {"prompt": "Question: where is Paris?", "chosen": " In France.", "rejected": " In Spain.", "source": "a"},
            {"prompt": "Question: who wrote Hamlet?", "chosen": " Shakespeare.", "rejected": " Dickens.", "source": "a"}]
    args = config(tmp_path, group_column=None, loss_kwargs={"cross_prompt": 1.0})
    trainer = BalancedRewardTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(rows))
    chosen = [e["completion_ids"][0] for e in trainer.train_dataset]
    egg = [c for c in chosen if c[:12] == chosen[0][:12]]
    tokenizer = trainer.processing_class
    for example in trainer.train_dataset:
        off_text = tokenizer.decode(example["off_prompt_ids"])
        own_prompt = tokenizer.decode(example["completion_ids"][0]).split("?")[0]
        assert off_text.split("?")[0] == own_prompt  # the pair's own prompt
        if "egg" in own_prompt:  # never answered with the other egg pair's response
            assert "eight minutes" not in off_text and "boiling water" not in off_text
    assert len(egg) == 2
    with pytest.raises(Exception, match="cross_prompt needs at least two different prompts"):
        BalancedRewardTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(rows[:2]))


def test_off_prompt_sequence_keeps_the_prompt_and_the_scored_token():
    own, partner = [1, 5, 6, 7, 30, 2], [1, 8, 9, 40, 41, 42, 2]
    assert off_prompt_sequence(own, 4, partner, 3, None) == [1, 5, 6, 7, 40, 41, 42, 2]
    assert off_prompt_sequence(own, 4, partner, 3, 6) == [1, 5, 6, 7, 40, 2]  # cut from the right, end kept
    assert off_prompt_sequence(own, 4, partner, 3, 5) == [1, 5, 6, 7, 2]


def test_cross_prompt_loss_on_hand_worked_rewards(tmp_path, model_dir, pairs, monkeypatch):
    args = config(tmp_path, loss_kwargs={"weighting": "none", "length_expert": 0.0, "cross_prompt": 0.5})
    trainer = BalancedRewardTrainer(model=model_dir, args=args, train_dataset=pairs)
    scored = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([0.0, -1.0]), None  # (chosen, rejected), off-prompt
    monkeypatch.setattr(trainer, "score", lambda model, inputs, with_features=False: scored)
    inputs = {"group_id": torch.tensor([0, 1]), "response_lengths": torch.tensor([[3, 3], [3, 3]]),
              "ranks": torch.tensor([[1, 2], [1, 2]]), "list_mask": torch.ones(2, 2, dtype=torch.bool)}
    trainer.model.train()

    def nll(d):
        return math.log1p(math.exp(-d))

    expected = ((nll(1) + 0.5 * nll(1)) + (nll(0) + 0.5 * nll(1))) / 2
    assert trainer.compute_loss(trainer.model, inputs).item() == pytest.approx(expected, rel=1e-6)
    # Logged: one pair of two ordered right (a tie is wrong), both chosen responses above their off-prompt one.
    metrics, _ = trainer.train_totals.take(trainer.group_names)
    assert metrics["accuracy"] == 0.5 and metrics["off_prompt_accuracy"] == 1.0
    trainer.model.eval()  # evaluation scores pairs only: the term is a training term
    assert trainer.compute_loss(trainer.model, inputs).item() == pytest.approx((nll(1) + nll(0)) / 2, rel=1e-6)


def test_training_adds_off_prompt_sequences_and_learns(tmp_path, model_dir):
    pairs = Dataset.from_list([{**r, "chosen": r["chosen"] + f" Answer {i}."} for i, r in enumerate(preference_rows())])
    args = config(tmp_path, loss_kwargs={"cross_prompt": 1.0}, max_steps=3)
    trainer = BalancedRewardTrainer(model=model_dir, args=args, train_dataset=pairs, eval_dataset=pairs)
    train = trainer.train_dataset
    assert "off_prompt_ids" in train.column_names and "off_prompt_ids" not in trainer.eval_dataset.column_names
    for example in train:  # the pair's own prompt, then a response that is not its chosen one
        chosen_ids, rejected_ids = example["completion_ids"]
        prompt = shared_prefix_length(chosen_ids, rejected_ids)
        assert example["off_prompt_ids"][:prompt] == chosen_ids[:prompt]
        assert example["off_prompt_ids"][prompt:] != chosen_ids[prompt:]
    before = {k: v.clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(v, before[k]) for k, v in trainer.model.named_parameters())
    logged = [log for log in trainer.state.log_history if "accuracy" in log]
    assert logged and all(0 <= log["off_prompt_accuracy"] <= 1 for log in logged)
    assert "eval_accuracy" in trainer.evaluate() and "eval_off_prompt_accuracy" not in trainer.state.log_history[-1]


def test_packed_off_prompt_branch_equals_the_plain_rows(tmp_path):
    tokenizer = build_tokenizer(pad_is_eos=True)
    model = smollm2_shaped(tokenizer).eval()
    examples = []
    for (p, c, r), (_, other, _) in zip(TEXTS, TEXTS[1:] + TEXTS[:1]):
        examples.append(pair_row(tokenizer(p + c)["input_ids"], tokenizer(p + r)["input_ids"],
                                 off_prompt_ids=tokenizer(p + other)["input_ids"]))
    trainer = BalancedRewardTrainer(model=model, args=config(tmp_path, group_column=None), processing_class=tokenizer)
    assert trainer.shared_prompt
    packed = trainer.data_collator(examples)
    plain = PairCollator(tokenizer.pad_token_id)(examples)
    assert packed["branch_ids"].max() == 3 and len(packed["off_prompt_end"]) == len(examples)
    assert len(plain["input_ids"]) == 3 * len(examples)
    with torch.no_grad():
        sequences = [[e["completion_ids"][0] for e in examples], [e["completion_ids"][1] for e in examples],
                     [e["off_prompt_ids"] for e in examples]]
        reference = torch.tensor([model(torch.tensor([s])).logits[0, 0].item() for side in sequences for s in side])
        for batch in (packed, plain):
            rewards, off_prompt, _ = trainer.score(model, batch)
            assert (torch.cat([*rewards.unbind(1), off_prompt]) - reference).abs().max() <= 1e-4
    # The fallback and the first-batch check rebuild the three sequences from a packed batch exactly.
    assert unpack_rows(packed) == [{k: e[k] for k in ("completion_ids", "off_prompt_ids")} for e in examples]


def test_cross_prompt_options_are_checked_before_training(tmp_path, model_dir):
    with pytest.raises(ConfigError, match=r"cross_prompt_partners='neerest' is not a choice \(did you mean "
                                          r"'nearest'\?\). Choose one of: nearest, random"):
        config(tmp_path, loss_kwargs={"cross_prompt": 1.0, "cross_prompt_partners": "neerest"})
    with pytest.raises(ConfigError, match="loss_kwargs cross_prompt must be a number >= 0, got -1"):
        config(tmp_path, loss_kwargs={"cross_prompt": -1})
    stream = IterableDataset.from_generator(lambda: iter(preference_rows()))
    with pytest.raises(ConfigError, match="cross_prompt needs a train set of pairs in memory.*streaming: false"):
        BalancedRewardTrainer(model=model_dir, train_dataset=stream,
                              args=config(tmp_path, loss_kwargs={"cross_prompt": 1.0}, max_steps=2))
    one_prompt = Dataset.from_list([{**r, "prompt": "Same?"} for r in preference_rows()])
    with pytest.raises(Exception, match="cross_prompt needs at least two different prompts"):
        BalancedRewardTrainer(model=model_dir, args=config(tmp_path, loss_kwargs={"cross_prompt": 1.0}),
                              train_dataset=one_prompt)
