"""Loss, optimiser groups, schedule and checkpoint files (no model or data needed)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from topoflow.errors import CheckpointError, TrainingError
from train.checkpoint import load_checkpoint, rng_state, save_atomic, set_rng_state
from train.rundir import RUN_FILE, best_checkpoints, default_checkpoint, read_run, start_run, update_best
from train.config import TrainConfig
from train.loss import latitude_weights, weighted_mse
from train.optim import build_optimizer, build_scheduler, lr_factor


def test_weighted_mse_matches_numpy_and_ignores_nan() -> None:
    rng = np.random.default_rng(0)
    lat = np.array([-60.0, 0.0, 30.0])
    pred = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
    target = rng.normal(size=pred.shape).astype(np.float32)
    mask = rng.random(pred.shape) < 0.7
    target[~mask] = np.nan  # invalid targets must not leak NaN into the loss
    w = np.cos(np.deg2rad(lat)) / np.cos(np.deg2rad(lat)).mean()
    wb = np.broadcast_to(w[:, None], pred.shape) * mask
    expected = np.sum(wb * np.nan_to_num(pred - target) ** 2) / wb.sum()
    got = weighted_mse(torch.from_numpy(pred), torch.from_numpy(target), torch.from_numpy(mask), latitude_weights(lat))
    assert float(got) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(TrainingError, match="no valid target"):
        weighted_mse(torch.zeros(1, 3, 4), torch.zeros(1, 3, 4), torch.zeros(1, 3, 4, dtype=torch.bool), latitude_weights(lat))


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
        self.fc = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.alpha = nn.Parameter(torch.ones(1))


def test_no_weight_decay_on_embeddings_norms_biases_alpha() -> None:
    net = _Toy()
    opt = build_optimizer(net, TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p is net.fc.weight for p in decay["params"]] == [True]
    assert {id(p) for p in no_decay["params"]} == {id(net.pos_embed), id(net.fc.bias), id(net.norm.weight),
                                                 id(net.norm.bias), id(net.alpha)}


def test_warmup_then_cosine() -> None:
    kw = {"warmup_steps": 10, "total_steps": 110, "lr": 1e-3, "min_lr": 1e-5}
    assert lr_factor(0, **kw) == pytest.approx(0.01)
    assert lr_factor(5, **kw) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(10, **kw) == pytest.approx(1.0)
    assert lr_factor(60, **kw) == pytest.approx(0.01 + 0.99 * 0.5)  # cosine midpoint between 1 and min_lr/lr
    assert lr_factor(110, **kw) == pytest.approx(0.01)
    net = _Toy()
    cfg = TrainConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10)
    opt = build_optimizer(net, cfg)
    sched = build_scheduler(opt, cfg, 110)
    for _ in range(10):
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(1e-3)


def test_atomic_save_and_weights_only_load(tmp_path) -> None:
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    payload = {"model": {"w": torch.arange(3.0)}, "rng": [rng_state()], "config": {"a": [1, 2], "b": None}}
    save_atomic(payload, tmp_path / "last.ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind
    expected = (torch.rand(2), np.random.rand(2), random.random())
    loaded = load_checkpoint(tmp_path / "last.ckpt")
    set_rng_state(loaded["rng"][0])
    assert torch.equal(torch.rand(2), expected[0])
    assert np.array_equal(np.random.rand(2), expected[1]) and random.random() == expected[2]
    assert loaded["config"] == {"a": [1, 2], "b": None}


def test_corrupt_and_pickled_checkpoints_are_refused(tmp_path) -> None:
    good = tmp_path / "good.ckpt"
    save_atomic({"w": torch.ones(100)}, good)
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(good.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="corrupt, truncated or not a torch checkpoint"):
        load_checkpoint(bad)
    evil = tmp_path / "evil.ckpt"
    torch.save({"obj": _Toy}, evil)  # a class reference needs unpickling code: refused
    with pytest.raises(CheckpointError, match="holds a pickled .*_Toy, which is not on the allow-list"):
        load_checkpoint(evil)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_best_k_keeps_the_lowest_and_lists_only_this_runs_files(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        default_checkpoint(tmp_path)
    record, restore = start_run(tmp_path, resume=False)
    assert not restore and (tmp_path / RUN_FILE).is_file()
    save_atomic({"step": 99}, tmp_path / "best-val_loss=0.0100-step=99.ckpt")  # another run's file, copied in
    for step, loss in enumerate([0.5, 0.4, 0.45, 0.3557, 0.6, math.nan]):
        update_best(tmp_path, record, {"step": step}, loss, step, 2, save_atomic)
    names = sorted(p.name for p in tmp_path.glob("best-*.ckpt"))
    assert names == ["best-val_loss=0.0100-step=99.ckpt", "best-val_loss=0.3557-step=3.ckpt",
                     "best-val_loss=0.4000-step=1.ckpt"]
    assert [p.name for p in best_checkpoints(tmp_path)] == names[1:]  # the foreign file is never "the best"
    assert default_checkpoint(tmp_path).name == "best-val_loss=0.3557-step=3.ckpt"
    assert read_run(tmp_path).run_id == record.run_id
    update_best(tmp_path, record, {"step": 3}, 0.39, 3, 2, save_atomic)  # step 3 replayed after a resume
    assert [(e.step, e.val_loss) for e in read_run(tmp_path).best] == [(3, 0.39), (1, 0.4)]


def _residual_static(change_std: list[list[float]]):
    from types import SimpleNamespace

    return SimpleNamespace(targets=["o3", "pm25"], leads_h=[6, 12], change_std=np.array(change_std, dtype=np.float64),
                           target_std=np.array([2.0, 4.0], np.float32))


def test_residual_forecast_is_persistence_plus_the_scaled_change() -> None:
    from train.residual import add_persistence, residual_scale

    static = _residual_static([[1.0, 2.0], [3.0, 8.0]])
    scale = residual_scale(static)
    torch.testing.assert_close(scale, torch.tensor([[0.5, 0.5], [1.5, 2.0]]))
    dynamic, change = torch.randn(2, 3, 4, 6), torch.full((2, 2, 4, 6), 0.5)  # a constant predicted change
    out = add_persistence(change, dynamic, [2, 1], scale, static.leads_h, torch.tensor([12.0, 6.0]))
    expected = dynamic[:, [2, 1]] + 0.5 * torch.tensor([[1.5, 2.0], [0.5, 0.5]])[:, :, None, None]
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match=r"lead times \[24.0\] h are not among the shard set's leads \[6, 12\]"):
        add_persistence(change[:1], dynamic[:1], [2, 1], scale, static.leads_h, torch.tensor([24.0]))


def test_residual_scale_falls_back_to_the_target_std_where_unknown(caplog: pytest.LogCaptureFixture) -> None:
    from train.residual import residual_scale

    scale = residual_scale(_residual_static([[1.0, float("nan")], [0.0, 8.0]]))
    torch.testing.assert_close(scale, torch.tensor([[0.5, 1.0], [1.0, 2.0]]))
    assert "pm25@6h" in caplog.text and "o3@12h" in caplog.text


def test_weighted_mse_in_change_units_divides_the_error() -> None:
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 2, 3, 4, generator=gen), torch.randn(2, 2, 3, 4, generator=gen)
    mask = torch.rand(2, 2, 3, 4, generator=gen) > 0.3
    lat_w, scale = latitude_weights(np.array([-10.0, 20.0, 50.0])), torch.tensor([[0.5, 2.0], [1.0, 4.0]])[:, :, None, None]
    w = lat_w.view(1, 1, 3, 1).expand_as(pred)[mask]
    expected = (w * (((pred - target) / scale)[mask]) ** 2).sum() / w.sum()
    torch.testing.assert_close(weighted_mse(pred, target, mask, lat_w, scale), expected)