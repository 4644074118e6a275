"""Checkpoints: ClimaX-layout (Lightning) with other variables and grid, own round trip, corrupt files."""

from __future__ import annotations

import pytest
import torch

from model import ModelConfig, TopoFlowClimaX, load_pretrained
from topoflow.errors import CheckpointError
from topoflow.layout import PatchLayout

pytestmark = pytest.mark.usefixtures("torch_single_thread")

CFG = {"embed_dim": 32, "depth": 2, "num_heads": 4}


def climax_like(variables, grid=(4, 8), outputs=("pm25", "pm10")) -> TopoFlowClimaX:
    torch.manual_seed(7)
    return TopoFlowClimaX(ModelConfig(**CFG, physics={"enabled": False}), variables, outputs,
                          PatchLayout(grid=grid, patch_size=2, regions=(1, 1)))


def target(variables=("u", "v", "temp", "pm25")) -> TopoFlowClimaX:
    torch.manual_seed(0)
    return TopoFlowClimaX(ModelConfig(**CFG), variables, ["pm25", "pm10"], PatchLayout(grid=(8, 16), patch_size=2, regions=(2, 2)))


def test_lightning_climax_checkpoint_with_other_variables_and_grid(tmp_path):
    src_vars = ["v", "u", "temp", "cloud"]
    src = climax_like(src_vars)
    sd = src.state_dict()
    path = tmp_path / "climax.ckpt"
    torch.save({"state_dict": {f"net.{k}": t for k, t in sd.items()}, "variables": src_vars, "epoch": 3}, path)
    net = target()
    report = load_pretrained(net, path)
    assert "blocks.0.attn.physics.alpha" in report.missing
    assert {"token_embeds.3.proj.weight", "token_embeds.3.proj.bias", "var_embed[pm25]"} <= set(report.missing)
    assert report.remapped["u"] == "ckpt index 1 -> model index 0"
    assert report.remapped["v"] == "ckpt index 0 -> model index 1"
    assert set(report.reshaped) == {"pos_embed"} and "(1, 8, 32) -> (1, 32, 32)" in report.reshaped["pos_embed"]
    assert any(k.startswith("token_embeds.3.") and "cloud" in k for k in report.unexpected)
    assert not report.dropped
    torch.testing.assert_close(net.token_embeds[0].proj.weight, sd["token_embeds.1.proj.weight"])
    torch.testing.assert_close(net.var_embed[0, 1], sd["var_embed"][0, 0])
    torch.testing.assert_close(net.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])
    torch.testing.assert_close(net.blocks[0].attn.physics.alpha, torch.tensor([2.0]))  # left at init


def test_positional_variables_and_dropped_head(tmp_path):
    src = climax_like(["u", "v"], grid=(8, 16), outputs=("pm25", "pm10", "so2"))
    report = load_pretrained(target(), {k: t for k, t in src.state_dict().items()})
    assert report.remapped == {}  # same positions, no names given
    assert set(report.dropped) == {"head.4.weight", "head.4.bias"}
    assert "token_embeds.2.proj.weight" in report.missing and "head.4.weight" not in report.missing
    assert report.reshaped == {}


def test_own_checkpoint_round_trip(tmp_path):
    net = target()
    with torch.no_grad():
        net.blocks[0].attn.physics.alpha.fill_(3.5)
    path = tmp_path / "own.pt"
    torch.save({"model": net.state_dict(), "step": 5}, path)
    other = target()
    report = load_pretrained(other, path)
    assert report.missing == [] and report.unexpected == [] and report.dropped == {}
    for (k, a), b in zip(net.state_dict().items(), other.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, damage):
    path = tmp_path / "bad.ckpt"
    if damage != "missing":
        torch.save(target().state_dict(), path)
        blob = path.read_bytes()
        path.write_bytes(blob[: len(blob) // 2] if damage == "truncate" else b"not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="bad.ckpt"):
        load_pretrained(target(), path)
