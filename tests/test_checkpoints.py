"""What `checkpoints.py` writes and checks: a checkpoint's run fingerprint (another loss, options or data is refused
by name; the same data from another copy is the same run) and JSON that names functions."""

import json
import logging
import os
import re

import pytest
from datasets import Dataset

from conftest import preference_rows
from hf_balanced_reward import BalancedRewardTrainer, ConfigError
from hf_balanced_reward.checkpoints import REWARD_STATE
from test_safe_runs import small_run


def test_resuming_a_checkpoint_of_another_loss_or_data_is_refused_naming_what_differs(tmp_path, model_dir, pairs,
                                                                                     caplog):
    BalancedRewardTrainer(model=model_dir, args=small_run(tmp_path), train_dataset=pairs).train()
    checkpoint = tmp_path / "checkpoint-2"
    fix = (r"\. Resume it with the options it was trained with; for a new run with these options, give another "
           r"output_dir \(or unset resume_from_checkpoint and set overwrite_output_dir: true\)\.$")

    as_hinge = BalancedRewardTrainer(model=model_dir, args=small_run(tmp_path, loss_type="hinge"), train_dataset=pairs)
    with pytest.raises(ConfigError, match=rf"checkpoint '{re.escape(str(checkpoint))}' is of another run: loss_type "
                                          rf"'bradley_terry' -> 'hinge'{fix}"):
        as_hinge.train(resume_from_checkpoint=True)

    fewer = Dataset.from_list(preference_rows(20))
    other_data = BalancedRewardTrainer(model=model_dir, args=small_run(tmp_path), train_dataset=fewer)
    with pytest.raises(ConfigError, match=rf"is of another run: train_data \{{'rows': 24, 'content': '[0-9a-f]{{16}}'\}} "
                                          rf"-> \{{'rows': 20, 'content': '[0-9a-f]{{16}}'\}}{fix}"):
        other_data.train(resume_from_checkpoint=str(checkpoint))

    # The same data read from a copy of its file elsewhere (a job's scratch disk), or touched: the same run.
    copy_dir = tmp_path.parent / f"{tmp_path.name}_copy"
    copy_dir.mkdir()
    for index, name in enumerate(("a.jsonl", "b.jsonl")):
        (copy_dir / name).write_text("".join(json.dumps(r) + "\n" for r in preference_rows()))
        os.utime(copy_dir / name, (index, index))
    from datasets import load_dataset

    first, second = (load_dataset("json", data_files=str(copy_dir / name), split="train") for name in ("a.jsonl", "b.jsonl"))
    assert first._fingerprint != second._fingerprint  # what datasets calls different
    ids = [BalancedRewardTrainer(model=model_dir, args=small_run(tmp_path), train_dataset=data).train_data_id
           for data in (first, second)]
    assert ids[0] == ids[1]

    options = small_run(tmp_path, max_length=64, seed=1, loss_kwargs={"hinge_margin": 0.5}, loss_type="hinge")
    several = BalancedRewardTrainer(model=model_dir, args=options, train_dataset=pairs)
    with pytest.raises(ConfigError, match=r"is of another run: loss_type 'bradley_terry' -> 'hinge'; loss_kwargs \{\} "
                                          r"-> \{'hinge_margin': 0\.5\}; max_length 1024 -> 64; seed 0 -> 1\. "):
        several.train(resume_from_checkpoint=True)

    # A checkpoint of an earlier version has no fingerprint: it resumes, with a warning.
    state = json.loads((checkpoint / REWARD_STATE).read_text())
    del state["run"]
    (checkpoint / REWARD_STATE).write_text(json.dumps(state))
    same = BalancedRewardTrainer(model=model_dir, args=small_run(tmp_path, max_steps=3), train_dataset=pairs)
    with caplog.at_level(logging.WARNING, logger="hf_balanced_reward"):
        same.train(resume_from_checkpoint=True)
    assert same.state.global_step == 3
    assert (f"checkpoint '{checkpoint}' records no run fingerprint (an earlier version wrote it): resuming without "
            "checking that its model, loss and data are this run's.") in caplog.text


def test_a_function_in_loss_kwargs_is_written_by_name(tmp_path):
    """loss_kwargs may hold a function (`pair_loss`): the checkpoint's fingerprint names it the same in every process
    instead of failing to write JSON."""
    from hf_balanced_reward.checkpoints import json_name, write_json_atomically
    from hf_balanced_reward.losses import hinge

    write_json_atomically(str(tmp_path / "state.json"), {"loss_kwargs": {"pair_loss": hinge}})
    assert json.loads((tmp_path / "state.json").read_text()) == {"loss_kwargs": {"pair_loss": "hf_balanced_reward.losses.hinge"}}
    assert json_name(hinge) == "hf_balanced_reward.losses.hinge"
