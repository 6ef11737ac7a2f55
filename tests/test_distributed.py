"""Two processes (Gloo, CPU) on one run: DDP training, fixing on rank 0, identical ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from mlflow.tracking import MlflowClient

from pwf_core._files import load_tensors, save_tensors
from pwf_core.config import load_config
from pwf_core.data import TensorLoader
from pwf_core.methods.gbnn2d.training import dataset_size
from pwf_core.pretrain import build_experiment_model
from tests._dummies.distributed import digits_compression, run_rank
from tests._dummies.services import free_port
from tests.conftest import DEFAULT_CONFIG

METHODS = {
    "pwfn": {"method": "pwfn", "b": 5, "schedule": [0.5, 0.8, 1.0]},
    "2dgbnn": {"method": "2dgbnn", "bnn_epochs": 1, "vi_epochs": 2, "step_samples": 2},
}


def test_a_sharded_loader_gives_each_rank_an_equal_distinct_share():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    shares = []
    for rank in range(3):
        loader = TensorLoader(x, y, batch_size=2, shuffle=True, seed=4)
        loader.rank, loader.world = rank, 3
        shares.append(torch.cat([labels for _, labels in loader]))
    assert [len(s) for s in shares] == [3, 3, 3] and len(TensorLoader(x, y, 2)) == 5
    assert len(set(torch.cat(shares).tolist())) == 9  # disjoint


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_two_ranks_hold_identical_models_and_match_one_process(
    name, digits, pretrained_state, tmp_path
):
    save_tensors(tmp_path / "pretrained.safetensors", pretrained_state[0])
    mp.spawn(run_rank, args=(2, str(tmp_path), free_port(), METHODS[name]), nprocs=2, join=True)
    steps = sorted(tmp_path.glob("rank0_step*.safetensors"))
    assert steps
    for rank0 in steps:  # after every step, bit for bit
        state0 = load_tensors(rank0)
        state1 = load_tensors(rank0.with_name(rank0.name.replace("rank0", "rank1")))
        assert state0.keys() == state1.keys()
        for key in state0:
            assert torch.equal(state0[key], state1[key]), (rank0.name, key)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results[0]["final"] == results[1]["final"]
    # The ELBO's KL is divided by the whole training set on every rank, not by its shard.
    assert [r["kl_examples"] for r in results] == [len(digits.train.labels)] * 2

    config = load_config(DEFAULT_CONFIG)
    model = build_experiment_model(config, digits)
    model.load_state_dict(pretrained_state[0])
    single = digits_compression(model, METHODS[name], digits)
    single.convert()
    for step in single.steps:
        single.run_step(step)
    alone = single.finalize()
    assert dataset_size(single.context.train_loader) == results[0]["kl_examples"]
    together = results[0]["final"]
    # Two ranks see half the batches each (twice the effective batch): the same model up to
    # training noise. Stated tolerance: top-1 within 2 points, NLL within 0.05.
    assert abs(together["cls/acc"] - alone["cls/acc"]) <= 0.02
    assert abs(together["cls/nll"] - alone["cls/nll"]) <= 0.05


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_pwf_run_on_two_processes(prefect_server, mlflow_store, tmp_path):
    command = [
        sys.executable,
        "-m",
        "pwf_flows.cli",
        "run",
        "--nproc",
        "2",
        "--no-progress",
        "--artifacts",
        str(tmp_path / "a"),
        "--set",
        "name=two-ranks",
        "--set",
        "pretrain.epochs=3",
        "--set",
        "compression.schedule=[0.5, 1.0]",
        "--set",
        "train.epochs=1",
    ]
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "training on 2 processes" in output
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("two-ranks").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["distributed.world_size"] == "2"
    assert run.data.metrics["final/ws/fixed_fraction"] == 1.0
    # Only the newest checkpoint is kept.
    assert len(list((tmp_path / "a").glob("experiments/two-ranks/*/step_*.safetensors"))) == 1
