"""Geometry: RAS <-> LPS, voxel <-> world, (i, j, k) <-> (k, j, i) at the SimpleITK boundary, grids."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from diffdef.geometry import Grid, displacement_from_mm, displacement_to_mm, from_sitk, lps_to_ras, ras_to_lps, to_sitk


from helpers import rotation  # noqa: E402


def oblique_grid(shape=(7, 6, 5), flip: bool = True) -> Grid:
    """Rotated about two axes, anisotropic (1.2, 0.9, 1.5 mm), optionally left-handed (an LAS-like flip)."""
    m = rotation(2, 0.3) @ rotation(0, -0.2) @ np.diag([1.2, 0.9, 1.5])
    if flip:
        m = np.diag([-1.0, 1.0, 1.0]) @ m
    affine = np.eye(4)
    affine[:3, :3] = m
    affine[:3, 3] = [12.5, -30.0, 7.25]
    return Grid(shape, affine)


def test_ras_lps_round_trip():
    p = np.random.default_rng(0).normal(size=(10, 3))
    lps = ras_to_lps(p)
    assert np.allclose(lps[:, :2], -p[:, :2]) and np.allclose(lps[:, 2], p[:, 2])
    assert np.allclose(lps_to_ras(lps), p)


def test_voxel_world_round_trip_oblique():
    grid = oblique_grid()
    ijk = np.random.default_rng(1).uniform(-2, 8, size=(50, 3))
    assert np.allclose(grid.world_to_voxel(grid.voxel_to_world(ijk)), ijk)
    assert np.allclose(grid.voxel_to_world([0, 0, 0]), grid.affine[:3, 3])
    assert np.allclose(grid.spacing, [1.2, 0.9, 1.5])
    assert grid.voxel_volume_ml == pytest.approx(1.2 * 0.9 * 1.5 / 1000)


@pytest.mark.parametrize("flip", [False, True])
def test_to_from_sitk_scalar_oblique(flip):
    grid = oblique_grid(flip=flip)
    array = np.random.default_rng(2).normal(size=grid.shape).astype(np.float32)
    image = to_sitk(array, grid)
    assert image.GetSize() == grid.shape  # SimpleITK sizes are (i, j, k) even though its arrays are (k, j, i)
    for ijk in [(0, 0, 0), (6, 0, 0), (1, 5, 2), (6, 5, 4)]:
        assert image.GetPixel(*ijk) == array[ijk]
        lps = image.TransformIndexToPhysicalPoint(ijk)
        assert np.allclose(lps, ras_to_lps(grid.voxel_to_world(ijk)), atol=1e-6)
    back, grid2 = from_sitk(image)
    assert np.array_equal(back, array)
    assert grid2.shape == grid.shape and np.allclose(grid2.affine, grid.affine, atol=1e-9)


def test_to_from_sitk_vector_components_are_lps():
    grid = oblique_grid()
    vec = np.random.default_rng(3).normal(size=grid.shape + (3,))
    image = to_sitk(vec, grid, is_vector=True)
    assert image.GetNumberOfComponentsPerPixel() == 3
    assert np.allclose(image.GetPixel(2, 3, 4), ras_to_lps(vec[2, 3, 4]))
    back, grid2 = from_sitk(image)
    assert np.allclose(back, vec) and grid2.same_as(grid)


def test_displacement_mm_round_trip():
    grid = oblique_grid()
    u = torch.randn(2, 3, *grid.shape, dtype=torch.float64)
    mm = displacement_to_mm(u, grid)
    # a displacement of one voxel along i is the first column of the affine, in mm
    e_i = torch.zeros(1, 3, *grid.shape, dtype=torch.float64)
    e_i[:, 0] = 1.0
    assert np.allclose(displacement_to_mm(e_i, grid)[0, :, 1, 1, 1].numpy(), grid.affine[:3, 0])
    assert torch.allclose(displacement_from_mm(mm, grid), u)


def test_downsample_and_crop():
    fine = oblique_grid((8, 12, 4))
    coarse = fine.downsample(4)
    assert coarse.shape == (2, 3, 1)
    # a coarse voxel centre is the mean of the fine voxel centres of its block
    block = np.stack(np.meshgrid(np.arange(4, 8), np.arange(8, 12), np.arange(0, 4), indexing="ij"), -1).reshape(-1, 3)
    assert np.allclose(coarse.voxel_to_world([1, 2, 0]), fine.voxel_to_world(block).mean(0))
    assert np.allclose(coarse.spacing, 4 * fine.spacing)
    crop = fine.crop((2, 3, 1), (4, 5, 2))
    assert crop.shape == (4, 5, 2)
    assert np.allclose(crop.voxel_to_world([0, 0, 0]), fine.voxel_to_world([2, 3, 1]))
    with pytest.raises(ValueError, match="divisible"):
        fine.downsample(3)


def test_grid_dict_round_trip():
    grid = oblique_grid()
    assert Grid.from_dict(grid.to_dict()).same_as(grid, tol=1e-12)


def test_grid_errors():
    with pytest.raises(ValueError, match="three positive sizes"):
        Grid((4, 4), np.eye(4))
    with pytest.raises(ValueError, match="invertible"):
        Grid((4, 4, 4), np.zeros((4, 4)))
    a, b = oblique_grid(), oblique_grid(flip=False)
    a.require_same(oblique_grid())
    with pytest.raises(ValueError, match="another grid"):
        a.require_same(b, "label map")
    with pytest.raises(ValueError, match="another grid"):
        a.require_same(Grid((7, 6, 6), a.affine), "label map")


def test_sitk_boundary_errors():
    grid = oblique_grid()
    with pytest.raises(ValueError, match="3-D array"):
        to_sitk(np.zeros(grid.shape + (2,)), grid)
    with pytest.raises(ValueError, match="3 components"):
        to_sitk(np.zeros(grid.shape + (2,)), grid, is_vector=True)
    with pytest.raises(ValueError, match="does not match grid shape"):
        to_sitk(np.zeros((3, 3, 3)), grid)
    with pytest.raises(ValueError, match="3-D image"):
        from_sitk(sitk.Image(4, 4, sitk.sitkFloat32))
    with pytest.raises(ValueError, match="3 components"):
        from_sitk(sitk.Image([4, 4, 4], sitk.sitkVectorFloat32, 2))


def test_kji_round_trip():
    """(i, j, k) <-> (k, j, i) (VTK / Slicer order): scalar and vector arrays round-trip, index meaning kept."""
    import numpy as np

    from diffdef.geometry import from_kji, to_kji

    a = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    kji = to_kji(a)
    assert kji.shape == (4, 3, 2) and kji.flags.c_contiguous and kji[3, 2, 1] == a[1, 2, 3]
    assert np.array_equal(from_kji(kji), a)
    v = np.random.default_rng(0).normal(size=(2, 3, 4, 3))
    assert to_kji(v)[3, 1, 0].tolist() == v[0, 1, 3].tolist()
    assert np.array_equal(from_kji(to_kji(v)), v)
    with pytest.raises(ValueError):
        to_kji(np.zeros((2, 3)))


@pytest.mark.parametrize("linear", [
    np.diag([1.0, 1.0, 1.0]),                                      # RAS
    np.diag([-1.0, -1.0, 1.0]),                                    # LPS
    np.array([[0.0, 0.0, -2.0], [1.5, 0.0, 0.0], [0.0, -1.0, 0.0]]),  # permuted, flipped, anisotropic
    rotation(2, 0.3) @ np.diag([-1.0, 1.0, 1.2]),                  # oblique by 17 degrees, LAS-like
    rotation(2, np.pi / 4) @ rotation(0, 0.1),                     # 45 degrees: two voxel axes equally close to R
])
def test_to_ras_axes_points_every_axis_towards_r_a_s(linear):
    """After :func:`to_ras_axes`, world R, A and S grow along the first, second and third array axis."""
    from diffdef.geometry import to_ras_axes

    affine = np.eye(4)
    affine[:3, :3] = linear
    grid = Grid((5, 6, 7), affine)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in grid.shape], indexing="ij"), axis=-1)
    world = to_ras_axes(grid.voxel_to_world(ijk), grid)  # (.., .., .., 3) RAS mm, components stay last
    for axis in range(3):
        steps = np.diff(world[..., axis], axis=axis)
        assert np.all(steps > 0), f"axis {axis} does not point towards {'RAS'[axis]}"
    assert sorted(world.shape[:3]) == sorted(grid.shape)

