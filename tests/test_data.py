import pytest
from datasets import Dataset

from hf_balanced_reward import BalancedRewardConfig, load_preference_dataset, prepare_dataset
from hf_balanced_reward.balancing import LONGER, length_cells
from hf_balanced_reward.preparation import truncate_list


def config(**kwargs):
    return BalancedRewardConfig(output_dir="/tmp/unused", report_to="none", **kwargs)


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_bos_and_ends():
    bos = 1
    chosen = [bos, 10, 11, 12, 13, 20, 21]
    rejected = [bos, 10, 11, 12, 13, 30]
    (new_chosen, new_rejected), status = truncate_list([chosen, rejected], max_length=5, special_ids={bos})
    assert status == "truncated"
    assert new_chosen == [bos, 12, 13, 20, 21]  # two prompt tokens cut from the left, BOS and response kept
    assert new_rejected == [bos, 12, 13, 30]


def test_pair_whose_response_alone_is_too_long_is_dropped():
    _, status = truncate_list([[1, 10, 20, 21, 22, 23], [1, 10, 30]], max_length=4, special_ids={1})
    assert status == "dropped"
    assert truncate_list([[1, 2], [1, 3]], max_length=4, special_ids={1})[1] == "kept"


def test_length_cells_on_arrays_and_tensors():
    import torch

    assert length_cells([20, 10, 20], [10, 20, 19]).tolist() == [0, 1, 2]  # longer, shorter, same within 10%
    assert length_cells(torch.tensor([20, 10, 20]), torch.tensor([10, 20, 19])).tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "Question: hello?", "chosen": " Sure, here.", "rejected": " No."},  # explicit prompt
        {"chosen": "Question: hello? Sure, here.", "rejected": "Question: hello? No."},  # implicit prompt
        {  # conversational, explicit prompt
            "prompt": [{"role": "user", "content": "hello?"}],
            "chosen": [{"role": "assistant", "content": "Sure, here."}],
            "rejected": [{"role": "assistant", "content": "No."}],
        },
        {  # conversational, implicit prompt
            "chosen": [{"role": "user", "content": "hello?"}, {"role": "assistant", "content": "Sure, here."}],
            "rejected": [{"role": "user", "content": "hello?"}, {"role": "assistant", "content": "No."}],
        },
    ],
    ids=["explicit", "implicit", "conversational", "conversational-implicit"],
)
def test_every_preference_format_tokenizes_to_full_sequences(row, tokenizer):
    prepared, _ = prepare_dataset(Dataset.from_list([row]), tokenizer, config())
    example = prepared[0]
    chosen_ids, rejected_ids = example["completion_ids"]
    assert example["ranks"] == [1, 2]
    chosen_text = tokenizer.decode(chosen_ids)
    assert chosen_text.startswith("<s>") and "hello?" in chosen_text and chosen_text.rstrip("</s>").endswith("Sure, here.")
    assert tokenizer.decode(rejected_ids).rstrip("</s>").endswith("No.")
    if isinstance(row["chosen"], list):  # rendered with the chat template
        assert "<|assistant|>Sure, here.</s>" in chosen_text
    assert example["group"] == "all"  # no group_column: one group
    chosen_length, rejected_length = example["response_lengths"]
    assert length_cells(chosen_length, rejected_length) == LONGER  # "Sure, here." against "No."


def test_pretokenized_pairs_pass_through(tokenizer):
    prepared, _ = prepare_dataset(Dataset.from_list([{"chosen_ids": [1, 5, 6], "rejected_ids": [1, 7]}]), tokenizer, config())
    assert prepared[0]["completion_ids"] == [[1, 5, 6], [1, 7]]


def test_append_eos_token(tokenizer):
    prepared, _ = prepare_dataset(Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}]), tokenizer,
                               config(append_eos_token=True))
    assert prepared[0]["completion_ids"][0][-1] == tokenizer.eos_token_id


def test_group_margin_and_weight_columns_are_kept(pairs, tokenizer):
    prepared, _ = prepare_dataset(pairs.add_column("weight", [2.0] * len(pairs)), tokenizer, config(group_column="source"))
    assert set(prepared.column_names) == {"completion_ids", "ranks", "group", "margin", "weight", "length",
                                          "response_lengths"}
    assert sorted(set(prepared["group"])) == ["big", "small"]


def test_truncation_and_drops_are_reported(tokenizer, caplog):
    rows = [{"prompt": "Question: " + "hello " * 30, "chosen": " Sure.", "rejected": " No."},
            {"prompt": "Q", "chosen": " hello" * 40, "rejected": " No."}]
    prepared, report = prepare_dataset(Dataset.from_list(rows), tokenizer, config(max_length=16, on_bad_rows="skip"))
    chosen_ids = prepared[0]["completion_ids"][0]
    assert len(prepared) == 1 and len(chosen_ids) <= 16
    assert chosen_ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(chosen_ids).endswith("Sure.")
    too_long = "a response alone is longer than max_length=16 tokens"
    assert (f"train: 1 of 2 pairs used; dropped 1 x {too_long}; prompt cut from the left to fit max_length=16 in 1 "
            "(on_bad_rows=skip).") in caplog.text
    assert report == {"rows": 2, "pairs": 1, "truncated": 1, "empty_responses": 0, "dropped": {too_long: 1}}


def test_long_responses_cut_alike_are_reported_as_such(tokenizer):
    """With long_responses: cut, two long responses that differ only in their opening words become one sequence; the
    pair is dropped under its own reason, not as a pair whose texts were identical."""
    tail = " hello" * 40
    rows = [{"prompt": "Q", "chosen": " Yes," + tail, "rejected": " No," + tail},
            {"prompt": "Q", "chosen": " Same.", "rejected": " Same."},
            {"prompt": "Q", "chosen": " Yes.", "rejected": " No."}]
    _, report = prepare_dataset(Dataset.from_list(rows), tokenizer,
                                config(max_length=16, on_bad_rows="skip", long_responses="cut"))
    from hf_balanced_reward.row_checks import IDENTICAL, IDENTICAL_ONCE_CUT

    assert report["dropped"] == {IDENTICAL_ONCE_CUT: 1, IDENTICAL: 1}


@pytest.mark.parametrize("extension", ["jsonl", "json", "parquet", "csv"])
def test_load_local_files(tmp_path, pairs, extension):
    path = tmp_path / f"pairs.{extension}"
    {"jsonl": pairs.to_json, "json": pairs.to_json, "parquet": pairs.to_parquet, "csv": pairs.to_csv}[extension](str(path))
    loaded = load_preference_dataset(str(path))
    assert len(loaded) == len(pairs) and {"prompt", "chosen", "rejected"} <= set(loaded.column_names)


def test_load_saved_folder(tmp_path, pairs):
    pairs.save_to_disk(str(tmp_path / "saved"))
    assert len(load_preference_dataset(str(tmp_path / "saved"))) == len(pairs)


def test_a_new_version_of_the_code_does_not_reuse_cached_pairs(tmp_path, tokenizer, pairs_file, monkeypatch):
    import glob

    from datasets import load_dataset

    import hf_balanced_reward.preparation as preparation_module

    dataset = load_dataset("json", data_files=pairs_file, split="train", cache_dir=str(tmp_path / "cache"))

    def cache_files():
        return set(glob.glob(str(tmp_path / "cache" / "**" / "cache-*.arrow"), recursive=True))

    prepare_dataset(dataset, tokenizer, config())
    first = cache_files()
    prepare_dataset(dataset, tokenizer, config())
    assert cache_files() == first  # same code, same options: served from the cache
    monkeypatch.setattr(preparation_module, "CODE_VERSION", "a-later-version")
    prepare_dataset(dataset, tokenizer, config())
    assert cache_files() - first  # changed code: computed again, never an older version's columns
