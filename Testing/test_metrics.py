"""Metrics against hand-computed cases and independent implementations (MONAI, a brute-force HD95)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from scipy.spatial.distance import cdist

from diffdef import metrics
from diffdef.fields import integrate_velocity
from diffdef.geometry import Grid


def blobs(shape=(20, 18, 16), seed=0) -> np.ndarray:
    """Label map with labels 1..3 from thresholded smooth noise."""
    rng = np.random.default_rng(seed)
    noise = ndi.gaussian_filter(rng.normal(size=shape), 2.5)
    return np.digitize(noise, np.quantile(noise, [0.4, 0.6, 0.8])).astype(np.uint8)


# --------------------------------------------------------------------------------------------------- Dice
def test_dice_hand_case():
    a = np.zeros((6, 6, 6), np.uint8)
    b = np.zeros_like(a)
    a[0:2, 0:2, 0:2] = 1  # 8 voxels
    b[1:3, 0:2, 0:2] = 1  # 8 voxels, 4 shared
    a[4, 4, 4] = 2
    b[5, 5, 5] = 3
    d = metrics.dice(a, b)
    assert set(d) == {1, 2, 3}  # background excluded
    assert d[1] == pytest.approx(2 * 4 / 16) and d[2] == 0.0 and d[3] == 0.0
    assert metrics.dice(a, a) == {1: 1.0, 2: 1.0}
    assert np.isnan(metrics.dice(a, a, labels=[0, 1, 7])[7]) and 0 not in metrics.dice(a, a, labels=[0, 1])


def test_dice_matches_monai():
    from monai.metrics import compute_dice

    p, r = blobs(seed=1), blobs(seed=2)
    ours = metrics.dice(torch.from_numpy(p)[None, None], r)  # tensors (1, 1, i, j, k) are accepted too
    one_hot = lambda x: F.one_hot(torch.from_numpy(x).long(), 4).permute(3, 0, 1, 2)[None]
    theirs = compute_dice(one_hot(p), one_hot(r), include_background=False)[0]
    assert np.allclose([ours[v] for v in (1, 2, 3)], theirs.numpy(), atol=1e-6)


# ---------------------------------------------------------------------------------------------------- HD95
def brute_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """Boundary voxels (mask minus its erosion), all pairwise distances in mm, 95th percentile each way, max."""
    pts = lambda m: np.argwhere(m & ~ndi.binary_erosion(m)) * np.asarray(spacing)
    d = cdist(pts(a), pts(b))
    return max(np.quantile(d.min(1), 0.95), np.quantile(d.min(0), 0.95))


def test_hd95_hand_cases():
    a = np.zeros((10, 10, 10), np.uint8)
    b = np.zeros_like(a)
    a[5, 5, 5] = 1
    b[5, 5, 8] = 1
    assert metrics.hd95(a, b, spacing=(1.0, 1.0, 2.0)) == {1: pytest.approx(6.0)}
    b[5, 5, 8], b[2, 5, 5] = 0, 1  # 3 voxels along i at 1.5 mm
    assert metrics.hd95(a, b, spacing=(1.5, 1.0, 2.0))[1] == pytest.approx(4.5)
    assert metrics.hd95(a, a, spacing=2.0) == {1: 0.0}
    a[0, 0, 0] = 2
    h = metrics.hd95(a, b, labels=[1, 2, 3])
    assert h[2] == float("inf") and np.isnan(h[3])


def test_hd95_uses_grid_spacing_and_matches_brute_force():
    p, r = blobs(seed=3), blobs(seed=4)
    affine = np.diag([1.5, 0.75, 2.0, 1.0])
    ours = metrics.hd95(p, r, Grid(p.shape, affine))
    for v in (1, 2, 3):
        assert ours[v] == pytest.approx(brute_hd95(p == v, r == v, (1.5, 0.75, 2.0)), rel=1e-4)


# -------------------------------------------------------------------------------------------- fields
def test_folding_ratio_detects_planted_fold():
    u = torch.zeros(1, 3, 12, 12, 12, dtype=torch.float64)
    assert metrics.folding_ratio(u) == 0.0
    # along i inside a slab, u_i = -1.5 i => d(i + u_i)/di = -0.5 < 0: the map folds there
    ii = torch.arange(12, dtype=torch.float64)
    u[0, 0, 4:8, 3:9, 3:9] = (-1.5 * ii[4:8])[:, None, None]
    det = metrics._det_j(u)
    expected = 100.0 * float((det <= 0).double().mean())
    assert expected > 0
    assert metrics.folding_ratio(u) == pytest.approx(expected)
    # all voxels with the planted slope are caught
    assert (det[0, 0, 5:7, 3:9, 3:9] <= 0).all()
    # a det J map works as input; a mask restricts the count to where the fold is
    assert metrics.folding_ratio(det[0, 0].numpy()) == pytest.approx(expected)
    mask = np.zeros((12, 12, 12), bool)
    mask[5:7, 3:9, 3:9] = True
    assert metrics.folding_ratio(u, mask=mask) == 100.0
    assert metrics.folding_ratio(u, mask=~mask) < expected


def test_integrated_velocity_does_not_fold():
    g = torch.Generator().manual_seed(0)
    v = 3.0 * F.interpolate(torch.randn(1, 3, 4, 4, 4, generator=g), size=(16, 16, 16), mode="trilinear",
                            align_corners=True)
    assert metrics.folding_ratio(v) > 0  # the same field used directly as a displacement folds
    assert metrics.folding_ratio(integrate_velocity(v)) == 0.0


def test_smoothness():
    shape = (10, 10, 10)
    ii = torch.arange(10, dtype=torch.float64)[:, None, None].expand(shape)
    u = torch.zeros(1, 3, *shape, dtype=torch.float64)
    u[0, 1] = 0.3 * ii - 1.0  # affine map: det J constant
    assert metrics.smoothness(u) == pytest.approx(0.0, abs=1e-12)
    u = torch.zeros(1, 3, *shape, dtype=torch.float64)
    u[0, 0] = 0.01 * ii**2  # det J = 1 + 0.02 i: |grad det J| = 0.02 per voxel
    inner = np.zeros(shape, bool)
    inner[2:-2] = True
    assert metrics.smoothness(u, mask=inner) == pytest.approx(0.02)
    grid = Grid(shape, np.diag([2.0, 1.0, 1.0, 1.0]))
    assert metrics.smoothness(u, mask=inner, grid=grid) == pytest.approx(0.01)  # per mm
    rotated = Grid(shape, np.array([[0, -2.0, 0, 0], [2.0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
    assert metrics.smoothness(u, mask=inner, grid=rotated) == pytest.approx(0.01)


def test_centrality():
    shape = (5, 6, 7)
    g = torch.Generator().manual_seed(1)
    u = torch.randn(1, 3, *shape, generator=g, dtype=torch.float64)
    assert metrics.centrality(torch.cat([u, -u])) == pytest.approx(0.0)
    c = torch.zeros(1, 3, *shape, dtype=torch.float64)
    c[:, 0], c[:, 2] = 3.0, 4.0  # |c| = 5 mm; mean of {c, 0} has length 2.5 mm
    assert metrics.centrality([c[0], torch.zeros(3, *shape)]) == pytest.approx(2.5)
    assert metrics.centrality([c.numpy(), np.zeros((1, 3, *shape))]) == pytest.approx(2.5)
    # voxel units of a 2 mm grid: 2.5 voxels -> 5 mm
    assert metrics.centrality([c, 0 * c], grid=Grid(shape, np.diag([2.0, 2.0, 2.0, 1.0]))) == pytest.approx(5.0)
    # mask: mean over the masked voxels only
    half = torch.zeros(1, 3, *shape, dtype=torch.float64)
    half[:, 0, :2] = 2.0
    mask = np.zeros(shape, bool)
    mask[:2] = True
    assert metrics.centrality(half, mask=mask) == pytest.approx(2.0)
    assert metrics.centrality(half) == pytest.approx(2.0 * 2 / 5)


# ---------------------------------------------------------------------------------------------- images
def test_ncc_hand_cases():
    assert metrics.ncc([1.0, 2.0, 3.0], [1.0, 3.0, 2.0]) == pytest.approx(0.5)
    a = np.random.default_rng(5).normal(size=(6, 7, 8))
    assert metrics.ncc(a, 2 * a + 3) == pytest.approx(1.0)
    assert metrics.ncc(torch.from_numpy(a), -a) == pytest.approx(-1.0)
    mask = np.zeros(a.shape, bool)
    mask[:3] = True
    b = a.copy()
    b[3:] = np.random.default_rng(6).normal(size=b[3:].shape)
    assert metrics.ncc(a, b, mask=mask) == pytest.approx(1.0) and metrics.ncc(a, b) < 0.9
    with pytest.raises(ValueError, match="constant"):
        metrics.ncc(np.ones(5), np.arange(5.0))


def test_local_ncc():
    a = ndi.gaussian_filter(np.random.default_rng(7).normal(size=(16, 16, 16)), 1.0)
    assert metrics.local_ncc(a, 3 * a + 1, window=5, eps=1e-12) == pytest.approx(1.0, abs=1e-6)
    assert metrics.local_ncc(a, -a, window=5, eps=1e-12) == pytest.approx(-1.0, abs=1e-6)
    noisy = a + np.random.default_rng(8).normal(scale=a.std(), size=a.shape)
    assert 0.2 < metrics.local_ncc(a, noisy, window=5) < 0.95


def test_ssim_hand_cases():
    a = np.random.default_rng(9).uniform(size=(12, 12, 12))
    assert metrics.ssim(a, a, data_range=1.0) == pytest.approx(1.0)
    # two constant images: only the luminance term is left, (2 m1 m2 + C1) / (m1^2 + m2^2 + C1)
    m1, m2, c1 = 0.2, 0.6, (0.01 * 1.0) ** 2
    got = metrics.ssim(np.full((9, 9, 9), m1), np.full((9, 9, 9), m2), data_range=1.0)
    assert got == pytest.approx((2 * m1 * m2 + c1) / (m1**2 + m2**2 + c1), rel=1e-6)
    # data_range scales C1: with a range of 10, C1 = 0.01
    got = metrics.ssim(np.full((9, 9, 9), m1), np.full((9, 9, 9), m2), data_range=10.0)
    assert got == pytest.approx((2 * m1 * m2 + 0.01) / (m1**2 + m2**2 + 0.01), rel=1e-6)
    noisy = np.clip(a + np.random.default_rng(10).normal(scale=0.2, size=a.shape), 0, 1)
    assert metrics.ssim(a, noisy, data_range=1.0) < metrics.ssim(a, 0.5 * a + 0.5 * noisy, data_range=1.0) < 1.0


@pytest.mark.parametrize("data_range", [1.0, 4.0])
def test_ssim_matches_monai(data_range):
    from monai.metrics import SSIMMetric

    rng = np.random.default_rng(11)
    a = ndi.gaussian_filter(rng.uniform(size=(14, 13, 12)), 1.0)
    b = np.clip(a + rng.normal(scale=0.05, size=a.shape), 0, 1)
    theirs = SSIMMetric(spatial_dims=3, data_range=data_range, win_size=7, kernel_sigma=1.5)(
        torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None])
    assert metrics.ssim(a, b, data_range=data_range) == pytest.approx(float(theirs.mean()), abs=2e-3)


# ---------------------------------------------------------------------------------------------- errors
def test_metric_input_errors():
    a = blobs((8, 8, 8))
    with pytest.raises(ValueError, match="Shape mismatch"):
        metrics.dice(a, a[:-1])
    with pytest.raises(ValueError, match="Shape mismatch"):
        metrics.ncc(np.ones((4, 4, 4)), np.ones((4, 4, 5)))
    with pytest.raises(ValueError, match="3-D label map"):
        metrics.hd95(np.zeros((4, 4, 4, 2)), np.zeros((4, 4, 4, 2)))
    with pytest.raises(ValueError, match="integer labels"):
        metrics.dice(a + 0.5, a)
    nan = np.ones((8, 8, 8))
    nan[1, 1, 1] = np.nan
    for call in (lambda: metrics.ncc(nan, nan), lambda: metrics.ssim(nan, nan, 1.0), lambda: metrics.dice(nan, nan),
                 lambda: metrics.folding_ratio(nan)):
        with pytest.raises(ValueError, match="NaN"):
            call()
    with pytest.raises(ValueError, match="2 channels"):
        metrics.folding_ratio(torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="components"):
        metrics.centrality(torch.zeros(2, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="Shape mismatch"):
        metrics.centrality([torch.zeros(3, 4, 4, 4), torch.zeros(3, 4, 4, 5)])
    with pytest.raises(ValueError, match="does not fit"):
        metrics.folding_ratio(torch.zeros(1, 3, 4, 4, 4), mask=np.ones((3, 3, 3), bool))
    with pytest.raises(ValueError, match="at least 7 voxels"):
        metrics.ssim(np.ones((5, 5, 5)), np.ones((5, 5, 5)), 1.0)
    with pytest.raises(ValueError, match="positive"):
        metrics.hd95(a, a, spacing=(1.0, 0.0, 1.0))
