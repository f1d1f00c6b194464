"""Data parallelism: `optimize` and `finetune` under torchrun (2 CPU processes, gloo) follow one process
at the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dgo_compile import DEFAULT_MODEL
from dgo_compile.channels.finetune import read_finetune
from dgo_compile.core.distributed import DistributedError, World
from dgo_compile.search.pruner import build_pruner, load_pruner

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
STATE = "finetune_state.pt"


def run(*args, processes=1):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *launcher, "-m", "dgo_compile.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=600, env=env)


@pytest.mark.slow
def test_optimize_on_two_processes_matches_one_at_the_same_global_batch(tmp_path):
    options = ("optimize", "--steps", "4", "--iters", "4", "--batch", "2", "--calibration", "4", "--keep-macs", "0.3",
               "--lr", "3")  # a large step, so gates flip and later iterations carry a consistency gradient
    one = run(*options, "-o", tmp_path / "one")
    two = run(*options, "-o", tmp_path / "two", processes=2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("wrote") == 1  # only process 0 reports
    histories = [json.loads((tmp_path / name / "pruner.json").read_text())["history"] for name in ("one", "two")]
    assert [h["kept"] for h in histories[0]] == [h["kept"] for h in histories[1]]
    for a, b in zip(*histories):
        assert b["consistency"] == pytest.approx(a["consistency"], rel=1e-4, abs=1e-6)
        assert b["sparsity"] == pytest.approx(a["sparsity"], rel=1e-5)
    checkpoints = [torch.load(tmp_path / name / "checkpoint.pt", weights_only=True) for name in ("one", "two")]
    weights = [c["pruner"] for c in checkpoints]
    for name, a in weights[0].items():  # lr 3 magnifies float32 sum-order differences (1e-7 in the loss) to ~1e-4
        torch.testing.assert_close(weights[1][name], a, rtol=1e-3, atol=1e-3, msg=name)
    # The momentum buffers are the gradients themselves: averaged over processes they match to ~5e-4 relative;
    # process 0's half batch alone is off by more than 100%.
    buffers = [c["optimizer"]["state"] for c in checkpoints]
    for key, state in buffers[0].items():
        a, b = state["momentum_buffer"], buffers[1][key]["momentum_buffer"]
        assert (a - b).norm() <= 1e-2 * a.norm(), key
    initial = build_pruner(load_pruner(tmp_path / "one").state).state_dict()  # the seed's weights, before training
    assert any(not torch.equal(initial[name], a) for name, a in weights[0].items())

@pytest.mark.slow
def test_finetune_on_two_processes_matches_one_at_the_same_global_batch(tmp_path):
    options = ("finetune", "--train-steps", "3", "--batch", "4", "--ema-decay", "0")
    one = run(*options, "-o", tmp_path / "one")
    two = run(*options, "-o", tmp_path / "two", processes=2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("wrote") == 1
    losses = [[h["loss"] for h in read_finetune(tmp_path / name).history] for name in ("one", "two")]
    # step 1 is the same batch on the same weights; later steps carry Adam's division of float32 sum-order
    # differences (1.6e-5 relative at step 3 on the shipped weights); half the batch would be off by percents
    assert losses[1][0] == pytest.approx(losses[0][0], rel=1e-6)
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    # The first moments are linear in the gradients: averaged over processes they match to float32 sum order (a
    # tensor whose gradient is itself sum-order noise, ~1e-12, as a bias before a norm has, is compared in the whole).
    moments = [torch.load(tmp_path / name / STATE, weights_only=True)["optimizer"]["state"] for name in ("one", "two")]
    assert moments[0].keys() == moments[1].keys()
    first_a, first_b = (torch.cat([m[k]["exp_avg"].flatten() for k in moments[0]]) for m in moments)
    assert (first_b - first_a).norm() <= 1e-4 * first_a.norm()
    # The weights are not compared element by element: AdamW moves an element with a near-zero gradient by about lr
    # whatever its sign, so an element whose gradient is sum-order noise may move either way. Over the whole model
    # the updates must agree to 1%; a run on another batch of 2 is off by 135% (moments: 156%).
    shipped = load_file(DEFAULT_MODEL / WEIGHTS)
    a, b = (load_file(tmp_path / name / WEIGHTS) for name in ("one", "two"))
    assert a.keys() == b.keys() == shipped.keys()
    update_a = torch.cat([(a[n] - shipped[n]).flatten() for n in a])
    update_b = torch.cat([(b[n] - shipped[n]).flatten() for n in a])
    assert update_a.norm() > 0  # three steps changed the weights
    assert (update_b - update_a).norm() <= 1e-2 * update_a.norm()


def test_a_batch_that_does_not_split_over_the_processes_is_refused_before_writing(tmp_path):
    result = run("finetune", "--train-steps", "1", "--batch", "3", "-o", tmp_path / "out", processes=2)
    assert result.returncode != 0
    assert "error: --batch 3 does not split evenly over 2 processes; pass a multiple of 2" in result.stderr
    assert not (tmp_path / "out").exists()


def test_world_shards_and_refuses_uneven_batches():
    assert [World(r, 4).shard(8, "batch") for r in range(4)] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    assert World().shard(3, "batch") == slice(0, 3)
    with pytest.raises(DistributedError, match=r"`batch` 6 does not split evenly over 4 processes"):
        World(1, 4).shard(6, "batch")
