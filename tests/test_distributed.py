"""Real 2-process data parallelism on CPU (torchrun, gloo) against 1 process with the same global batch."""

import json
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_workers_together

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers", "distributed_run.py")
TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this python")
def test_two_processes_equal_one_process_with_the_global_batch(tmp_path, model_dir, pairs_file):
    single, double = run_workers_together([
        ([sys.executable, WORKER, model_dir, pairs_file, str(tmp_path / "one"), "4", str(tmp_path / "r1")],
         tmp_path / "r1"),
        ([TORCHRUN, "--nproc_per_node", "2", "--master_port", "29517", WORKER, model_dir, pairs_file,
          str(tmp_path / "two"), "2", str(tmp_path / "r2")], tmp_path / "r2"),
    ], CUDA_VISIBLE_DEVICES="")

    ranks = [json.load(open(tmp_path / "r2" / f"rank{r}.json")) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["should_save"] for r in ranks] == [True, False]  # only rank 0 writes
    assert ranks[0]["group_sizes"] == ranks[1]["group_sizes"] == [18, 6]  # counted once, over the whole dataset
    assert ranks[0]["group_mix"] == pytest.approx(ranks[1]["group_mix"], abs=1e-7)  # DRO weights agree
    single_rank = json.load(open(tmp_path / "r1" / "rank0.json"))
    assert ranks[0]["group_mix"] == pytest.approx(single_rank["group_mix"], abs=1e-6)

    assert double["losses"] == pytest.approx(single["losses"], rel=1e-5)
    for two_log, one_log in zip(double["train_logs"], single["train_logs"], strict=True):  # summed, not averaged
        metrics = {k: v for k, v in one_log.items() if k.startswith(("accuracy", "margin", "reward", "unit_weight"))}
        assert metrics and {k: two_log.get(k) for k in metrics} == pytest.approx(metrics, rel=1e-5, abs=1e-6)
    for key, value in single["eval"].items():
        if key.startswith("eval_") and not key.endswith(("runtime", "per_second")):
            assert double["eval"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert double["eval"]["eval_pairs"] == 23  # odd count over 2 ranks: nothing duplicated or dropped
    assert double["files"] == single["files"]
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    initial = load_file(os.path.join(model_dir, "model.safetensors"))
    assert any(not torch.equal(one[name], initial[name]) for name in one)  # the weights did move
    difference = max((two[name] - one[name]).abs().max().item() for name in one)
    # not bitwise: the all-reduce sums gradients in another order. Under SGD a weight moves by lr x gradient, so
    # fp32 rounding of gradients of order 1 (~1e-7) times lr 0.1 over 4 steps stays far below 1e-6.
    assert difference < 1e-6, difference


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this python")
def test_lists_on_two_processes_equal_one_process(tmp_path, model_dir):
    """Lists of different K on each rank: losses, the learnt tie parameter and every ranking metric (K padded
    across processes) as on one process with the global batch."""
    from test_listwise_training import list_rows

    data_file = tmp_path / "lists.jsonl"
    data_file.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n"
                                 for r in list_rows(24)))
    single, double = run_workers_together([
        ([sys.executable, WORKER, model_dir, str(data_file), str(tmp_path / "one"), "4", str(tmp_path / "r1"), "lists"],
         tmp_path / "r1"),
        ([TORCHRUN, "--nproc_per_node", "2", "--master_port", "29518", WORKER, model_dir, str(data_file),
          str(tmp_path / "two"), "2", str(tmp_path / "r2"), "lists"], tmp_path / "r2"),
    ], CUDA_VISIBLE_DEVICES="")
    ranks = [json.load(open(tmp_path / "r2" / f"rank{r}.json")) for r in (0, 1)]
    single_rank = json.load(open(tmp_path / "r1" / "rank0.json"))
    assert ranks[0]["log_tie"] == pytest.approx(ranks[1]["log_tie"], abs=1e-7)  # its gradient averaged over ranks
    assert single_rank["log_tie"] != 0.0  # it was learnt (it starts at 0)
    assert ranks[0]["log_tie"] == pytest.approx(single_rank["log_tie"], abs=1e-6)
    assert double["losses"] == pytest.approx(single["losses"], rel=1e-5)
    for key, value in single["eval"].items():
        if key.startswith("eval_") and not key.endswith(("runtime", "per_second")):
            assert double["eval"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert double["eval"]["eval_lists"] == 23  # odd count over 2 ranks: nothing duplicated or dropped
