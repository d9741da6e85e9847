"""Every bad input a user can meet gives one clear message, pinned here; nothing is dropped silently."""

import json
import math
import re

import pytest
from datasets import Dataset

from conftest import tiny_bert
from hf_balanced_reward import BalancedRewardConfig, BalancedRewardTrainer, ConfigError, DataError
from hf_balanced_reward.cli import main
from hf_balanced_reward.data import load_preference_dataset


def good_rows(n=3):
    return [{"prompt": f"Question {i}?", "chosen": " Sure, here is a polite answer.", "rejected": " No.",
             "source": "a", "margin": 1.0, "weight": 1.0} for i in range(n)]


def with_row(**changes):
    """Three good rows, then row 3 with `changes` applied (None deletes nothing: it sets a null)."""
    rows = good_rows()
    rows.append({**rows[0], **changes})
    return rows


def messages(*pairs):
    return [{"role": role, "content": content} for role, content in pairs]


def conversation_rows(bad_chosen):
    ok = messages(("assistant", "Sure."))
    rows = [{"prompt": messages(("user", "hello?")), "chosen": ok, "rejected": messages(("assistant", "No."))}] * 3
    return rows + [{"prompt": messages(("user", "hello?")), "chosen": bad_chosen, "rejected": ok}]


# (id, rows, config options, expected message); rows are loaded with Dataset.from_list.
BAD_DATA = [
    ("chosen-null", with_row(chosen=None), {}, r"row 3: column 'chosen' is null"),
    ("rejected-empty-strict", with_row(rejected=""), {"on_bad_rows": "error"}, r"row 3: column 'rejected' is empty"),
    ("chosen-whitespace-strict", with_row(chosen="  \n"), {"on_bad_rows": "error"}, r"row 3: column 'chosen' is empty"),
    ("implicit-prompt-empty", [{"chosen": "", "rejected": "b"}], {}, r"row 0: column 'chosen' is empty"),
    ("prompt-null", with_row(prompt=None), {}, r"row 3: column 'prompt' is null"),
    ("identical-strict", with_row(chosen=" Same.", rejected=" Same."), {"on_bad_rows": "error"},
     r"row 3: chosen is identical to rejected \(no preference to learn\)"),
    ("margin-nan", with_row(margin=math.nan), {}, r"row 3: column 'margin' is NaN"),
    ("margin-null", with_row(margin=None), {}, r"row 3: column 'margin' is null"),
    ("weight-negative", with_row(weight=-1.0), {}, r"row 3: column 'weight' is negative \(-1.0\)"),
    ("weight-inf", with_row(weight=math.inf), {}, r"row 3: column 'weight' is infinite"),
    ("group-null", with_row(source=None), {"group_column": "source"},
     r"row 3: column 'source' is empty: the pair has no group"),
    ("group-blank", with_row(source=" "), {"group_column": "source"}, r"row 3: column 'source' is empty"),
    ("response-too-long-strict", with_row(chosen=" hello" * 40), {"max_length": 24, "on_bad_rows": "error"},
     r"row 3: a response alone is longer than max_length=24 tokens"),
    ("message-without-content", conversation_rows([{"role": "assistant", "content": None}]), {},
     r"row 3: column 'chosen' message 0 has no text 'content'"),
    ("message-wrong-role", conversation_rows(messages(("assistant", "a"), ("bot", "b"))), {},
     r"row 3: column 'chosen' message 1 has role 'bot'; roles are system, user, assistant, tool"),
    ("empty-message-list", conversation_rows([]), {}, r"row 3: column 'chosen' is an empty message list"),
    ("messages-are-strings", [{"chosen": ["hi"], "rejected": ["yo"]}], {},
     r"row 0: column 'chosen' message 0 is not a \{'role': ..., 'content': ...\} mapping"),
    ("text-mixed-with-messages", [{"prompt": "hi", "chosen": messages(("assistant", "a")),
                                   "rejected": messages(("assistant", "b"))}], {},
     r"row 0: columns prompt, chosen, rejected mix plain text and message lists"),
    ("chosen-is-a-number", [{"chosen": 1, "rejected": 2}], {}, r"row 0: column 'chosen' is int, not text"),
    ("tokenized-empty", [{"chosen_ids": [1, 5], "rejected_ids": []}], {}, r"row 0: column 'rejected_ids' is empty"),
    ("no-rejected-column", [{"chosen": "a", "worse": "b"}], {}, r"train dataset has no 'rejected' column"),
    ("margin-not-numeric", [{"chosen": "a", "rejected": "b", "margin": "big"}], {},
     r"train dataset column 'margin' must be numeric"),
    ("group-column-missing", good_rows(), {"loss_type": "balanced", "group_column": "sorce"},
     r"group_column='sorce' is not a column of the train dataset"),
    ("empty-dataset", [], {}, r"train dataset is empty: it has no rows"),
    ("every-row-bad", [{"chosen": "", "rejected": "b"}], {"on_bad_rows": "skip"},
     r"train dataset has no usable pairs left: all 1 rows were dropped"),
    ("every-row-identical", [{"prompt": "a", "chosen": "b", "rejected": "b"}], {},
     r"train dataset has no usable pairs left: all 1 rows were dropped"),
    ("margin-beyond-float32", with_row(margin=1e39), {},
     r"row 3: column 'margin' is 1e\+39, outside float32's range \(magnitude up to 3.4e38\), so training would see it "
     r"as infinite\. Fix them, or set on_bad_rows: skip"),
    ("weight-beyond-float32", with_row(weight=5e38), {}, r"row 3: column 'weight' is 5e\+38, outside float32's range"),
    ("tokenized-identical-strict", [{"chosen_ids": [1, 5, 6], "rejected_ids": [1, 5, 7]},
                                    {"chosen_ids": [1, 5, 6], "rejected_ids": [1, 5, 6]}], {"on_bad_rows": "error"},
     r"row 1: chosen is identical to rejected \(no preference to learn\)"),
    ("every-weight-0", [{**row, "weight": 0.0} for row in good_rows()], {},
     r"train dataset: column 'weight' is 0 in all 3 pairs kept, so every loss is multiplied by 0 and training would "
     r"not change the model\. Give the rows that should count a weight > 0, or drop the 'weight' column to weigh "
     r"every row 1\.$"),
    ("weight-0-in-every-kept-row", [{**row, "weight": 0.0} for row in good_rows()] + with_row(chosen=None)[3:],
     {"on_bad_rows": "skip"}, r"train dataset: column 'weight' is 0 in all 3 pairs kept"),
    ("hinge-negative-gap", with_row(margin=-2.0), {"loss_type": "hinge"},
     r"train dataset has 1 row\(s\) of 4 whose 'margin' is below -hinge_margin \(-1\) \(row 3: -2\): loss hinge then "
     r"asks for a negative gap hinge_margin \+ margin between chosen and rejected, and a negative required gap "
     r"rewards ranking the rejected response higher\. Fix the margins' sign \(a margin says how far chosen should "
     r"lead\), raise loss_kwargs hinge_margin, or train with loss_type bradley_terry, which allows a negative "
     r"margin\.$"),
    ("hinge-negative-gaps-counted", [{**row, "margin": -3.0 - i} for i, row in enumerate(good_rows(8))],
     {"loss_type": "hinge", "loss_kwargs": {"hinge_margin": 0.5}},
     r"has 8 row\(s\) of 8 whose 'margin' is below -hinge_margin \(-0.5\) \(row 0: -3, row 1: -4, row 2: -5, "
     r"row 3: -6, row 4: -7 and 3 more\)"),
]


@pytest.mark.parametrize("rows,options,message", [c[1:] for c in BAD_DATA], ids=[c[0] for c in BAD_DATA])
def test_bad_data_is_reported_before_the_model_loads(tmp_path, model_dir, no_model_load, rows, options, message):
    data = Dataset.from_list(rows) if rows else Dataset.from_dict({"chosen": [], "rejected": []})
    args = BalancedRewardConfig(output_dir=str(tmp_path), report_to="none", **options)
    with pytest.raises(DataError, match=message):
        BalancedRewardTrainer(model=model_dir, args=args, train_dataset=data)


BAD_CONFIG = [
    ("unknown-loss", {"loss_type": "brodley_terry"},
     r"loss_type='brodley_terry' is not a known loss \(did you mean 'bradley_terry'\?\). Choose one of: "
     r"attribute_bradley_terry, attribute_loss, balanced, bradley_terry, davidson, graded, hinge, pairwise, "
     r"plackett_luce, rao_kupper, regression\."),
    ("loss-kwarg-typo", {"loss_type": "hinge", "loss_kwargs": {"hinge_margn": 1}},
     r"loss_kwargs has unknown option 'hinge_margn' for loss 'hinge' \(did you mean 'hinge_margin'\?\)\. Options of "
     r"'hinge': hinge_margin\."),
    ("hinge-negative-margin", {"loss_type": "hinge", "loss_kwargs": {"hinge_margin": -1}},
     r"hinge_margin must be >= 0, got -1"),
    ("negative-dro-step", {"loss_type": "balanced", "loss_kwargs": {"group_dro": True, "dro_step_size": -1}},
     r"dro_step_size must be a number >= 0, got -1; 0 keeps the unit weights fixed"),
    ("length-expert-text", {"loss_type": "balanced", "loss_kwargs": {"length_expert": "high"}},
     r"length_expert must be a number >= 0, got 'high'"),
    ("group-dro-not-bool", {"loss_type": "balanced", "loss_kwargs": {"group_dro": "yes"}},
     r"group_dro must be true or false, got 'yes'"),
    ("on-bad-rows-typo", {"on_bad_rows": "skp"},
     r"on_bad_rows='skp' is not an option \(did you mean 'skip'\?\); choose one of: auto, skip, error"),
    ("nan-policy-unknown", {"nan_policy": "ignore"}, r"nan_policy='ignore' is not an option; choose one of: stop, skip"),
]


@pytest.mark.parametrize("options,message", [c[1:] for c in BAD_CONFIG], ids=[c[0] for c in BAD_CONFIG])
def test_bad_config_fails_at_once(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        BalancedRewardConfig(output_dir=str(tmp_path), report_to="none", **options)


def test_error_names_the_first_rows_and_counts_all(tmp_path, model_dir, no_model_load):
    rows = good_rows(2) + [{**good_rows(1)[0], "chosen": None} for _ in range(8)]
    args = BalancedRewardConfig(output_dir=str(tmp_path), report_to="none")
    with pytest.raises(DataError) as error:
        BalancedRewardTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(rows))
    message = str(error.value)
    assert message.startswith("train dataset has 8 bad row(s) of 10: row 2: column 'chosen' is null; row 3:")
    assert "row 6: column 'chosen' is null (and 3 more). Fix them, or set on_bad_rows: skip" in message
    assert "row 7" not in message


def test_skip_drops_bad_rows_and_reports_counts_per_reason(tmp_path, model_dir, caplog):
    rows = good_rows(4) + [
        {**good_rows(1)[0], "chosen": None}, {**good_rows(1)[0], "weight": -1.0},
        {**good_rows(1)[0], "margin": math.nan}, {**good_rows(1)[0], "rejected": None},
    ]
    args = BalancedRewardConfig(output_dir=str(tmp_path / "out"), report_to="none", on_bad_rows="skip", max_steps=1,
                                per_device_train_batch_size=2, save_strategy="no")
    trainer = BalancedRewardTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(rows))
    assert len(trainer.train_dataset) == 4
    expected = {"column 'chosen' is null": 1, "column 'weight' is negative (-1.0)": 1, "column 'margin' is NaN": 1,
                "column 'rejected' is null": 1}
    assert trainer.data_report["train"] == {"rows": 8, "pairs": 4, "truncated": 0, "empty_responses": 0,
                                            "dropped": expected}
    assert ("train: 4 of 8 pairs used; dropped 1 x column 'chosen' is null, 1 x column 'weight' is negative (-1.0), "
            "1 x column 'margin' is NaN, 1 x column 'rejected' is null (on_bad_rows=skip).") in caplog.text
    trainer.train()
    with open(tmp_path / "out" / "data_report.json") as f:
        assert json.load(f)["train"]["dropped"] == expected


def test_by_default_pairs_without_signal_are_dropped_and_empty_responses_kept(tmp_path, model_dir, caplog):
    rows = good_rows(4) + [
        {**good_rows(1)[0], "chosen": " hello" * 80},  # too long for max_length
        {**good_rows(1)[0], "chosen": " Same.", "rejected": " Same."},
        {**good_rows(1)[0], "rejected": ""},  # an empty answer: a real (rejected) response
    ]
    args = BalancedRewardConfig(output_dir=str(tmp_path / "out"), report_to="none", max_length=48, max_steps=1,
                                per_device_train_batch_size=2, save_strategy="no")
    assert args.on_bad_rows == "auto"
    trainer = BalancedRewardTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(rows))
    dropped = {"a response alone is longer than max_length=48 tokens": 1,
               "chosen is identical to rejected (no preference to learn)": 1}
    assert trainer.data_report["train"] == {"rows": 7, "pairs": 5, "truncated": 0, "empty_responses": 1,
                                            "dropped": dropped}
    assert ("train: 5 of 7 pairs used; dropped 1 x a response alone is longer than max_length=48 tokens, 1 x chosen "
            "is identical to rejected (no preference to learn); kept 1 with an empty response (on_bad_rows=auto).") \
        in caplog.text
    # a row that cannot be read still stops the run, before the model loads
    with pytest.raises(DataError, match=r"row 7: column 'chosen' is null"):
        BalancedRewardTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(rows + with_row(chosen=None)[3:]))


def uncased_tokenizer():
    """The tests' tokenizer, lowercasing every text first (as an uncased BERT's does)."""
    from tokenizers import normalizers

    from conftest import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()
    return tokenizer


def test_pairs_the_tokenizer_makes_identical_are_dropped_and_counted(tmp_path, model_dir, caplog):
    rows = with_row(chosen=" Sure, Hello there.", rejected=" sure, hello THERE.")  # differ only in case
    args = BalancedRewardConfig(output_dir=str(tmp_path), report_to="none")
    trainer = BalancedRewardTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(rows),
                                    processing_class=uncased_tokenizer())
    reason = "chosen and rejected are identical after tokenisation (no preference to learn)"
    assert trainer.data_report["train"] == {"rows": 4, "pairs": 3, "truncated": 0, "empty_responses": 0,
                                            "dropped": {reason: 1}}
    assert f"train: 3 of 4 pairs used; dropped 1 x {reason} (on_bad_rows=auto)." in caplog.text
    args = BalancedRewardConfig(output_dir=str(tmp_path), report_to="none", on_bad_rows="error")
    with pytest.raises(DataError, match=r"train dataset has 1 bad row\(s\) of 4: row 3: chosen and rejected are "
                                        r"identical after tokenisation \(no preference to learn\)\. Fix them"):
        BalancedRewardTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(rows),
                              processing_class=uncased_tokenizer())


@pytest.mark.parametrize("loss_type,loss_kwargs,margin", [
    ("bradley_terry", {}, -2.0),  # a weaker preference: the loss is met before chosen leads
    ("hinge", {}, -0.5),  # required gap hinge_margin + margin = 0.5: chosen must still lead
    ("hinge", {"hinge_margin": 3.0}, -2.0),
])
def test_negative_margins_that_ask_no_reversed_ranking_are_allowed(tmp_path, model_dir, loss_type, loss_kwargs,
                                                                    margin):
    args = BalancedRewardConfig(output_dir=str(tmp_path), report_to="none", loss_type=loss_type,
                                loss_kwargs=loss_kwargs)
    data = Dataset.from_list(with_row(margin=margin))
    trainer = BalancedRewardTrainer(model=model_dir, args=args, train_dataset=data)
    assert trainer.train_dataset["margin"] == [1.0, 1.0, 1.0, margin]


BAD_FILES = [
    ("missing-file", None, "./nowhere/pairs.jsonl", r"dataset './nowhere/pairs.jsonl' does not exist"),
    ("wrong-extension", "pairs.txt", None, r"has extension '.txt'; use one of .jsonl, .json, .parquet, .csv"),
    ("broken-jsonl", "pairs.jsonl", None,
     r"could not read dataset file '.*pairs.jsonl' as jsonl: JSON parse error.* in row 1"),
]


@pytest.mark.parametrize("filename,path,message", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_bad_dataset_files(tmp_path, filename, path, message):
    if filename:
        path = tmp_path / filename
        broken = '{"chosen": "a", "rejected": "b"}\n{"chosen": "a", "rej\n'
        path.write_text("\n" if filename.startswith("empty") else broken)
    with pytest.raises(DataError, match=message):
        load_preference_dataset(str(path))


def write(path, text):
    path.write_text(text)
    return str(path)


def conversations(tmp_path):
    row = {"prompt": messages(("user", "hi")), "chosen": messages(("assistant", "yes")),
           "rejected": messages(("assistant", "no"))}
    return write(tmp_path / "chat.jsonl", (json.dumps(row) + "\n") * 4)


def model_without(tmp_path, model_dir, what):
    """A copy of the tiny model folder without a chat template, without weights, or with corrupt weights."""
    import shutil

    path = tmp_path / f"model-{what}"
    shutil.copytree(model_dir, path)
    if what == "template":
        config = json.loads((path / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (path / "tokenizer_config.json").write_text(json.dumps(config))
        for extra in path.glob("chat_template.*"):
            extra.unlink()
    elif what == "weights":
        (path / "model.safetensors").unlink()
    else:
        (path / "model.safetensors").write_bytes(b"not a safetensors file" * 10)
    return str(path)


def checkpoint_of_another_model(tmp_path, pairs_file, tokenizer):
    """A run of the tiny Llama leaves a checkpoint in run/; the mistake is resuming it with a BERT model."""
    from conftest import tiny_llama

    llama, bert = tmp_path / "llama", tmp_path / "bert"
    for model, path in ((tiny_llama(tokenizer), llama), (tiny_bert(tokenizer), bert)):
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    assert main(["train", "--model_name_or_path", str(llama), "--dataset_name", pairs_file, "--output_dir",
                 str(tmp_path / "run"), "--max_steps", "1", "--save_steps", "1", "--report_to", "none"]) == 0
    return str(bert)


# The mistakes users make, each with its one-line message: (id, setup(tmp_path, model_dir, pairs_file, tokenizer)
# -> (recipe lines, model, dataset), flags, message). Every one exits with status 2 and writes nothing but the line.
USER_MISTAKES = [
    ("yaml-unknown-key", lambda t, m, d, k: ("loss_typ: hinge", m, d), [],
     r"config '.*recipe.yaml' has unknown key 'loss_typ' \(did you mean 'loss_type'\?\)"),
    ("yaml-syntax", lambda t, m, d, k: ("loss_type: [hinge", m, d), [],
     r"config '.*' is not valid YAML: expected ',' or '\]', but got '<stream end>' at line 6, column 1\.$"),
    ("yaml-wrong-type", lambda t, m, d, k: ("learning_rate: fast", m, d), [],
     r"config .TMP/recipe.yaml.: learning_rate must be a number, got 'fast'\.$"),
    ("yaml-list-for-a-number", lambda t, m, d, k: ("num_train_epochs: [1, 2]", m, d), [],
     r"config '.*recipe.yaml': num_train_epochs must be a number, got \[1, 2\]\.$"),
    ("flag-wrong-type", lambda t, m, d, k: ("", m, d), ["--max_steps", "ten"],
     r"argument --max_steps/--max-steps: invalid int value: 'ten'$"),
    ("unknown-flag", lambda t, m, d, k: ("", m, d), ["--los_type", "hinge"],
     r"unknown option '--los_type' \(did you mean 'loss_type'\?\)"),
    ("missing-model", lambda t, m, d, k: ("", "./no/such/model", d), [],
     r"model './no/such/model' does not exist: no such folder"),
    ("model-without-weights", lambda t, m, d, k: ("", model_without(t, m, "weights"), d), [],
     r"model folder '.*model-weights' has no weights file \(model.safetensors or pytorch_model.bin\); save the "
     r"model with save_pretrained, or download it again\.$"),
    ("corrupt-weights", lambda t, m, d, k: ("", model_without(t, m, "corrupt"), d), [],
     r"the weights of model '.*model-corrupt' cannot be read \(.*\): the file is corrupt or was cut short"),
    ("empty-data-file", lambda t, m, d, k: ("", m, write(t / "empty.jsonl", "\n")), [],
     r"dataset file '.*empty.jsonl' is empty: it has no rows\.$"),
    ("folder-without-data", lambda t, m, d, k: ("", m, str((t / "nothing").mkdir() or t / "nothing")), [],
     r"could not load dataset '.*nothing' \(split 'train'\): The directory at .*nothing doesn't contain any data"),
    ("content-not-its-extension", lambda t, m, d, k: ("", m, write(t / "pairs.parquet", "{}\n")), [],
     r"could not read dataset file '.*pairs.parquet' as parquet: .*\. Check that its content is the format its "
     r"extension says\.$"),
    ("csv-in-a-jsonl-file", lambda t, m, d, k: ("", m, write(t / "pairs.jsonl", "chosen,rejected\na,b\n")), [],
     r"could not read dataset file '.*pairs.jsonl' as jsonl: JSON parse error"),
    ("conversations-without-chat-template", lambda t, m, d, k: ("", model_without(t, m, "template"),
                                                                conversations(t)), [],
     r"train dataset holds conversations \(message lists\) but the tokenizer has no chat template"),
    ("eval-split-ratio-above-1", lambda t, m, d, k: ("eval_split_ratio: 1.5", m, d), [],
     r"eval_split_ratio must be between 0 and 1 \(the share of pairs held out for evaluation\), got 1.5\.$"),
    ("eval-split-ratio-0", lambda t, m, d, k: ("eval_split_ratio: 0", m, d), [],
     r"eval_split_ratio must be between 0 and 1 .*got 0.0\.$"),
    ("bf16-and-fp16", lambda t, m, d, k: ("bf16: true\nfp16: true", m, d), [],
     r"bf16 and fp16 are both set; choose one"),
    ("output-dir-is-a-file", lambda t, m, d, k: ("", m, d), ["--output_dir", __file__],
     r"output_dir '.*test_bad_inputs.py' is a file; give the path of a folder to write to\.$"),
    ("group-column-with-one-group", lambda t, m, d, k: ("loss_type: balanced\ngroup_column: prompt", m,
                                                        write(t / "one.jsonl", json.dumps({"prompt": "p", "chosen": "a",
                                                              "rejected": "b"}) + "\n")), [],
     r"group_column='prompt' has one value \('p'\) in the train dataset, so the balanced loss has no groups to "
     r"balance"),
    ("resume-another-models-checkpoint", lambda t, m, d, k: ("resume_from_checkpoint: 'true'",
                                                             checkpoint_of_another_model(t, d, k), d), [],
     r"checkpoint '.*checkpoint-1' holds a different model \(\{'model_type': 'llama'.*\) from the one this run trains "
     r"\(\{'model_type': 'bert'"),
]


@pytest.mark.parametrize("setup,flags,message", [c[1:] for c in USER_MISTAKES], ids=[c[0] for c in USER_MISTAKES])
def test_cli_user_errors_are_one_line_with_status_2(tmp_path, capsys, pairs_file, model_dir, tokenizer, setup, flags,
                                                    message):
    recipe, model, dataset = setup(tmp_path, model_dir, pairs_file, tokenizer)
    capsys.readouterr()  # only what the failing command writes
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model_name_or_path: {model}\ndataset_name: {dataset}\noutput_dir: {tmp_path / 'run'}\n"
                    f"report_to: none\n{recipe}\n")
    assert main(["train", "--config", str(path), *flags]) == 2
    err = capsys.readouterr().err
    # the temporary folder's name holds the test's name, which says "errors"
    errors = [line for line in err.replace(str(tmp_path), "TMP").splitlines() if "error" in line.lower()]
    assert "Traceback" not in err and len(errors) == 1, err
    assert errors[0].startswith("hf-balanced-reward: error: ")
    assert re.search(message, errors[0]), err


def test_an_internal_error_keeps_its_traceback(tmp_path, monkeypatch, pairs_file, model_dir):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr("hf_balanced_reward.cli.load_datasets", broken)
    with pytest.raises(RuntimeError, match="a bug, not a user error"):  # not turned into a one-line exit 2
        main(["train", "--model_name_or_path", model_dir, "--dataset_name", pairs_file, "--output_dir", str(tmp_path)])


# --- faults that used to end in a traceback ----------------------------------------------------------------------


def test_command_faults_are_one_message(tmp_path, model_dir, pairs_file, capsys):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "Q?", "response": " A."}) + "\n")
    assert main(["score", "--model", model_dir, "--dataset", str(rows), "--output", str(folder)]) == 2
    assert f"--output '{folder}' is a folder; give the path of a file to write" in capsys.readouterr().err
    assert main(["evaluate", "--model", model_dir, "--dataset", pairs_file, "--batch_size", "0"]) == 2
    assert "--batch_size must be at least 1 (pairs scored per batch), got 0" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval_results.json").write_text('{"eval_accuracy": 0.7, "eval_')
    assert main(["compare", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"'{run / 'eval_results.json'}' is not valid JSON" in err and "Traceback" not in err


@pytest.mark.parametrize("save_strategy,advice", [
    ("no", "no checkpoint had been saved. Free some space, then run the same command again."),
    ("steps", "every complete checkpoint is intact. Free some space, then run the same command with "
        "--resume_from_checkpoint true."),
])
def test_a_disk_that_fills_up_mid_run_gives_one_message(tmp_path, model_dir, pairs_file, monkeypatch, capsys,
                                                        save_strategy, advice):
    """The advice follows what is on disk: resume only when a complete checkpoint was saved (with save_strategy
    steps, Trainer saves checkpoint-1 at the last step, before the final save fails)."""
    import errno

    save_model = BalancedRewardTrainer.save_model

    def full(self, output_dir=None, *args, **kwargs):
        if output_dir and "checkpoint-" in str(output_dir):
            return save_model(self, output_dir, *args, **kwargs)  # checkpoints fit; the final model does not
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "model.safetensors"))

    monkeypatch.setattr(BalancedRewardTrainer, "save_model", full)
    status = main(["train", "--model_name_or_path", model_dir, "--dataset_name", pairs_file, "--max_steps", "1",
                   "--output_dir", str(tmp_path / "run"), "--report_to", "none", "--save_strategy", save_strategy])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert "the disk is full (No space left on device: " in err and advice in err
