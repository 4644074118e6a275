"""The vectorised scan rule against a slow, obviously-correct per-region Python reference (DESIGN.md)."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.scan import mean_wind, orders_from_sectors, patch_mean, region_wind_sums, scan_orders, snap_sector


def reference_orders(u, v, patch_size, regions, sectors=16, calm=0.5):
    """for region: mean wind -> nearest sector -> sort its patch centres by projection (ties raster)."""
    h, w = u.shape
    gh, gw = h // patch_size, w // patch_size
    ry, rx = regions
    rh, rw = gh // ry, gw // rx
    order, sector_of = [], []
    for reg_r in range(ry):
        for reg_c in range(rx):
            cells = (slice(reg_r * rh * patch_size, (reg_r + 1) * rh * patch_size),
                     slice(reg_c * rw * patch_size, (reg_c + 1) * rw * patch_size))
            uu, vv = u[cells].astype(np.float64).ravel(), v[cells].astype(np.float64).ravel()
            speed = [math.hypot(a, b) for a, b in zip(uu, vv)]
            total = sum(speed)
            um = sum(s * a for s, a in zip(speed, uu)) / total if total > 0 else 0.0
            vm = sum(s * b for s, b in zip(speed, vv)) / total if total > 0 else 0.0
            patches = [(r, c) for r in range(rh) for c in range(rw)]  # raster order, row 0 = south
            if math.hypot(um, vm) < calm:
                sector_of.append(-1)
                ranked = patches
            else:
                angle = math.atan2(vm, um)
                dists = []
                for k in range(sectors):
                    d = (angle - 2 * math.pi * k / sectors) % (2 * math.pi)
                    dists.append(min(d, 2 * math.pi - d))
                best = min(range(sectors), key=lambda k: (dists[k], k))
                sector_of.append(best)
                theta = 2 * math.pi * best / sectors
                ranked = sorted(patches, key=lambda rc: (round(rc[1] * math.cos(theta) + rc[0] * math.sin(theta), 9),
                                                         rc[0] * rw + rc[1]))
            for r, c in ranked:
                order.append((reg_r * rh + r) * gw + reg_c * rw + c)
    return np.array(order), np.array(sector_of)


def random_wind(seed: int, shape: tuple[int, int], scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Winds with a random mean flow plus noise; small scales make calm regions likely."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(0, scale, size=2)
    u = (mean[0] + rng.normal(0, scale, size=shape)).astype(np.float32)
    v = (mean[1] + rng.normal(0, scale, size=shape)).astype(np.float32)
    return u, v


def assert_region_contiguous(order: np.ndarray, patch_grid: tuple[int, int], regions: tuple[int, int]) -> None:
    gh, gw = patch_grid
    ry, rx = regions
    rh, rw = gh // ry, gw // rx
    row, col = np.divmod(order, gw)
    region_of = (row // rh) * rx + col // rw
    assert (region_of == np.repeat(np.arange(ry * rx), rh * rw)).all()


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    patch=st.integers(1, 3),
    regions=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    region_patches=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    scale=st.sampled_from([0.05, 0.3, 2.0, 10.0]),
    sectors=st.sampled_from([4, 8, 16]),
)
def test_matches_reference_on_random_winds(seed, patch, regions, region_patches, scale, sectors):
    ry, rx = regions
    gh, gw = ry * region_patches[0], rx * region_patches[1]
    u, v = random_wind(seed, (gh * patch, gw * patch), scale)
    order, sector = scan_orders(u, v, patch, regions, sectors=sectors)
    want_order, want_sector = reference_orders(u, v, patch, regions, sectors)
    np.testing.assert_array_equal(sector, want_sector)
    np.testing.assert_array_equal(order, want_order)
    assert sorted(order.tolist()) == list(range(gh * gw))
    assert_region_contiguous(order, (gh, gw), regions)


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), scale=st.sampled_from([0.3, 5.0]))
def test_reference_grid_64x128_patches_32x32_regions(seed, scale):
    u, v = random_wind(seed, (128, 256), scale)
    order, sector = scan_orders(u, v, 2, (32, 32))
    want_order, want_sector = reference_orders(u, v, 2, (32, 32))
    np.testing.assert_array_equal(sector, want_sector)
    np.testing.assert_array_equal(order, want_order)
    assert order.dtype == np.int16
    assert_region_contiguous(order, (64, 128), (32, 32))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), t=st.integers(1, 4))
def test_batched_time_steps_equal_single_steps(seed, t):
    u, v = random_wind(seed, (t, 8, 16), 3.0)
    orders, sectors = scan_orders(u, v, 2, (2, 2))
    glob, _ = scan_orders(u, v, 2, (2, 2), mode="global")
    for i in range(t):
        np.testing.assert_array_equal(orders[i], reference_orders(u[i], v[i], 2, (2, 2))[0])
        np.testing.assert_array_equal(glob[i], reference_orders(u[i], v[i], 2, (1, 1))[0])
        assert sorted(orders[i].tolist()) == list(range(32))


def test_flow_toward_east_orders_west_to_east():
    u, v = np.full((8, 16), 5.0, np.float32), np.zeros((8, 16), np.float32)
    order, sector = scan_orders(u, v, 2, (2, 2))
    assert (sector == 0).all()
    gw, rh, rw = 8, 2, 4
    row, col = np.divmod(order.reshape(4, rh * rw), gw)
    assert (np.diff(col, axis=1) >= 0).all()  # columns never step back west inside a region
    # first region: column 0 (rows 0, 1 in raster order), then column 1, ...
    np.testing.assert_array_equal(order[:8], [0, 8, 1, 9, 2, 10, 3, 11])


def test_flow_toward_north_orders_south_to_north():
    u, v = np.zeros((8, 16), np.float32), np.full((8, 16), 5.0, np.float32)
    order, sector = scan_orders(u, v, 2, (1, 1))
    assert (sector == 4).all()
    np.testing.assert_array_equal(order, np.arange(32))  # rows from the south, raster inside a row


def test_calm_regions_keep_raster_order():
    u, v = np.full((8, 16), 0.3, np.float32), np.full((8, 16), -0.3, np.float32)  # |mean| 0.42 < 0.5
    order, sector = scan_orders(u, v, 2, (2, 2))
    assert (sector == -1).all()
    np.testing.assert_array_equal(order, reference_orders(u, v, 2, (2, 2))[0])
    np.testing.assert_array_equal(order[:8], [0, 1, 2, 3, 8, 9, 10, 11])
    still, _ = scan_orders(np.zeros((8, 16)), np.zeros((8, 16)), 2, (1, 1))
    np.testing.assert_array_equal(still, np.arange(32))


def test_exact_ties_take_the_lower_sector():
    # 4 sectors: 45 deg is exactly between sector 0 (east) and 1 (north), 135 deg between 1 and 2, ...
    u = np.array([1.0, -1.0, -1.0, 1.0])
    v = np.array([1.0, 1.0, -1.0, -1.0])
    np.testing.assert_array_equal(snap_sector(u, v, 4, 0.5), [0, 1, 2, 0])
    np.testing.assert_array_equal(snap_sector(np.array([0.2, 1.0]), np.array([0.0, 0.0]), 16, 0.5), [-1, 0])


def test_none_mode_is_identity():
    u, v = random_wind(0, (2, 8, 16), 5.0)
    order, sector = scan_orders(u, v, 2, (2, 2), mode="none")
    np.testing.assert_array_equal(order, np.tile(np.arange(32), (2, 1)))
    assert (sector == -1).all()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), p=st.integers(1, 4), lead=st.integers(1, 3),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_patch_mean_is_the_mean_of_each_patch(seed, p, lead, dtype):
    a = np.random.default_rng(seed).normal(5.0, 3.0, size=(lead, 3 * p, 4 * p)).astype(np.float32)
    want = a.astype(np.float64).reshape(lead, 3, p, 4, p).mean(axis=(2, 4)).reshape(lead, 12)
    got = patch_mean(a, p, dtype)
    assert got.dtype == dtype and got.shape == (lead, 12)
    np.testing.assert_allclose(got, want, rtol=1e-6 if dtype is np.float32 else 1e-13, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), regions=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       cells=st.tuples(st.integers(1, 4), st.integers(1, 5)))
def test_wind_sums_give_the_weighted_mean_of_every_region_and_of_the_domain(seed, regions, cells):
    """The build's global sector adds up the regional sums; both means equal sum(|w| w) / sum(|w|)."""
    h, w = regions[0] * cells[0], regions[1] * cells[1]
    u, v = random_wind(seed, (3, h, w), 5.0)

    def direct(uu, vv):
        uu, vv = uu.astype(np.float64), vv.astype(np.float64)
        speed = np.sqrt(uu**2 + vv**2)
        return (speed * uu).sum(axis=(-2, -1)) / speed.sum(axis=(-2, -1)), \
            (speed * vv).sum(axis=(-2, -1)) / speed.sum(axis=(-2, -1))

    sums = region_wind_sums(u, v, cells)
    um, vm = mean_wind(*sums)
    for r in range(regions[0]):
        for c in range(regions[1]):
            part = (slice(None), slice(r * cells[0], (r + 1) * cells[0]), slice(c * cells[1], (c + 1) * cells[1]))
            np.testing.assert_allclose((um[:, r, c], vm[:, r, c]), direct(u[part], v[part]), rtol=1e-12, atol=1e-12)
    whole = mean_wind(*(s.sum(axis=(-2, -1)) for s in sums))
    np.testing.assert_allclose(whole, direct(u, v), rtol=1e-12, atol=1e-12)


def test_orders_are_fresh_arrays_not_views_of_the_cached_tables():
    sectors = np.array([[-1, 3, 7, 15]], dtype=np.int8)
    first = orders_from_sectors(sectors, (4, 4), (2, 2), 16)
    first[:] = 0
    again = orders_from_sectors(sectors, (4, 4), (2, 2), 16)
    assert sorted(again[0].tolist()) == list(range(16)) and again.flags.writeable
