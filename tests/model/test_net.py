"""Backbone behaviour: scan consistency (side fields permuted with tokens), names, variables, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model import ModelConfig, TopoFlowClimaX, estimate_memory
from model.__main__ import main as model_cli
from topoflow.layout import PatchLayout

pytestmark = pytest.mark.usefixtures("torch_single_thread")

VARS = ["u", "v", "temp", "pm25", "elevation"]
LAYOUT = PatchLayout(grid=(8, 16), patch_size=2, regions=(2, 2))  # 4x8 patches = 32 tokens, 2x4 patches per region
GRID = LAYOUT.grid
L = 32


def make(seed: int = 0, **cfg) -> TopoFlowClimaX:
    torch.manual_seed(seed)
    physics = {"wind_mod": "local", "rel_pos_bias": True, "num_buckets": 8, "alpha_per_head": True, "granularity": "region", "blocks": [0, 1], "decay": 0.5}
    physics.update(cfg.pop("physics", {}))
    net = TopoFlowClimaX(ModelConfig(embed_dim=32, depth=2, num_heads=4, chunk_size=5, physics=physics, **cfg), VARS, ["pm25", "pm10"], LAYOUT)
    with torch.no_grad():  # non-trivial physics tables, as after training
        for blk in net.blocks:
            if blk.attn.physics is not None and blk.attn.physics.cfg.rel_pos_bias:
                blk.attn.physics.rel_pos_row.normal_()
                blk.attn.physics.rel_pos_col.normal_()
    net.set_static(torch.rand(L) * 3000)
    return net.eval()


def batch(b: int = 3, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, len(VARS), *GRID, generator=gen)
    orders = torch.stack([torch.randperm(L, generator=gen) for _ in range(b)])
    return x, torch.tensor([12.0, 24.0, 96.0][:b]), orders, torch.rand(b, L, generator=gen) * 12


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    form=st.sampled_from(["additive", "multiplicative"]),
    direction=st.sampled_from(["uphill", "key_higher"]),
    wind_mod=st.sampled_from(["none", "global", "local"]),
    granularity=st.sampled_from(["patch", "region"]),
)
def test_spatial_scan_pos_output_is_independent_of_the_scan_order(seed, form, direction, wind_mod, granularity):
    """Holds only if elevation, wind speed and coordinates are permuted exactly like the tokens."""
    net = make(physics={"form": form, "direction": direction, "wind_mod": wind_mod, "granularity": granularity})
    x, lt, orders, ws = batch(seed=seed)
    with torch.no_grad():
        plain = net(x, lt, VARS, None, ws)
        scanned = net(x, lt, VARS, orders, ws)
    assert plain.shape == (3, 2, *GRID)
    torch.testing.assert_close(scanned, plain, rtol=1e-5, atol=1e-6)
    assert plain.abs().max() > 1e-4  # a real signal, far above atol


def test_sequence_scan_pos_depends_on_the_order():
    net = make(scan_pos="sequence")
    x, lt, orders, ws = batch()
    with torch.no_grad():
        diff = (net(x, lt, VARS, None, ws) - net(x, lt, VARS, orders, ws)).abs().max()
    assert diff > 1e-4


def test_physics_changes_the_output_and_alpha_gets_gradients():
    net = make().train()
    x, lt, orders, ws = batch()
    out = net(x, lt, VARS, orders, ws)
    out.square().mean().backward()
    alphas = net.physics_alphas()
    assert set(alphas) == {"blocks.0", "blocks.1"}
    torch.testing.assert_close(alphas["blocks.1"], torch.full((4,), 1.0))  # alpha_init * decay**1
    for i in (0, 1):
        grad = net.blocks[i].attn.physics.alpha.grad
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    off = make(physics={"enabled": False})
    off.load_state_dict(net.state_dict(), strict=False)
    with torch.no_grad():
        assert (off.eval()(x, lt, VARS, orders, ws) - net.eval()(x, lt, VARS, orders, ws)).abs().max() > 1e-6


def test_activation_checkpointing_gives_the_same_gradients():
    x, lt, orders, ws = batch()
    grads = []
    for ckpt in (False, True):
        net = make(checkpoint_activations=ckpt).train()
        net(x, lt, VARS, orders, ws).square().mean().backward()
        grads.append([p.grad for p in net.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_variables_selected_by_name():
    net = make()
    x, lt, orders, ws = batch()
    perm = [2, 0, 4, 1, 3]
    with torch.no_grad():
        ref = net(x, lt, VARS, orders, ws)
        reordered = net(x[:, perm], lt, [VARS[i] for i in perm], orders, ws)
        subset = net(x[:, [0, 1]], lt, ["u", "v"], orders, ws)
    torch.testing.assert_close(reordered, ref, rtol=1e-5, atol=1e-6)
    assert subset.shape == ref.shape and not torch.allclose(subset, ref)


def test_climax_state_dict_names():
    keys = set(make().state_dict())
    for name in ["token_embeds.4.proj.weight", "var_embed", "var_query", "var_agg.in_proj_weight", "var_agg.out_proj.weight",
                 "pos_embed", "lead_time_embed.weight", "blocks.1.norm1.weight", "blocks.1.attn.qkv.weight",
                 "blocks.1.attn.proj.bias", "blocks.1.norm2.bias", "blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc2.bias",
                 "norm.weight", "head.0.weight", "head.2.weight", "head.4.weight", "blocks.0.attn.physics.alpha"]:
        assert name in keys, name
    assert not any(k.startswith("head.6") for k in keys)


def test_pos_embed_is_learnable_with_climax_sincos_layout():
    """ClimaX trains pos_embed and initialises it with get_2d_sincos_pos_embed (microsoft/ClimaX
    src/climax/utils/pos_embed.py), whose first half of the channels encodes the column (w), the second the row."""
    net = make()
    assert net.pos_embed.requires_grad
    dim, (rows, cols) = 32, net.grid
    pos = net.pos_embed.detach()[0].view(rows, cols, dim)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    for r, c in [(0, 0), (1, 3), (3, 7)]:
        want = torch.cat([torch.sin(c * omega), torch.cos(c * omega), torch.sin(r * omega), torch.cos(r * omega)])
        torch.testing.assert_close(pos[r, c], want.float())
    x, lt, orders, ws = batch()
    net.train()(x, lt, VARS, orders, ws).square().mean().backward()
    assert net.pos_embed.grad is not None and net.pos_embed.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: {**a, "variables": ["u", "v", "temp", "pm25", "wind"]}, "unknown to this model"),
        (lambda a: {**a, "scan_order": torch.zeros(3, L, dtype=torch.long)}, "not a permutation"),
        (lambda a: {**a, "scan_order": torch.zeros(3, L)}, "integer tensor"),
        (lambda a: {**a, "wind_speed": None}, "needs wind_speed"),
        (lambda a: {**a, "wind_speed": torch.full((3, L), float("nan"))}, "NaN"),
        (lambda a: {**a, "x": a["x"][..., :8]}, "x must be"),
    ],
)
def test_bad_inputs_are_clear_errors(mutate, match):
    net = make()
    x, lt, orders, ws = batch()
    args = mutate({"x": x, "lead_times": lt, "variables": VARS, "scan_order": orders, "wind_speed": ws})
    with pytest.raises(ValueError, match=match):
        net(**args)


def test_static_elevation_required_and_checked():
    torch.manual_seed(0)
    net = TopoFlowClimaX(ModelConfig(embed_dim=32, depth=1, num_heads=4), VARS, ["pm25"], LAYOUT)
    x, lt, orders, ws = batch()
    with pytest.raises(RuntimeError, match="set_static"):
        net(x, lt, VARS, orders, ws)
    with pytest.raises(ValueError, match="expected \\(32,\\)"):
        net.set_static(torch.zeros(31))
    with pytest.raises(ValueError, match="NaN"):
        net.set_static(torch.full((L,), float("nan")))


def test_region_granularity_uses_region_mean_elevation():
    z = torch.arange(L, dtype=torch.float32) * 10
    net = make(physics={"granularity": "region"})
    net.set_static(z)
    want = z.view(2, 2, 2, 4).mean(dim=(1, 3), keepdim=True).expand(2, 2, 2, 4).reshape(L)
    torch.testing.assert_close(net.elevation, want)


def test_memory_estimate_and_cli(capsys):
    naive, sdpa, flex = (estimate_memory("reference", 1, b) for b in ("naive", "sdpa", "flex"))
    assert naive["tokens"] == 8192 and 60e6 < naive["params"] < 80e6
    assert naive["attention_bias_bytes"] == 3 * 8 * 8192**2 * 4  # 3 N x N fp32 per head
    assert naive["attention_bias_bytes"] > sdpa["attention_bias_bytes"] > flex["attention_bias_bytes"]
    assert model_cli(["estimate", "--preset", "reference"]) == 0
    assert "params 66" in capsys.readouterr().out


def climax_params(n_in: int, n_out: int, patch: int, tokens: int, dim: int = 1024, depth: int = 8) -> int:
    """Parameters of the released ClimaX backbone (mlp_ratio 4, decoder_depth 2) counted by hand, layer by layer."""
    def linear(fan_in: int, fan_out: int) -> int:
        return fan_in * fan_out + fan_out

    token_embeds = n_in * linear(patch * patch, dim)  # one Conv2d(1, dim, patch) per input variable
    var = n_in * dim + dim + 4 * dim * dim + 4 * dim  # var_embed, var_query, var_agg (in_proj 3D x D + out_proj)
    block = 2 * dim + linear(dim, 3 * dim) + linear(dim, dim) + 2 * dim + linear(dim, 4 * dim) + linear(4 * dim, dim)
    head = 2 * linear(dim, dim) + linear(dim, n_out * patch * patch)
    return token_embeds + var + tokens * dim + linear(1, dim) + depth * block + 2 * dim + head


def test_climax_preset_has_the_released_size():
    # ours: 15 inputs, 6 targets, 32x64 patches of 4, plus lead_phase_embed (Linear(2, D)) and one physics alpha
    assert estimate_memory("climax")["params"] == climax_params(15, 6, 4, 2048) + (2 * 1024 + 1024) + 1 == 109_547_617
    # ClimaX's releases (48 default_vars in and out): the 1.40625-degree file (patch 4, 2048 tokens) is larger than the
    # 5.625-degree one (patch 2, 512 tokens) by exactly their fp32 parameter difference, with the same overhead
    # (file sizes from huggingface.co/datasets/tungnd/climax_ckpts commit b65503b)
    fine, coarse = climax_params(48, 48, 4, 2048), climax_params(48, 48, 2, 512)
    assert 443_432_223 - 4 * fine == 432_419_871 - 4 * coarse > 0


def test_lead_phase_embedding_tells_same_time_of_day_leads_apart_from_12_h():
    from model.net import lead_phase

    phase = lead_phase(torch.tensor([0.0, 12.0, 24.0, 96.0]))
    torch.testing.assert_close(phase, torch.tensor([[0.0, 1.0], [0.0, -1.0], [0.0, 1.0], [0.0, 1.0]]), atol=1e-6, rtol=0)
    net = make(physics={"enabled": False})
    assert not net.lead_phase_embed.weight.any()  # zero: a ClimaX checkpoint computes what it did in ClimaX
    x, _, _, ws = batch(b=2)
    lt = torch.tensor([12.0, 24.0])
    with torch.no_grad():
        before = net(x, lt, VARS, None, ws)
        net.lead_phase_embed.weight.normal_()
        after = net(x, lt, VARS, None, ws)
    assert (after - before).abs().amax(dim=(1, 2, 3)).min() > 1e-5  # the phase now reaches both leads' outputs
