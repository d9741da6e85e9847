"""FSDP2 (accelerate_configs/fsdp2.yaml's options) in real processes against one plain process with the same global
batch: same weights, and a saved model that plain transformers loads and scores the same.

On CPU: two processes (torchrun, gloo). Accelerate 1.15 does not turn FSDP on for CPU processes by itself (it drops
the plugin and uses DDP, see fsdp_run.fsdp_on_cpu); the worker puts the plugin back, and from there on everything is
the real thing: torch's fully_shard per decoder layer, sharded SGD steps, a full state dict gathered at save.
On a CUDA machine the same test also runs with one GPU (world size 1, NCCL), without that workaround.
"""

import json
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import preference_rows, run_workers_together

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers", "fsdp_run.py")
TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))
GLOBAL_BATCH = 4

LAUNCHES = [  # id, device, processes, visible GPUs
    pytest.param("cpu", 2, "", id="cpu-2-processes"),
    pytest.param("cuda", 1, "0", id="cuda-1-gpu", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="FSDP2 on one GPU needs CUDA")),
]


def plain_transformers_rewards(folder, rows):
    """What a user of the saved model gets: AutoModelForSequenceClassification on each text alone, no package code."""
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        return torch.tensor([[model(**tokenizer(row["prompt"] + row[key], return_tensors="pt")).logits[0, 0].item()
                              for key in ("chosen", "rejected")] for row in rows])


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this python")
@pytest.mark.parametrize("device, processes, visible_gpus", LAUNCHES)
def test_fsdp2_equals_one_process_with_the_global_batch(tmp_path, model_dir, pairs_file, device, processes,
                                                        visible_gpus):
    common = [model_dir, pairs_file]
    single, sharded = run_workers_together([
        ([sys.executable, WORKER, *common, str(tmp_path / "one"), str(GLOBAL_BATCH), str(tmp_path / "r1"), "plain",
          device], tmp_path / "r1"),
        ([TORCHRUN, "--nproc_per_node", str(processes), "--master_port", "29527", WORKER, *common,
          str(tmp_path / "fsdp"), str(GLOBAL_BATCH // processes), str(tmp_path / "r2"), "fsdp", device],
         tmp_path / "r2"),
    ], CUDA_VISIBLE_DEVICES=visible_gpus)

    ranks = [json.load(open(tmp_path / "r2" / f"rank{r}.json")) for r in range(processes)]
    assert [r["world_size"] for r in ranks] == [processes] * processes
    assert [r["should_save"] for r in ranks] == [True] + [False] * (processes - 1)
    for rank in ranks:  # really FSDP2: fully_shard on every decoder layer and the root, not DDP
        assert rank["distributed_type"] == "DistributedType.FSDP" and rank["fsdp_version"] == 2
        assert {"FSDPLlamaDecoderLayer", "FSDPLlamaForSequenceClassification"} <= set(rank["sharded_modules"])
        if processes > 1:  # each rank holds its shard of a layer's weights, not the whole
            assert rank["local_shard_fraction"] == pytest.approx(1 / processes, abs=0.05)
    assert sharded["files"] == single["files"]
    assert sharded["losses"] == pytest.approx(single["losses"], rel=1e-5)

    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "fsdp" / "model.safetensors")
    initial = load_file(os.path.join(model_dir, "model.safetensors"))
    assert sorted(two) == sorted(one) == sorted(initial)  # full, unsharded names and shapes
    assert all(two[name].shape == one[name].shape and two[name].dtype == torch.float32 for name in one)
    assert any(not torch.equal(one[name], initial[name]) for name in one)  # the weights did move
    # Not bitwise: FSDP2 reduce-scatters gradients summed over two ranks' halves of the batch, one process sums the
    # whole batch in another order. fp32 rounds each of those sums at ~6e-8 relative (2^-24); with gradient entries
    # below ~1 and lr 0.1, one SGD step moves a weight differently by about 1e-8, four steps (each also feeding the
    # last step's tiny difference back through the model) by a few times that. 1e-6 of the weights' scale leaves a
    # 10x margin, and is still 100x below what a lost or doubled gradient would show (lr x gradient ~ 1e-3 .. 1e-1).
    scale = max(value.abs().max().item() for value in one.values())
    difference = max((two[name] - one[name]).abs().max().item() for name in one)
    assert difference <= 1e-6 * max(scale, 1.0), (difference, scale)

    rows = preference_rows()[:6]
    reloaded = plain_transformers_rewards(tmp_path / "fsdp", rows)
    # the saved file is the model the FSDP run ended with: its own (sharded) forward scored these pairs the same
    torch.testing.assert_close(reloaded, torch.tensor(sharded["rewards"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reloaded, plain_transformers_rewards(tmp_path / "one", rows), atol=1e-5, rtol=1e-5)
