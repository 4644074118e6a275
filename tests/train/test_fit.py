"""The training loop end to end on the tiny shards: exact resume, NaN stop, fine-tuning, grid checks."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import train.step
from model import load_pretrained
from tests.helpers import write_config
from topoflow.errors import CheckpointError, TrainingError
from train.checkpoint import load_checkpoint, save_atomic
from train.config import ExperimentConfig, load_experiment_config
from train.evaluate import evaluate
from train.fit import fit
from train.net import build_model
from train.shards import load_shard_set

pytestmark = pytest.mark.slow


def _cfg(raw: dict, path: Path, **train: object) -> ExperimentConfig:
    raw = copy.deepcopy(raw)
    raw["train"].update({k: str(v) if isinstance(v, Path) else v for k, v in train.items()})
    return load_experiment_config(write_config(raw, path))


def test_killed_run_resumes_to_the_same_weights(tiny_experiment: dict, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    raw = copy.deepcopy(tiny_experiment)
    raw["model"]["drop_path"] = 0.2  # random numbers in every step: the RNG state must resume too
    straight = fit(_cfg(raw, tmp_path / "a.yaml", run_dir=tmp_path / "a", max_steps=6, val_every=3),
                   progress=False)
    cfg = _cfg(raw, tmp_path / "b.yaml", run_dir=tmp_path / "b", max_steps=6, val_every=3)
    calls = {"n": 0}
    real_loss = train.step.weighted_mse

    def dies_in_step_6(*args: object) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt("killed")
        return real_loss(*args)

    monkeypatch.setattr(train.step, "weighted_mse", dies_in_step_6)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, progress=False)
    monkeypatch.setattr(train.step, "weighted_mse", real_loss)
    assert load_checkpoint(tmp_path / "b" / "last.ckpt")["step"] == 4  # checkpoint_every=2
    resumed = fit(cfg, resume=True, progress=False)
    assert resumed.step == straight.step == 6
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)
    assert resumed.best_val_loss == pytest.approx(straight.best_val_loss, rel=1e-6)
    steps = [line.split(",")[0] for line in (tmp_path / "b" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == ["1", "2", "3", "3", "4", "5", "6", "6"]  # the killed run's step-5 row was dropped


def test_nonfinite_loss_stops_with_step_and_keys(tiny_experiment: dict, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    real_loss = train.step.weighted_mse
    monkeypatch.setattr(train.step, "weighted_mse", lambda *a: real_loss(*a) * float("nan"))
    with pytest.raises(TrainingError, match=r"step 1: batch keys \['train_\d{8}', 'train_\d{8}'\]"):
        fit(_cfg(tiny_experiment, tmp_path / "c.yaml"), progress=False)


def test_finetune_from_baseline_reports_physics_keys_missing(tiny_experiment: dict, tmp_path: Path) -> None:
    base_raw = copy.deepcopy(tiny_experiment)
    base_raw["model"]["physics"] = {"enabled": False}
    base = fit(_cfg(base_raw, tmp_path / "base.yaml", run_dir=tmp_path / "base", max_steps=2), progress=False)
    base_sd = load_checkpoint(base.best_checkpoint)["model"]

    cfg = _cfg(tiny_experiment, tmp_path / "ft.yaml", run_dir=tmp_path / "ft", init_from=base.best_checkpoint,
               lr=5e-5, freeze_backbone=True, max_steps=2)
    net = build_model(cfg.model, load_shard_set(cfg.data.shards))
    report = load_pretrained(net, cfg.train.init_from)
    physics = {k for k in net.state_dict() if k not in base_sd}
    assert physics and set(report.missing) == physics
    assert all("blocks.0" in k for k in physics) and not report.unexpected
    loaded = net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in base_sd.items())

    tuned = fit(cfg, progress=False)
    log_text = (tmp_path / "ft" / "train.log").read_text()
    assert "missing" in log_text and sorted(physics)[0] in log_text
    after = tuned.model.state_dict()
    assert torch.equal(after["blocks.1.attn.qkv.weight"], base_sd["blocks.1.attn.qkv.weight"])  # frozen
    assert not torch.equal(after["head.0.weight"], base_sd["head.0.weight"])  # the head trains


def test_checkpoint_from_another_grid_is_refused(tiny_experiment: dict, tmp_path: Path) -> None:
    cfg = _cfg(tiny_experiment, tmp_path / "g.yaml", max_steps=2)
    result = fit(cfg, progress=False)
    ckpt = load_checkpoint(result.last_checkpoint)
    ckpt["store_record"]["domain"]["n_lat"] = 16
    other = tmp_path / "other-grid.ckpt"
    save_atomic(ckpt, other)
    with pytest.raises(CheckpointError, match=r"(?s)data\.domain: stored .*'n_lat': 16.*init_from"):
        evaluate(cfg, checkpoint=other, progress=False)
    save_atomic(ckpt, result.last_checkpoint)
    with pytest.raises(CheckpointError, match=r"data\.domain"):
        fit(cfg, resume=True, progress=False)


def test_capped_validation_always_starts_at_the_first_batch(tiny_experiment: dict, tmp_path: Path) -> None:
    from train.loader import ShardStream
    from train.step import StepContext, validate

    cfg = _cfg(tiny_experiment, tmp_path / "v.yaml", eval_batch_size=2)
    shards = load_shard_set(cfg.data.shards)
    net = build_model(cfg.model, shards)
    loader = ShardStream(cfg.data.shards, "val", 2, mode="eval")
    ctx = StepContext.create(shards, cfg.model.scan, False, "fp32", torch.device("cpu"))
    first = validate(net, loader, ctx, 1)
    assert validate(net, loader, ctx, 1) == first
    whole = validate(net, loader, ctx, None)
    assert whole != first and validate(net, loader, ctx, 1) == first


def test_freeze_backbone_freezes_only_what_the_checkpoint_supplied(caplog: pytest.LogCaptureFixture) -> None:
    from model import ModelConfig, TopoFlowClimaX
    from topoflow.layout import PatchLayout
    from train.fit import _trainable_after_freeze

    layout = PatchLayout(grid=(8, 16), patch_size=2, regions=(2, 2))
    torch.manual_seed(1)
    src = TopoFlowClimaX(ModelConfig(embed_dim=16, depth=2, num_heads=2, physics={"enabled": False}), ["v", "u"],
                         ["pm25"], layout)
    sd = dict(src.state_dict())
    sd["blocks.1.mlp.fc2.bias"] = torch.zeros(7)  # a shape the model cannot take: dropped, left at init
    net = TopoFlowClimaX(ModelConfig(embed_dim=16, depth=2, num_heads=2), ["u", "v", "temp"], ["pm25", "pm10"], layout)
    report = load_pretrained(net, {"state_dict": sd, "variables": ["v", "u"]})
    with caplog.at_level("INFO", logger="train"):
        _trainable_after_freeze(net, report.fresh(net))
    trainable = {name for name, p in net.named_parameters() if p.requires_grad}
    head = {name for name, _ in net.named_parameters() if name.startswith("head.")}  # trains, loaded or not
    new = {"token_embeds.2.proj.weight", "token_embeds.2.proj.bias", "blocks.0.attn.physics.alpha"}  # not in it
    assert trainable == new | {"var_embed", "blocks.1.mlp.fc2.bias"} | head  # + partly loaded, dropped
    assert "frozen, as loaded from the checkpoint: " in caplog.text and "blocks.0.attn.qkv.weight" in caplog.text


def test_validation_reports_each_targets_rmse_in_its_units(tiny_experiment: dict, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Forecasts off by c_p normalised units everywhere: RMSE_p = c_p x the target's std, loss = a mean of c_p^2."""
    import train.step
    from train.loader import ShardStream
    from train.step import StepContext, validate

    cfg = _cfg(tiny_experiment, tmp_path / "v.yaml", eval_batch_size=2)
    shards = load_shard_set(cfg.data.shards)
    offsets = torch.arange(1, len(shards.targets) + 1, dtype=torch.float32) * 0.5

    def off_by_offsets(net, batch, ctx, lead):  # noqa: ANN001, ANN202 - replaces train.step.forward
        li = int((batch.lead_times == lead[0]).nonzero()[0])
        return batch.y[:, li] + offsets.view(1, -1, 1, 1)

    monkeypatch.setattr(train.step, "forward", off_by_offsets)
    ctx = StepContext.create(shards, cfg.model.scan, False, "fp32", torch.device("cpu"))
    val = validate(build_model(cfg.model, shards), ShardStream(cfg.data.shards, "val", 2, mode="eval"), ctx, None)
    std = shards.input_std[shards.target_index]
    assert list(val.rmse) == list(shards.targets)
    for p, target in enumerate(shards.targets):
        assert val.rmse[target] == pytest.approx(float(offsets[p]) * float(std[p]), rel=1e-5)
    assert float(offsets.min()) ** 2 < val.loss < float(offsets.max()) ** 2
