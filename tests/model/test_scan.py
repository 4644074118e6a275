"""The torch scan-order function agrees exactly with the pipeline's numpy rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.scan import scan_order_from_wind
from pipeline.scan import scan_orders

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    shape=st.sampled_from([((8, 16), 2, (2, 2)), ((12, 12), 3, (2, 1)), ((32, 64), 2, (4, 8))]),
    scale=st.sampled_from([0.2, 1.0, 8.0]),
    mode=st.sampled_from(["regional", "global", "none"]),
)
def test_agrees_with_pipeline(seed, shape, scale, mode):
    (h, w), patch, regions = shape
    rng = np.random.default_rng(seed)
    u, v = (rng.normal(0, scale, size=(3, h, w)).astype(np.float32) for _ in range(2))
    want, _ = scan_orders(u, v, patch, regions, mode=mode)
    got = scan_order_from_wind(torch.from_numpy(u), torch.from_numpy(v), patch, regions, mode=mode)
    np.testing.assert_array_equal(got.numpy(), want.astype(np.int64))


@pytest.mark.parametrize("mode", ["regional", "global"])
def test_agrees_on_the_reference_grid(mode):
    """128x256 cells, patch 2 -> 64x128 patches in 32x32 regions, with calm and exact-sector winds."""
    rng = np.random.default_rng(3)
    u = rng.normal(0, 3, size=(2, 128, 256)).astype(np.float32)
    v = rng.normal(0, 3, size=(2, 128, 256)).astype(np.float32)
    u[0, :4, :8], v[0, :4, :8] = 0.01, 0.0  # a calm region
    u[1, :4, :8], v[1, :4, :8] = 3.0, 3.0  # exactly north-east (sector 2)
    want, _ = scan_orders(u, v, 2, (32, 32), mode=mode)
    got = scan_order_from_wind(torch.from_numpy(u), torch.from_numpy(v), 2, (32, 32), mode=mode)
    np.testing.assert_array_equal(got.numpy(), want.astype(np.int64))
    assert all(torch.equal(row.sort().values, torch.arange(8192)) for row in got)


def test_easterly_wind_scans_west_to_east():
    u, v = torch.full((4, 8), 5.0), torch.zeros(4, 8)
    order = scan_order_from_wind(u, v, 2, (1, 1))
    cols = order % 4
    assert torch.all(cols[1:] >= cols[:-1])
