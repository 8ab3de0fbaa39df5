"""Subject comparison (diffdef.compare) and the shared affine registration (diffdef.affine), on the tiny bundle
trained by the pipeline (session fixture ``tiny_generator``) and a synthetic subject moved by a known affine onto
a 1.5 mm grid of another orientation."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from diffdef import fields, metrics
from diffdef.affine import ras_to_transform, resample_into, transform_to_ras
from diffdef.compare import Cancelled, compare_subject, deformations, log_jacobian, to_working_grid, working_layout
from diffdef.conditions import ConditionError
from diffdef.geometry import Grid, displacement_from_mm
from diffdef.template import CROP_START, LABELS, load_template

sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)
NAMES = [name for value, name, _ in LABELS if value]


def known_affine() -> np.ndarray:
    """Atlas RAS -> subject RAS: 6 deg about z, 4 deg about x, scale 1.04, shift (4, -3, 2) mm."""
    a, b = np.deg2rad(6.0), np.deg2rad(4.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    m = np.eye(4)
    m[:3, :3] = 1.04 * rz @ rx
    m[:3, 3] = [4.0, -3.0, 2.0]
    return m


def subject_grid() -> Grid:
    """1.5 mm, axes i -> left, j -> superior, k -> anterior (not the template's orientation)."""
    affine = np.array([[-1.5, 0, 0, 100.0], [0, 0, 1.5, -140.0], [0, 1.5, 0, -80.0], [0, 0, 0, 1]])
    return Grid((134, 134, 164), affine)


@pytest.fixture(scope="module")
def moved_subject():
    """A synthetic subject of the law (1 mm, template grid) moved by ``known_affine`` onto ``subject_grid``."""
    from diffdef_training.synthetic import default_law

    template = load_template()
    s = default_law().subject(7, 0, factor=None)
    image, labels = s.image[0].numpy(), s.labels[0].numpy().astype(np.uint8)
    grid = subject_grid()
    to_source = ras_to_transform(np.linalg.inv(known_affine()))  # subject point -> template-grid point
    moved = resample_into(image, template.grid, to_source, grid) * 900.0  # another intensity scale
    moved_labels = resample_into(labels, template.grid, to_source, grid, labels=True)
    return moved, moved_labels, grid, s.conditions


@pytest.fixture(scope="module")
def comparison(tiny_generator, moved_subject):
    moved, moved_labels, grid, conditions = moved_subject
    calls = []
    c = compare_subject(tiny_generator, moved, grid, {"age": conditions["age"]}, subject_labels=moved_labels,
                        seed=3, progress=lambda f, m: calls.append((f, m)))
    return c, calls


def test_outputs_on_template_grid_and_finite(comparison, tiny_generator):
    c, _ = comparison
    template = load_template()
    assert c.grid.same_as(template.grid)
    for name in ("subject_affine", "subject_in_atlas", "warped_atlas_labels", "log_jacobian",
                 "subject_labels_affine"):
        a = getattr(c, name)
        assert a.shape == template.grid.shape, name
        assert np.all(np.isfinite(a)), name
    for name in ("displacement_mm", "inverse_displacement_mm"):
        a = getattr(c, name)
        assert a.shape == template.grid.shape + (3,) and a.dtype == np.float32 and np.all(np.isfinite(a))
    assert c.warped_atlas_labels.dtype == np.uint8 and c.subject_labels_affine.dtype == np.uint8
    assert 0.0 <= c.subject_affine.min() and c.subject_affine.max() <= 1.0
    assert tuple(c.velocity.shape) == (1, 3) + tiny_generator.bundle.working_grid.shape
    assert isinstance(c.folding_ratio, float) and c.folding_ratio >= 0.0
    assert isinstance(c.mean_displacement_mm, float) and c.mean_displacement_mm >= 0.0
    assert c.conditions["age"] is not None and c.seed == 3
    assert set(c.timings) >= {"atlas_s", "affine_s", "network_s", "warping_s", "metrics_s", "total_s"}


def test_working_grid(tiny_generator):
    template = load_template()
    work = tiny_generator.bundle.working_grid
    start, factor = working_layout(template.grid, work)
    assert start == CROP_START and factor == round(work.spacing[0])
    t1 = to_working_grid(template.t1, template.grid, work)
    assert torch.allclose(t1, template.on_working_grid(factor)[0])
    with pytest.raises(ValueError, match="not a block-downsampled crop"):
        working_layout(template.grid, Grid(work.shape, work.affine @ np.diag([1, 1, 1.3, 1])))


def test_affine_recovered(comparison):
    """The registration undoes the known move: brain points map within 3 mm (the law's subject is itself only
    roughly aligned with the atlas), and the volume ratio is the known scale cubed."""
    c, _ = comparison
    pts = np.array([[x, y, z, 1.0] for x in (-40, 40) for y in (-60, 30) for z in (-20, 50)])
    err = np.linalg.norm((pts @ c.affine_ras.T - pts @ known_affine().T)[:, :3], axis=1)
    assert err.max() < 3.0, err
    # the synthetic subject's own brain size differs from the atlas's by a few % (individual variation)
    assert c.affine_volume_ratio == pytest.approx(1.04**3, rel=0.08)
    assert np.allclose(transform_to_ras(c.transform), c.affine_ras)
    assert c.info["registration_s"] > 0 and "intensity_low" in c.info
    # the subject's labels, brought back by the affine, overlap the synthetic subject's own labels on the template grid
    assert min(metrics.dice(c.subject_labels_affine, c.warped_atlas_labels, [2, 3]).values()) > 0.6


def test_table_equals_metrics(comparison, moved_subject):
    c, _ = comparison
    grid = c.grid
    assert list(c.dice) == NAMES and list(c.hd95_mm) == NAMES
    dice = metrics.dice(c.warped_atlas_labels, c.subject_labels_affine, [1, 2, 3, 4])
    hd = metrics.hd95(c.warped_atlas_labels, c.subject_labels_affine, grid, [1, 2, 3, 4])
    for value, name in enumerate(NAMES, start=1):
        assert c.dice[name] == dice[value]
        assert c.hd95_mm[name] == hd[value]
        assert 0.0 <= c.dice[name] <= 1.0 and c.hd95_mm[name] >= 0.0
    # volumes: bincount of the returned label maps
    vox = grid.voxel_volume_ml
    atlas_counts = np.bincount(c.atlas.labels.ravel(), minlength=5)
    subject_counts = np.bincount(c.warped_atlas_labels.ravel(), minlength=5)
    labelled = np.bincount(moved_subject[1].ravel(), minlength=5) * moved_subject[2].voxel_volume_ml
    for value, name in enumerate(NAMES, start=1):
        v = c.volumes[name]
        assert v["atlas_ml"] == pytest.approx(atlas_counts[value] * vox)
        assert v["subject_ml"] == pytest.approx(subject_counts[value] * vox)
        assert v["difference_ml"] == pytest.approx(v["subject_ml"] - v["atlas_ml"])
        assert v["difference_percent"] == pytest.approx(100 * v["difference_ml"] / v["atlas_ml"])
        assert v["subject_native_ml"] == pytest.approx(v["subject_ml"] * c.affine_volume_ratio)
        assert v["labelled_ml"] == pytest.approx(labelled[value])
        assert v["atlas_ml"] == pytest.approx(c.atlas.label_volumes_ml[name])
    # folding ratio and mean displacement, recomputed by diffdef.metrics from the returned fields
    u_mm = torch.from_numpy(c.displacement_mm).permute(3, 0, 1, 2)[None]
    assert c.folding_ratio == metrics.folding_ratio(fields.jacobian_determinant(displacement_from_mm(u_mm, grid)))
    assert c.mean_displacement_mm == pytest.approx(metrics.centrality(u_mm, mask=c.warped_atlas_labels > 0), rel=1e-5)
    # log-Jacobian = log det J of the returned inverse displacement (checked on a slab, away from its cut edges)
    w = displacement_from_mm(torch.from_numpy(c.inverse_displacement_mm[89:101]).permute(3, 0, 1, 2)[None], grid)
    assert np.allclose(c.log_jacobian[90:100], log_jacobian(w)[0, 0, 1:-1].numpy(), atol=1e-6)
    # rows / summary carry the same numbers
    rows = c.rows()
    assert [r["name"] for r in rows] == NAMES and rows[3]["dice"] == c.dice["lateral ventricles"]
    assert c.summary()["folding_ratio_percent"] == c.folding_ratio


def test_progress_reported(comparison):
    _, calls = comparison
    fractions = [f for f, _ in calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and fractions[0] == 0.0
    assert any("Diffusion step" in m for _, m in calls) and any("Affine" in m for _, m in calls)


def test_log_jacobian_sign_and_inverse(tiny_generator):
    """A velocity contracting towards the brain centre: u pulls the atlas from nearer the centre, so the warped
    atlas (the 'subject') is larger; log det J of w is then positive (3c for v = -c (x - centre))."""
    template = load_template()
    work = tiny_generator.bundle.working_grid
    fine = template.working_grid(2).grid  # a 2 mm grid keeps the test fast; compare_subject uses the 1 mm grid
    labels = template.on_working_grid(2)[1].argmax(1, keepdim=True)
    c = 0.05
    centre = (np.asarray(work.shape) - 1) / 2.0
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in work.shape], indexing="ij"))
    velocity = torch.from_numpy(-c * (idx - centre[:, None, None, None])).float()[None]
    u, w = deformations(velocity, work, fine)
    logj = log_jacobian(w)[0, 0]
    brain = labels[0, 0] > 0
    assert float(logj[brain].median()) == pytest.approx(3 * c, rel=0.05)
    warped = fields.warp_labels(labels, u)
    assert (warped == 4).sum() > 1.1 * (labels == 4).sum()  # the subject's ventricles are larger
    # w inverts u (up to integration and interpolation error)
    back = fields.compose(u, w)  # warp by u, then by w: identity
    assert float(back[0].norm(dim=0)[brain].mean()) < 0.05


def test_affine_matrix_round_trip():
    m = known_affine()
    t = ras_to_transform(m)
    assert np.allclose(transform_to_ras(t), m)
    p = np.array([10.0, -20.0, 30.0])
    q = np.asarray(t.TransformPoint((-p[0], -p[1], p[2])))  # LPS in, LPS out
    assert np.allclose([-q[0], -q[1], q[2]], m[:3, :3] @ p + m[:3, 3])
    e = sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.1, 0.0, 0.2, (4.0, 5.0, 6.0))
    a = sitk.AffineTransform(3)
    a.SetMatrix(e.GetMatrix()); a.SetCenter(e.GetCenter()); a.SetTranslation(e.GetTranslation())
    assert np.allclose(transform_to_ras(e), transform_to_ras(a))


# ------------------------------------------------------------------------------------------------- bad inputs
@pytest.fixture(scope="module")
def small():
    grid = Grid((12, 12, 12), np.diag([2.0, 2.0, 2.0, 1.0]))
    image = np.random.default_rng(0).random(grid.shape).astype(np.float32)
    labels = np.zeros(grid.shape, np.uint8)
    labels[3:8, 3:8, 3:8] = 2
    return image, labels, grid


@pytest.mark.parametrize("case, match", [
    ("2d", "3-D volume"), ("4d", "Take one 3-D volume"), ("nan", "NaN"), ("constant", "constant"),
    ("shape", "does not match its grid"), ("labels_grid", "on another grid"), ("labels_shape", "on another grid"),
    ("labels_empty", "empty"), ("labels_values", "not template labels"), ("labels_fraction", "integer labels"),
    ("condition", "unknown|Unknown"), ("no_conditions", "conditions"),
])
def test_bad_inputs(tiny_generator, small, case, match):
    image, labels, grid = small
    kwargs = dict(subject=image, subject_grid=grid, conditions={"age": 70}, subject_labels=labels)
    if case == "2d":
        kwargs["subject"] = image[0]
    elif case == "4d":
        kwargs["subject"] = np.stack([image, image], axis=-1)
    elif case == "nan":
        kwargs["subject"] = np.where(image > 0.99, np.nan, image)
    elif case == "constant":
        kwargs["subject"] = np.ones_like(image)
    elif case == "shape":
        kwargs["subject_grid"] = Grid((12, 12, 13), grid.affine)
    elif case == "labels_grid":
        kwargs["labels_grid"] = Grid(grid.shape, np.diag([1.0, 1.0, 1.0, 1.0]))
    elif case == "labels_shape":
        kwargs["subject_labels"] = labels[:, :, :10]
    elif case == "labels_empty":
        kwargs["subject_labels"] = np.zeros_like(labels)
    elif case == "labels_values":
        kwargs["subject_labels"] = np.where(labels == 2, 7, 0).astype(np.uint8)
    elif case == "labels_fraction":
        kwargs["subject_labels"] = labels * 0.3
    elif case == "condition":
        kwargs["conditions"] = {"height": 180}
    elif case == "no_conditions":
        kwargs["conditions"] = None
    with pytest.raises(ValueError, match=match) as info:
        compare_subject(tiny_generator, **kwargs)
    if case == "condition":
        assert isinstance(info.value, ConditionError)


def test_atlas_reuse_checks_and_cancel(tiny_generator, comparison, small):
    c, _ = comparison
    image, _, grid = small
    with pytest.raises(ValueError, match="other conditions"):
        compare_subject(tiny_generator, image, grid, {"age": c.atlas.conditions["age"] + 10}, atlas=c.atlas)
    with pytest.raises(Cancelled):
        compare_subject(tiny_generator, image, grid, None, atlas=c.atlas, cancel=lambda: True)
