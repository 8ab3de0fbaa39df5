"""Deformation fields: integration, composition, warping, resampling between grids, Jacobian determinant."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from diffdef.fields import (compose, integrate_velocity, jacobian_determinant, one_hot, reach, resample,
                            resample_displacement, warp_image, warp_image_and_labels, warp_labels, warp_probabilities)
from diffdef.geometry import Grid, displacement_to_mm, to_sitk


from helpers import rotation  # noqa: E402


def affine(matrix, origin) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3], a[:3, 3] = matrix, origin
    return a


def smooth_field(shape, amplitude, seed=0, dtype=torch.float64, knots=4) -> torch.Tensor:
    """A smooth random (1, 3, *shape) field: random knots upsampled trilinearly."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, knots, knots, knots, generator=g, dtype=dtype)
    return amplitude * F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


def test_constant_velocity_is_translation():
    v = torch.zeros(1, 3, 12, 10, 8)
    v[:, 0], v[:, 1], v[:, 2] = 1.7, -0.6, 2.25
    u = integrate_velocity(v)
    assert torch.allclose(u, v, atol=1e-5)


def sine_field(n: int, amplitude: float) -> torch.Tensor:
    """A smooth (1, 3, n, n, n) field of one period of sines and cosines, in voxels."""
    ii, jj, kk = torch.meshgrid(*[torch.arange(n, dtype=torch.float64)] * 3, indexing="ij")
    w = 2 * np.pi / n
    return amplitude * torch.stack([torch.sin(w * jj + 0.3) * torch.cos(w * kk),
                                    torch.sin(w * kk + 1.0) * torch.cos(w * ii + 0.5),
                                    torch.sin(w * ii + 2.0) * torch.cos(w * jj)])[None]


def test_integrated_map_is_invertible():
    v = sine_field(24, 2.0)
    fwd, bwd = integrate_velocity(v), integrate_velocity(-v)
    assert fwd.abs().max() > 1.5  # non-trivial: displacements of about two voxels
    inner = (slice(None), slice(None)) + (slice(4, -4),) * 3
    for a, b in ((fwd, bwd), (bwd, fwd)):
        residual = compose(a, b)[inner].norm(dim=1)
        assert residual.max() < 0.1, float(residual.max())
    assert (jacobian_determinant(fwd) > 0).all()


def test_compose_order_analytic():
    """first = linear map B x, then = translation t: warping by first then by then samples x + t + B (x + t)."""
    shape = (10, 10, 10)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"))[None]
    mat = torch.tensor([[0.05, 0.02, 0.0], [-0.03, 0.0, 0.04], [0.01, -0.02, 0.03]], dtype=torch.float64)
    linear = torch.einsum("rc,bc...->br...", mat, grid)
    t = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)
    trans = t[None, :, None, None, None].expand(1, 3, *shape)
    inner = (slice(None), slice(None)) + (slice(2, -2),) * 3
    want = trans + linear + (mat @ t)[None, :, None, None, None]
    assert torch.allclose(compose(linear, trans)[inner], want[inner], atol=1e-9)
    assert torch.allclose(compose(trans, linear)[inner], (trans + linear)[inner], atol=1e-9)


def test_compose_matches_sequential_warps():
    img = sine_field(20, 1.0)[:, :1]
    a, b = sine_field(20, 1.5), smooth_field((20, 20, 20), 0.7, seed=4)
    seq = warp_image(warp_image(img, a), b)
    once = warp_image(img, compose(a, b))
    inner = (slice(None), slice(None)) + (slice(4, -4),) * 3
    assert (seq - once)[inner].abs().max() < 0.05  # two interpolations vs one


def test_warp_integer_translation_shifts_image():
    img = torch.arange(6 * 7 * 8, dtype=torch.float32).reshape(1, 1, 6, 7, 8)
    u = torch.zeros(1, 3, 6, 7, 8)
    u[:, 0], u[:, 2] = 1.0, -2.0  # out(i, j, k) = img(i + 1, j, k - 2)
    out = warp_image(img, u)
    assert torch.allclose(out[..., :-1, :, 2:], img[..., 1:, :, :-2])


def test_warp_labels_and_probabilities():
    labels = torch.zeros(1, 1, 10, 10, 10, dtype=torch.int64)
    labels[..., 2:6, 2:8, 3:7] = 1
    labels[..., 6:9, 2:8, 3:7] = 3
    u = smooth_field((10, 10, 10), 0.8, seed=5, dtype=torch.float32)
    warped = warp_labels(labels, u)
    assert warped.dtype == labels.dtype and set(warped.unique().tolist()) <= {0, 1, 3}
    probs = warp_probabilities(one_hot(labels, 4), u)
    assert probs.shape == (1, 4, 10, 10, 10)
    assert torch.allclose(probs.sum(1), torch.ones(1, 10, 10, 10), atol=1e-5)
    # where the label map is locally constant, nearest and probabilistic agree
    sure = probs.max(1).values > 0.999
    assert torch.equal(probs.argmax(1)[sure], warped[:, 0][sure])


@pytest.mark.parametrize("amplitude", [0.3, 2.5])
def test_warp_within_the_support_equals_the_whole_warp(amplitude):
    # an image and labels that are 0 outside a box, which touches the grid's k = 0 face (as the template's brainstem):
    # restricted to the box grown by the displacement's reach, the warp is the whole grid's, bit for bit
    shape = (18, 20, 16)
    g = torch.Generator().manual_seed(3)
    image = torch.zeros(1, 1, *shape)
    image[..., 4:13, 5:15, 0:9] = torch.rand(1, 1, 9, 10, 9, generator=g) + 0.1
    labels = (image * 4).floor().long()
    u = smooth_field(shape, amplitude, seed=7, dtype=torch.float32)
    support = (np.array([4, 5, 0]), np.array([12, 14, 8]))
    whole = warp_image_and_labels(image, labels, u)
    within = warp_image_and_labels(image, labels, u, support=support)
    assert torch.equal(whole[0], within[0]) and torch.equal(whole[1], within[1])
    assert torch.allclose(whole[0], warp_image(image, u), atol=1e-5)  # MONAI's warps, to rounding
    assert (whole[1] == warp_labels(labels, u)).float().mean() > 0.999
    assert (whole[0] != 0).any(dim=(0, 1, 2, 3)).nonzero().max() > 8  # the warp does move content past the box


def test_reach_bounds_the_displacement_in_the_target_voxels():
    u = torch.zeros(1, 3, 4, 5, 6, dtype=torch.float64)
    u[0, 0, 1, 2, 3], u[0, 1, 0, 0, 0], u[0, 2, 3, 4, 5] = -2.2, 0.5, 3.0
    assert reach(u).tolist() == [4, 2, 4]  # ceil(max |u|) + 1 per axis
    coarse = Grid((4, 5, 6), affine(np.diag([4.0, 4.0, 2.0]), [0, 0, 0]))
    fine = Grid((16, 20, 12), affine(np.diag([1.0, 1.0, 1.0]), [0, 0, 0]))
    assert reach(u, coarse, fine).tolist() == [10, 3, 7]  # 8.8, 2 and 6 mm in 1 mm voxels
    # an oblique source: a component mixes into every target axis, bounded by the absolute matrix
    oblique = Grid((4, 5, 6), affine(4.0 * rotation(2, 0.3) @ rotation(0, 0.2), [0, 0, 0]))
    bound = np.abs(np.linalg.inv(fine.affine[:3, :3]) @ oblique.affine[:3, :3]) @ np.array([2.2, 0.5, 3.0])
    assert reach(u, oblique, fine).tolist() == (np.ceil(bound) + 1).astype(int).tolist()
    resampled = resample_displacement(u, oblique, fine).abs().amax(dim=(0, 2, 3, 4)).numpy()
    assert (resampled <= reach(u, oblique, fine) - 1 + 1e-9).all()


def test_jacobian_analytic():
    shape = (8, 9, 10)
    ii = torch.arange(8, dtype=torch.float64)[:, None, None].expand(shape)
    u = torch.zeros(1, 3, *shape, dtype=torch.float64)
    u[:, 0] = 0.5 * ii  # stretch along i by 1.5
    u[:, 1] = 2.0  # translation does not change the volume
    assert torch.allclose(jacobian_determinant(u), torch.full((1, 1, *shape), 1.5, dtype=torch.float64))


@pytest.mark.parametrize("oblique", [False, True])
def test_jacobian_matches_simpleitk(oblique):
    shape = (14, 12, 10)
    u = smooth_field(shape, 1.5, seed=6)
    ours = jacobian_determinant(u)[0, 0].numpy()
    assert ours.min() < 0 < ours.max()  # includes folded voxels
    if oblique:
        # ITK's filter ignores the direction matrix, so hand it the vectors in the grid's axis frame (mm along
        # i, j, k); det J is frame-invariant, so ours (in voxel units of the oblique grid) must agree.
        spacing = np.array([1.2, 0.9, 1.5])
        vec = (u[0] * torch.as_tensor(spacing)[:, None, None, None]).permute(3, 2, 1, 0).numpy()
        image = sitk.GetImageFromArray(np.ascontiguousarray(vec), isVector=True)
        image.SetSpacing(spacing.tolist())
    else:
        # a grid whose LPS direction is the identity: anisotropic spacing, RAS affine diag(-sx, -sy, sz)
        grid = Grid(shape, affine(np.diag([-1.2, -0.9, 1.5]), [5.0, 3.0, -2.0]))
        image = to_sitk(displacement_to_mm(u, grid)[0].permute(1, 2, 3, 0).numpy(), grid, is_vector=True)
    theirs = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(image, True)).transpose(2, 1, 0)
    inner = (slice(1, -1),) * 3
    assert np.abs(theirs[inner] - ours[inner]).max() < 1e-6


def test_resample_identity_and_oblique_subgrid():
    fine = Grid((8, 8, 8), affine(rotation(1, 0.4) @ np.diag([1.0, 1.5, 2.0]), [3.0, -4.0, 1.0]))
    img = smooth_field((8, 8, 8), 1.0, seed=7)[:, :1]
    assert torch.allclose(resample(img, fine, fine), img, atol=1e-6)
    sub = fine.crop((2, 1, 3), (4, 5, 3))
    assert torch.allclose(resample(img, fine, sub), img[..., 2:6, 1:6, 3:6], atol=1e-6)


@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_axis_aligned_resample_equals_grid_sample(padding):
    """Between grids that differ by a scale and shift per axis, :func:`resample` interpolates axis by axis; it
    must give grid_sample's trilinear values and padding, also where ``dst`` reaches beyond ``src``."""
    from diffdef.fields import _sampling_grid

    src = Grid((7, 9, 5), affine(rotation(1, 0.3) @ np.diag([4.0, 4.0, 3.0]), [1.0, -2.0, 0.5]))
    img = torch.randn(2, 3, *src.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for dst in (src.downsample(1), Grid((30, 40, 16), src.affine @ np.diag([0.25, 0.25, 1 / 3, 1.0])
                                        @ np.array([[1, 0, 0, -3.0], [0, 1, 0, -2.0], [0, 0, 1, -1.5], [0, 0, 0, 1]])),
                Grid((3, 4, 2), src.affine @ np.diag([2.5, 2.0, 2.0, 1.0]))):
        want = F.grid_sample(img, _sampling_grid(src, dst, img.device, img.dtype).expand(2, -1, -1, -1, -1),
                             mode="bilinear", padding_mode=padding, align_corners=True)
        got = resample(img, src, dst, padding=padding)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-12)


def test_resample_displacement_preserves_mm():
    """Working grid (4 mm, oblique) -> 1 mm grid: the displacement in mm is the same field."""
    fine = Grid((16, 20, 12), affine(rotation(2, 0.25) @ np.eye(3), [-8.0, 11.0, 4.0]))
    work = fine.downsample(4)
    # a field affine in world space (trilinear interpolation reproduces it exactly inside the coarse hull)
    mat = np.array([[0.05, -0.02, 0.01], [0.0, 0.03, 0.02], [-0.04, 0.01, 0.0]])
    shift = np.array([2.0, -1.5, 0.75])
    field_mm = lambda g: (g.voxel_to_world(np.stack(np.meshgrid(*map(np.arange, g.shape), indexing="ij"), -1))
                          @ mat.T + shift)
    coarse_mm = torch.as_tensor(field_mm(work)).permute(3, 0, 1, 2)[None]
    coarse_vox = torch.einsum("rc,bc...->br...", torch.as_tensor(np.linalg.inv(work.affine[:3, :3])), coarse_mm)
    fine_vox = resample_displacement(coarse_vox, work, fine)
    assert fine_vox.shape == (1, 3, 16, 20, 12)
    got = displacement_to_mm(fine_vox, fine)[0].permute(1, 2, 3, 0).numpy()
    want = field_mm(fine)
    hull = (slice(2, -2),) * 3  # fine voxels between the outermost coarse voxel centres (1.5 voxels in)
    assert np.abs(got[hull] - want[hull]).max() < 1e-6
    # a constant field is exact everywhere, and in voxel units it scales by the spacing ratio (4)
    const = torch.zeros(1, 3, *work.shape, dtype=torch.float64)
    const[:, 1] = 0.5
    out = resample_displacement(const, work, fine)
    assert torch.allclose(out[:, 1], torch.full_like(out[:, 1], 2.0)) and out[:, [0, 2]].abs().max() < 1e-9


def test_field_errors():
    with pytest.raises(ValueError, match="2 components"):
        jacobian_determinant(torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="velocity field must have shape"):
        integrate_velocity(torch.zeros(3, 4, 4, 4))
    bad = torch.zeros(1, 3, 4, 4, 4)
    bad[0, 1, 2, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        jacobian_determinant(bad)
    g = Grid((4, 4, 4), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        resample_displacement(bad, g, g)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_fields_on_gpu_match_cpu():
    v = smooth_field((16, 16, 16), 2.0, seed=8, dtype=torch.float32)
    img = smooth_field((16, 16, 16), 1.0, seed=9, dtype=torch.float32)[:, :1]
    u = integrate_velocity(v)
    ug = integrate_velocity(v.cuda())
    assert torch.allclose(ug.cpu(), u, atol=1e-4)
    assert torch.allclose(warp_image(img.cuda(), ug).cpu(), warp_image(img, u), atol=1e-4)
    assert torch.allclose(jacobian_determinant(ug).cpu(), jacobian_determinant(u), atol=1e-3)
