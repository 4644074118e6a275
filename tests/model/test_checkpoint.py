"""Checkpoints: ClimaX/Lightning layout matched by name, own round trip, safe loading, corrupt files."""

from __future__ import annotations

import argparse
import contextlib
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from model import ModelConfig, TopoFlowClimaX, load_pretrained
from model.variables import CLIMAX_DEFAULT_VARS
from topoflow.errors import CheckpointError
from topoflow.layout import PatchLayout

pytestmark = pytest.mark.usefixtures("torch_single_thread")

CFG = {"embed_dim": 32, "depth": 2, "num_heads": 4}
LAYOUT = PatchLayout(grid=(8, 16), patch_size=2, regions=(2, 2))
# A checkpoint's variables in ClimaX's names, shuffled against ClimaX's own order, and the model's in another order
CKPT_VARS = ["2m_temperature", "orography", "geopotential_500", "10m_v_component_of_wind", "lattitude",
             "10m_u_component_of_wind"]
MODEL_VARS = ["u", "v", "temp", "pm25", "elevation"]
CLIMAX_NAME = {"u": "10m_u_component_of_wind", "v": "10m_v_component_of_wind", "temp": "2m_temperature",
               "elevation": "orography"}


def climax_like(variables, grid=(4, 8), outputs=("pm25", "pm10"), seed=7, **cfg) -> TopoFlowClimaX:
    torch.manual_seed(seed)
    return TopoFlowClimaX(ModelConfig(**{**CFG, **cfg}, physics={"enabled": False}), variables, outputs,
                          PatchLayout(grid=grid, patch_size=2, regions=(1, 1)))


def target(variables=("u", "v", "temp", "pm25"), physics=True) -> TopoFlowClimaX:
    torch.manual_seed(0)
    return TopoFlowClimaX(ModelConfig(**CFG, physics={"enabled": physics}), variables, ["pm25", "pm10"], LAYOUT)


@contextlib.contextmanager
def lightning_importable(module: str) -> Iterator[type]:
    """Lightning's AttributeDict (a dict subclass), importable under `module` while a test writes a checkpoint,
    so pickle records it as Lightning does: lightning.fabric.utilities.data.AttributeDict (lightning >= 2.0,
    Lightning-AI/pytorch-lightning src/lightning/fabric/utilities/data.py) or
    pytorch_lightning.utilities.parsing.AttributeDict (1.x). Lightning itself is not installed, and the
    modules are gone again when the checkpoint is read."""
    cls = type("AttributeDict", (dict,), {"__module__": module})
    with pytest.MonkeyPatch.context() as mp:
        parts = module.split(".")
        for k in range(1, len(parts) + 1):
            mp.setitem(sys.modules, ".".join(parts[:k]), types.ModuleType(".".join(parts[:k])))
        sys.modules[module].AttributeDict = cls
        yield cls


def climax_state_dict(src: TopoFlowClimaX) -> dict[str, Tensor]:
    """`src`'s weights in the key layout of ClimaX's released checkpoints: the Lightning module's `net.` prefix and
    ClimaX's older `channel_*` names (`channel_embed`, `channel_query`, `channel_agg.*`), which ClimaX's
    load_pretrained_weights renames to `var_*` (microsoft/ClimaX src/climax/global_forecast/module.py).
    `lead_phase_embed` is ours, not ClimaX's."""
    return {f"net.{k.replace('var_', 'channel_')}": v for k, v in src.state_dict().items()
            if not k.startswith("lead_phase_embed")}


def save_climax_checkpoint(path: Path, src: TopoFlowClimaX, hparams: str) -> None:
    """A Lightning checkpoint as ClimaX writes it (state_dict, epoch, global_step, versions, hyper_parameters),
    with `default_vars` (ClimaX's name for its variable list, climax.arch.ClimaX) in hyper_parameters held in
    an argparse.Namespace or an AttributeDict (`hparams`: "namespace" or the AttributeDict's module), next to
    what Lightning also stores there: numbers, strings, lists and paths."""
    values = {"default_vars": list(src.in_vars), "lr": 5e-4, "betas": [0.9, 0.99], "warmup_epochs": 10000,
              "pretrained_path": "", "root_dir": Path("/datadrive/datasets/5.625deg_equally_np")}
    payload = {"state_dict": climax_state_dict(src), "epoch": 49, "global_step": 100000,
               "pytorch-lightning_version": "1.9.0", "hparams_name": "kwargs"}
    if hparams == "namespace":
        torch.save({**payload, "hyper_parameters": argparse.Namespace(**values)}, path)
        return
    with lightning_importable(hparams) as attribute_dict:
        torch.save({**payload, "hyper_parameters": attribute_dict(values)}, path)


def encoder_output(net: TopoFlowClimaX, x: Tensor, variables: list[str]) -> Tensor:
    """The backbone's output (after its final norm, before the head)."""
    seen: list[Tensor] = []
    handle = net.norm.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        net.eval()(x, torch.tensor([24.0, 48.0]), variables)
    handle.remove()
    return seen[0]


def loaded_in_the_right_order(src: TopoFlowClimaX) -> TopoFlowClimaX:
    """The same weights put into a model of MODEL_VARS by hand, variable by variable (the test's oracle)."""
    net, sd = target(MODEL_VARS, physics=False), src.state_dict()
    manual = {k: v for k, v in sd.items() if not k.startswith(("token_embeds.", "var_embed", "head.4"))}
    manual["var_embed"] = net.var_embed.detach().clone()
    for i, var in enumerate(MODEL_VARS):
        if var in CLIMAX_NAME:
            j = CKPT_VARS.index(CLIMAX_NAME[var])
            manual.update({f"token_embeds.{i}.proj.{p}": sd[f"token_embeds.{j}.proj.{p}"] for p in ("weight", "bias")})
            manual["var_embed"][:, i] = sd["var_embed"][:, j]
    net.load_state_dict(manual, strict=False)
    return net


@pytest.mark.parametrize("hparams", ["namespace", "lightning.fabric.utilities.data",
                                     "pytorch_lightning.utilities.parsing"])
def test_climax_lightning_checkpoint_loads_by_name_with_weights_only(tmp_path, hparams):
    src = climax_like(CKPT_VARS, grid=LAYOUT.grid, outputs=CKPT_VARS)  # ClimaX's head predicts its inputs
    path = tmp_path / "climax.ckpt"
    save_climax_checkpoint(path, src, hparams)
    assert "lightning" not in sys.modules and "pytorch_lightning" not in sys.modules
    net = target(MODEL_VARS, physics=False)
    report = load_pretrained(net, path)
    assert report.variable_source == "hyper_parameters default_vars"
    assert report.variables == {
        "u": "<- '10m_u_component_of_wind' (checkpoint index 5)", "v": "<- '10m_v_component_of_wind' (checkpoint index 3)",
        "temp": "<- '2m_temperature' (checkpoint index 0)", "pm25": "left at init (the checkpoint has no such variable)",
        "elevation": "<- 'orography' (checkpoint index 1)"}
    assert "variable u: <- '10m_u_component_of_wind'" in report.summary()
    assert report.renamed["net.channel_embed"] == "var_embed" and report.renamed["net.channel_agg.in_proj_weight"] == "var_agg.in_proj_weight"
    assert set(report.dropped) == {"head.4.weight", "head.4.bias"}
    assert report.partial == {"var_embed": "rows of ['pm25'] left at init"}
    assert any("'geopotential_500'" in k for k in report.unexpected)
    oracle = loaded_in_the_right_order(src)
    for key, value in oracle.state_dict().items():
        torch.testing.assert_close(net.state_dict()[key], value, rtol=0, atol=0, msg=key)
    x = torch.randn(2, len(MODEL_VARS), *LAYOUT.grid)
    torch.testing.assert_close(encoder_output(net, x, MODEL_VARS), encoder_output(oracle, x, MODEL_VARS), rtol=0, atol=0)
    # on the variables both know, the loaded model computes exactly what the checkpoint's model computed
    shared = ["u", "v", "temp", "elevation"]
    x_src = x[:, [MODEL_VARS.index(v) for v in shared]]
    torch.testing.assert_close(encoder_output(net, x_src, shared),
                               encoder_output(src, x_src, [CLIMAX_NAME[v] for v in shared]), rtol=1e-6, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(ckpt=st.permutations(CKPT_VARS), model=st.permutations(MODEL_VARS))
def test_any_order_loads_by_name(ckpt, model):
    src = climax_like(list(ckpt), grid=LAYOUT.grid, embed_dim=8, depth=1, num_heads=2)
    torch.manual_seed(0)
    net = TopoFlowClimaX(ModelConfig(embed_dim=8, depth=1, num_heads=2, physics={"enabled": False}), model,
                         ["pm25", "pm10"], LAYOUT)
    report = load_pretrained(net, {"state_dict": climax_state_dict(src), "variables": list(ckpt)})
    for i, var in enumerate(model):
        if var in CLIMAX_NAME:
            j = list(ckpt).index(CLIMAX_NAME[var])
            assert torch.equal(net.token_embeds[i].proj.weight, src.token_embeds[j].proj.weight), var
            assert torch.equal(net.var_embed[0, i], src.var_embed[0, j]), var
    assert sorted(report.variables) == sorted(model)


def test_unnamed_checkpoint_needs_names_or_the_positional_flag():
    src = climax_like(["u", "v"], grid=(8, 16), outputs=("pm25", "pm10", "so2"))
    unnamed = dict(src.state_dict())
    with pytest.raises(CheckpointError, match=r"does not name its variables.*train\.init_variables.*positional"):
        load_pretrained(target(), unnamed)
    report = load_pretrained(target(), unnamed, variables="positional")
    assert report.variable_source == "positional (train.init_variables)"
    assert report.variables["u"] == "<- checkpoint index 0" and report.variables["temp"].startswith("left at init")
    assert set(report.dropped) == {"head.4.weight", "head.4.bias"}
    assert "token_embeds.2.proj.weight" in report.missing and "head.4.weight" not in report.missing
    assert "head.4.weight" not in report.loaded and "blocks.1.attn.qkv.weight" in report.loaded
    named = load_pretrained(target(), unnamed, variables=["v", "u"])  # train.init_variables: names in its order
    assert named.variables["u"] == "<- 'u' (checkpoint index 1)"


def test_init_variables_must_fit_the_checkpoint():
    src = climax_like(["u", "v"])
    with pytest.raises(CheckpointError, match=r"has 2 variable embeddings but its variable names \(train\.init_variables\) list 3"):
        load_pretrained(target(), dict(src.state_dict()), variables=["u", "v", "temp"])
    with pytest.raises(CheckpointError, match=r"names its variables \(variables: \['u', 'v'\]\) but train\.init_variables"):
        load_pretrained(target(), {**src.state_dict(), "variables": ["u", "v"]}, variables=["v", "u"])


def test_climax_keyword_names_climax_default_vars():
    src = climax_like(list(CLIMAX_DEFAULT_VARS), embed_dim=8, depth=1, num_heads=2)
    torch.manual_seed(0)
    net = TopoFlowClimaX(ModelConfig(embed_dim=8, depth=1, num_heads=2), ["u", "v", "lat2d", "elevation", "pm25"],
                         ["pm25"], LAYOUT)
    report = load_pretrained(net, {"state_dict": climax_state_dict(src)}, variables="climax")
    assert report.variables["lat2d"] == "<- 'lattitude' (checkpoint index 2)"  # ClimaX's spelling
    assert report.variables["u"] == "<- '10m_u_component_of_wind' (checkpoint index 4)"
    assert report.variable_source == "train.init_variables (climax)"


def test_parallel_patch_embedding_is_split_per_variable():
    src = climax_like(["v", "u"])
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("token_embeds.")}
    sd["token_embeds.proj_weights"] = torch.stack([t.proj.weight for t in src.token_embeds])  # (V, D, 1, p, p)
    sd["token_embeds.proj_biases"] = torch.stack([t.proj.bias for t in src.token_embeds])  # (V, D)
    net = target()
    report = load_pretrained(net, {"state_dict": sd, "variables": ["v", "u"]})
    assert report.renamed["token_embeds.proj_weights"] == "token_embeds.{0..1}.proj.weight"
    torch.testing.assert_close(net.token_embeds[0].proj.weight, src.token_embeds[1].proj.weight, rtol=0, atol=0)
    torch.testing.assert_close(net.token_embeds[1].proj.bias, src.token_embeds[0].proj.bias, rtol=0, atol=0)


def test_other_grid_is_interpolated_and_physics_left_at_init(tmp_path):
    src_vars = ["v", "u", "temp", "cloud"]
    src = climax_like(src_vars)
    sd = src.state_dict()
    path = tmp_path / "climax.ckpt"
    torch.save({"state_dict": {f"net.{k}": t for k, t in sd.items()}, "variables": src_vars, "epoch": 3}, path)
    net = target()
    report = load_pretrained(net, path)
    assert "blocks.0.attn.physics.alpha" in report.missing and "blocks.0.attn.physics.alpha" not in report.loaded
    assert {"token_embeds.3.proj.weight", "token_embeds.3.proj.bias"} <= set(report.missing)
    assert set(report.reshaped) == {"pos_embed"} and "(1, 8, 32) -> (1, 32, 32)" in report.reshaped["pos_embed"]
    assert any(k.startswith("token_embeds.3.") and "cloud" in k for k in report.unexpected)
    assert not report.dropped and "pos_embed" in report.loaded
    torch.testing.assert_close(net.token_embeds[0].proj.weight, sd["token_embeds.1.proj.weight"])
    torch.testing.assert_close(net.var_embed[0, 1], sd["var_embed"][0, 0])
    torch.testing.assert_close(net.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])
    torch.testing.assert_close(net.blocks[0].attn.physics.alpha, torch.tensor([2.0]))  # left at init


def test_own_checkpoint_round_trip(tmp_path):
    net = target()
    with torch.no_grad():
        net.blocks[0].attn.physics.alpha.fill_(3.5)
    path = tmp_path / "own.pt"
    config = {"data": {"variables": [{"name": v, "units": "1"} for v in net.in_vars]}}  # as `train fit` writes it
    torch.save({"model": net.state_dict(), "step": 5, "config": config}, path)
    other = target()
    report = load_pretrained(other, path)
    assert report.missing == [] and report.unexpected == [] and report.dropped == {} and report.partial == {}
    assert report.variable_source == "config.data.variables" and report.fresh(other) == []
    for (k, a), b in zip(net.state_dict().items(), other.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


class Unvetted:
    """A class no allow-list knows."""


def test_a_pickled_class_off_the_allow_list_is_named(tmp_path):
    path = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": target().state_dict(), "hyper_parameters": {"callback": Unvetted()}}, path)
    with pytest.raises(CheckpointError, match=r"(?s)foreign\.ckpt holds a pickled tests\.model\.test_checkpoint\."
                                              r"Unvetted, which is not on the allow-list.*re-save its weights"):
        load_pretrained(target(), path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, damage):
    path = tmp_path / "bad.ckpt"
    if damage != "missing":
        torch.save(target().state_dict(), path)
        blob = path.read_bytes()
        path.write_bytes(blob[: len(blob) // 2] if damage == "truncate" else b"not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="bad.ckpt"):
        load_pretrained(target(), path)
