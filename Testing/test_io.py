"""I/O: NIfTI / NRRD geometry round trips, safe writes, displacement export, and the SimpleITK warping round trip."""
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from diffdef.fields import warp_image
from diffdef.geometry import Grid, displacement_to_mm, from_sitk, to_sitk
from diffdef.io import read_displacement_itk, read_image, write_displacement_itk, write_image


from helpers import rotation  # noqa: E402


def oblique_grid(shape=(18, 16, 14)) -> Grid:
    """Non-trivial affine: two rotations, anisotropic spacing, a left-right flip, an offset origin."""
    a = np.eye(4)
    a[:3, :3] = np.diag([-1.0, 1.0, 1.0]) @ rotation(2, 0.35) @ rotation(0, -0.25) @ np.diag([1.3, 0.8, 1.6])
    a[:3, 3] = [20.0, -15.5, 8.0]
    return Grid(shape, a)


def smooth(shape, channels, amplitude, seed, knots=5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, channels, knots, knots, knots, generator=g, dtype=torch.float64)
    return amplitude * F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd"])
@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_image_round_trip_keeps_geometry(tmp_path, suffix, dtype):
    grid = oblique_grid()
    array = (np.random.default_rng(0).uniform(0, 200, size=grid.shape)).astype(dtype)
    path = write_image(tmp_path / f"img{suffix}", array, grid)
    back, grid2 = read_image(path)
    assert np.array_equal(back, array) and back.dtype == array.dtype
    assert grid2.shape == grid.shape and np.allclose(grid2.affine, grid.affine, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_nifti_and_nrrd_agree_on_world_coordinates(tmp_path):
    """The same array written as NIfTI (nibabel, RAS) and NRRD (ITK, LPS) places voxels at the same point."""
    grid = oblique_grid()
    array = np.arange(np.prod(grid.shape), dtype=np.float32).reshape(grid.shape)
    write_image(tmp_path / "a.nii.gz", array, grid)
    write_image(tmp_path / "a.nrrd", array, grid)
    nii = nib.load(str(tmp_path / "a.nii.gz"))
    itk = sitk.ReadImage(str(tmp_path / "a.nrrd"))
    for ijk in [(0, 0, 0), (3, 7, 11), (17, 15, 13)]:
        ras = nii.affine[:3, :3] @ ijk + nii.affine[:3, 3]
        lps = np.array(itk.TransformIndexToPhysicalPoint(ijk))
        assert np.allclose(lps, ras * [-1, -1, 1], atol=1e-4)
        assert itk.GetPixel(*ijk) == np.asarray(nii.dataobj)[ijk]


def test_write_refuses_overwrite_and_keeps_old_file(tmp_path):
    grid = oblique_grid((4, 4, 4))
    path = write_image(tmp_path / "x.nii.gz", np.ones(grid.shape, np.float32), grid)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        write_image(path, np.zeros(grid.shape, np.float32), grid)
    assert path.read_bytes() == before
    disp = tmp_path / "d.nrrd"
    write_displacement_itk(disp, np.zeros(grid.shape + (3,)), grid)
    with pytest.raises(FileExistsError):
        write_displacement_itk(disp, np.ones(grid.shape + (3,)), grid)
    assert np.all(read_displacement_itk(disp)[0] == 0)
    write_image(path, np.zeros(grid.shape, np.float32), grid, overwrite=True)
    assert np.all(read_image(path)[0] == 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.nrrd", "x.nii.gz"]


def test_failed_write_leaves_no_file(tmp_path):
    grid = oblique_grid((4, 4, 4))
    with pytest.raises(ValueError, match="does not match grid shape"):
        write_image(tmp_path / "x.nrrd", np.zeros((3, 4, 4)), grid)
    assert list(tmp_path.iterdir()) == []


def test_read_errors(tmp_path):
    grid = oblique_grid((4, 5, 6))
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 2), np.float32), grid.affine), str(tmp_path / "four.nii.gz"))
    with pytest.raises(ValueError, match="3-D image is needed"):
        read_image(tmp_path / "four.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 1), np.float32), grid.affine), str(tmp_path / "single.nii.gz"))
    assert read_image(tmp_path / "single.nii.gz")[0].shape == (4, 5, 6)  # a singleton 4th axis is dropped
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "missing.nii.gz")
    (tmp_path / "junk.nrrd").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="Cannot read"):
        read_image(tmp_path / "junk.nrrd")
    write_image(tmp_path / "scalar.nrrd", np.zeros(grid.shape, np.float32), grid)
    with pytest.raises(ValueError, match="3 components|needs 3"):
        read_displacement_itk(tmp_path / "scalar.nrrd")


def test_displacement_write_errors(tmp_path):
    grid = oblique_grid((4, 4, 4))
    with pytest.raises(ValueError, match="3 components"):
        write_displacement_itk(tmp_path / "d.nrrd", np.zeros(grid.shape + (2,)), grid)
    bad = np.zeros(grid.shape + (3,))
    bad[1, 2, 3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        write_displacement_itk(tmp_path / "d.nrrd", bad, grid)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_displacement_round_trip(tmp_path, suffix):
    grid = oblique_grid((6, 5, 4))
    disp = np.random.default_rng(1).normal(size=grid.shape + (3,))
    path = write_displacement_itk(tmp_path / f"d{suffix}", disp, grid)
    image = sitk.ReadImage(str(path))
    assert image.GetNumberOfComponentsPerPixel() == 3 and image.GetDimension() == 3
    assert np.allclose(image.GetPixel(1, 2, 3), disp[1, 2, 3] * [-1, -1, 1], atol=1e-5)  # LPS on disk
    back, grid2 = read_displacement_itk(path)
    assert np.allclose(back, disp, atol=1e-5) and grid2.same_as(grid, tol=1e-5)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_warp_matches_simpleitk_with_exported_field(tmp_path, suffix):
    """THE round trip: our warp_image == SimpleITK's Resample with the exported field, on an oblique grid."""
    grid = oblique_grid()
    image = smooth(grid.shape, 1, 100.0, seed=2)
    disp = smooth(grid.shape, 3, 2.0, seed=3)  # voxels, up to a few voxels
    assert disp.abs().max() > 1.5
    ours = warp_image(image, disp, padding="zeros")[0, 0].numpy()

    disp_mm = displacement_to_mm(disp, grid)[0].permute(1, 2, 3, 0).numpy()
    path = write_displacement_itk(tmp_path / f"field{suffix}", disp_mm, grid)
    field = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(field)
    moving = to_sitk(image[0, 0].numpy(), grid)
    warped = sitk.Resample(moving, moving, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat64)
    theirs, grid2 = from_sitk(warped)
    assert grid2.same_as(grid)

    # compare where the sampled point lies inside the image (padding conventions differ at the very edge)
    idx = np.stack(np.meshgrid(*map(np.arange, grid.shape), indexing="ij"))
    target = idx + disp[0].numpy()
    inside = np.all((target >= 0.01) & (target <= np.array(grid.shape)[:, None, None, None] - 1.01), axis=0)
    assert inside.mean() > 0.5
    err = np.abs(ours - theirs)[inside]
    assert err.max() < 1e-3 * np.abs(ours).max(), err.max()
    # and the warp really moved things: the unwarped image differs by much more
    assert np.abs(image[0, 0].numpy() - theirs)[inside].max() > 100 * err.max()


# ------------------------------------------------------------------------------- committed template resources
def test_committed_template_labels_match_derivation():
    """The committed label map is exactly what template_build derives from nilearn's MNI files."""
    pytest.importorskip("nilearn")
    pytest.importorskip("scipy")
    from diffdef.template import LABELS, VENTRICLES, load_template
    from diffdef_training.template_build import derive_labels, nilearn_file

    files = {k: nilearn_file(k) for k in ("t1", "gm", "wm")}
    if not all(p.is_file() for p in files.values()):
        pytest.skip("nilearn does not ship the MNI ICBM152 2009a files")
    t1_img = nib.load(str(files["t1"]))
    grid = Grid(t1_img.shape, t1_img.affine)
    t1, gm, wm = (np.asarray(nib.load(str(files[k])).dataobj).astype(np.float32) / 255.0 for k in ("t1", "gm", "wm"))
    derived = derive_labels(t1, gm, wm, grid)

    template = load_template()
    template.grid.require_same(grid, "nilearn template")
    assert np.array_equal(template.labels, derived)
    assert set(np.unique(template.labels)) == {v for v, _, _ in LABELS}
    ventricles_ml = float((template.labels == VENTRICLES).sum()) * grid.voxel_volume_ml
    assert 10.0 <= ventricles_ml <= 25.0
    assert template.label_volumes_ml()["lateral ventricles"] == pytest.approx(ventricles_ml)


def test_template_label_map_on_another_grid_is_refused():
    from diffdef.template import load_template

    template = load_template()
    moved = template.grid.affine.copy()
    moved[0, 3] += 2.0  # the same shape, 2 mm to the right
    shifted = Grid(template.grid.shape, moved)
    with pytest.raises(ValueError, match="another grid"):
        template.grid.require_same(shifted, "label map")


def test_atomic_outputs_get_the_permissions_of_a_plain_open(tmp_path):
    """Files written through ``atomic_path`` end with mode 0666 & ~umask, also when the writer replaces the temp
    file (safetensors does: the bundle's weights were left owner-only, 0600)."""
    import os

    from safetensors.torch import save_file

    from diffdef.io import atomic_path

    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "w.safetensors") as tmp:
            save_file({"x": torch.zeros(2)}, str(tmp))
        with atomic_path(tmp_path / "t.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(umask)
    for name in ("w.safetensors", "t.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


@pytest.mark.parametrize("factor", [3, 4])
def test_template_label_fractions_are_the_pooled_one_hot(factor):
    """The working grid's label fractions, counted block by block on the uint8 labels, equal the average pooling
    of the float one-hot to the last bit (3 does not divide the crop: partial blocks are dropped as pooling does)."""
    from diffdef.template import CROP_SIZE, CROP_START, NUM_LABELS, load_template

    template = load_template()
    crop = tuple(slice(s, s + n) for s, n in zip(CROP_START, CROP_SIZE))
    onehot = F.one_hot(torch.from_numpy(template.labels[crop].astype(np.int64)), NUM_LABELS)
    expected = F.avg_pool3d(onehot.permute(3, 0, 1, 2)[None].float(), factor)
    assert torch.equal(template.on_working_grid(factor)[1], expected)


def test_template_masks_and_bounding_boxes_equal_the_plain_numpy_ones():
    """``Template.mask`` (a look-up table) equals ``np.isin``; ``bounding_box`` equals the extremes of
    ``np.argwhere``, grown by a margin and clipped at the array's edges; an empty mask is refused."""
    from diffdef.template import bounding_box, load_template

    template = load_template()
    for labels in ([4], [2, 3], [1, 2, 3, 4]):
        mask = template.mask(labels)
        assert np.array_equal(mask, np.isin(template.labels, labels)), labels
        ijk = np.argwhere(mask)
        for margin in (0, 3, 40):
            lo, hi = bounding_box(mask, margin)
            assert np.array_equal(lo, np.maximum(ijk.min(0) - margin, 0)), (labels, margin)
            assert np.array_equal(hi, np.minimum(ijk.max(0) + margin, np.array(mask.shape) - 1)), (labels, margin)
    corner = np.zeros((5, 6, 7), dtype=bool)
    corner[4, 0, 6] = True
    assert [b.tolist() for b in bounding_box(corner, 2)] == [[2, 0, 4], [4, 2, 6]]
    with pytest.raises(ValueError, match="empty"):
        bounding_box(np.zeros((3, 3, 3), dtype=bool))
