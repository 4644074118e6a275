"""Two-process `torchrun` (gloo) training on an uneven shard set: same weights, disjoint samples, no hang."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import load_pipeline_config
from pipeline.shard import write_shards
from tests.helpers import REPO, write_config

pytestmark = pytest.mark.slow

WORKER = """
import json, os, sys
import torch
import train.loader.stream
from train.__main__ import main

seen = []
original = train.loader.stream.ShardStream.__iter__

def recording(self):
    for batch in original(self):
        if self.mode == "train":
            seen.extend((self.epoch, key) for key in batch.keys)
        yield batch

train.loader.stream.ShardStream.__iter__ = recording
import train.fit
captured = {}
real_fit = train.fit.fit

def fit_and_keep(*args, **kwargs):
    result = real_fit(*args, **kwargs)
    captured["model"] = result.model
    return result

train.fit.fit = fit_and_keep  # the CLI imports train.fit.fit when it runs
code = main(sys.argv[1:])
rank = os.environ["RANK"]
out = os.environ["DDP_TEST_OUT"]
torch.save(captured["model"].state_dict(), f"{out}/params-{rank}.pt")
with open(f"{out}/keys-{rank}.json", "w") as fh:
    json.dump(seen, fh)
sys.exit(code)
"""


def test_two_ranks_stay_in_sync_on_uneven_shards(tiny_experiment: dict, tmp_path: Path) -> None:
    raw = copy.deepcopy(tiny_experiment)
    raw["data"]["shards"] = str(tmp_path / "shards")
    raw["shard"] = {"max_count": 5}  # train split 24 samples -> shards of 5,5,5,5,4: ranks get 3 and 2 shards
    raw["train"].update({"max_steps": 5, "val_every": 2, "checkpoint_every": 2})
    config = write_config(raw, tmp_path / "ddp.yaml")
    write_shards(load_pipeline_config(config), progress=False)
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "DDP_TEST_OUT": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(tmp_path / "worker.py"), "fit", "--config", str(config), "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)  # a hang fails here
    assert proc.returncode == 0, proc.stderr[-3000:]
    cores = len(os.sched_getaffinity(0))  # torchrun's OMP_NUM_THREADS=1 is replaced by the cores' even share
    assert f"{cores} core(s) owned (affinity mask) / 2 rank(s) on this node -> {max(1, cores // 2)} torch" in \
        (tmp_path / "run" / "train.log").read_text()

    p0, p1 = (torch.load(tmp_path / f"params-{r}.pt", weights_only=True) for r in (0, 1))
    assert p0.keys() == p1.keys()
    for key in p0:
        assert torch.equal(p0[key], p1[key]), key
    init = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)
    assert init["step"] == 5 and len(init["rng"]) == 2
    k0, k1 = ({key for epoch, key in json.loads((tmp_path / f"keys-{r}.json").read_text()) if epoch == 0} for r in (0, 1))
    assert len(k0) == len(k1) == 5 * 2  # 5 steps x batch 2 on each rank, equal counts
    assert not k0 & k1  # each rank read its own shards
