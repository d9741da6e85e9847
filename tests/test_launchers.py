"""`accelerate launch` on CPU: the shipped configs start real data parallelism (2 processes, and 2 machines over
loopback) equal to one process with the global batch; a launch that would train copies is refused."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, preference_rows

ACCELERATE = shutil.which("accelerate", path=os.path.dirname(sys.executable))
CONFIGS = os.path.join(REPO, "accelerate_configs")
CPU_DDP = ["--use_cpu", "true", "--ddp_backend", "gloo"]


@pytest.fixture
def recipe(tmp_path, model_dir):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in preference_rows()))
    path = tmp_path / "recipe.yaml"
    # SGD: a weight moves by lr x gradient, so the all-reduce's other summation order stays far below 1e-6.
    path.write_text(yaml.safe_dump({
        "model_name_or_path": model_dir, "dataset_name": str(data), "group_column": "source",
        "loss_type": "bradley_terry", "max_steps": 3, "per_device_train_batch_size": 2, "learning_rate": 0.1,
        "optim": "sgd", "report_to": "none", "save_strategy": "no", "logging_steps": 1, "seed": 0,
    }))
    return str(path)


def launch(config, recipe, output_dir, *extra, machines=1, rank=0, port=29650):
    command = [ACCELERATE, "launch", "--config_file", os.path.join(CONFIGS, config), "--num_processes", "2",
               "--main_process_port", str(port)]
    if machines > 1:
        command += ["--num_machines", str(machines), "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1"]
    command += ["-m", "hf_balanced_reward", "train", "--config", recipe, "--output_dir", str(output_dir), *extra]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def finished(process):
    out, err = process.communicate(timeout=600)
    return process.returncode, out, err


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate's launcher is not installed beside this python")
def test_accelerate_launch_on_cpu_is_real_data_parallelism(tmp_path, recipe, model_dir):
    one = subprocess.Popen([sys.executable, "-m", "hf_balanced_reward", "train", "--config", recipe, "--output_dir",
                            str(tmp_path / "one"), "--per_device_train_batch_size", "4"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    copies = launch("multi_gpu.yaml", recipe, tmp_path / "copies", port=29651)
    two = launch("cpu_ddp.yaml", recipe, tmp_path / "two", *CPU_DDP, port=29652)
    nodes = [launch("cpu_ddp.yaml", recipe, tmp_path / "nodes", *CPU_DDP, machines=2, rank=r, port=29653)
             for r in (0, 1)]
    results = {name: finished(p) for name, p in [("one", one), ("copies", copies), ("two", two), ("node0", nodes[0]),
                                                  ("node1", nodes[1])]}
    for name in ("one", "two", "node0", "node1"):
        assert results[name][0] == 0, results[name][2][-3000:]

    # A GPU config on a machine without GPUs: refused before training, never two copies into one folder.
    status, _, err = results["copies"]
    assert status != 0 and "is 1 of 2 started by a launcher (WORLD_SIZE=2), but training is not distributed" in err
    assert "--use_cpu true --ddp_backend gloo" in err and not (tmp_path / "copies" / "model.safetensors").exists()

    reference = load_file(tmp_path / "one" / "model.safetensors")
    for name in ("two", "nodes"):
        weights = load_file(tmp_path / name / "model.safetensors")
        assert max((weights[k] - reference[k]).abs().max().item() for k in reference) < 1e-6, name
        state = json.loads((tmp_path / name / "train_results.json").read_text())
        assert state["epoch"] == 0.5  # 3 steps of a global batch of 4 over 24 pairs: both processes trained
    assert results["two"][1].count("Model saved to") == 1  # only the main process writes
    initial = load_file(os.path.join(model_dir, "model.safetensors"))
    assert any(not torch.equal(reference[k], initial[k]) for k in reference)  # the weights did move
