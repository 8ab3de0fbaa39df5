"""The DiffDef Logic on real MRML (the ``slicer-core`` wheel), outside the Slicer application.

Uses the tiny bundle the training package's tiny run makes (``tiny_bundle`` fixture) -- a real, briefly trained
model, never a placeholder network. Skipped when ``import slicer`` fails.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML) is not installed")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package has no MRML classes", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "DiffDefSlicer"))

from DiffDefLib import mrml  # noqa: E402
from DiffDefLib.logic import DiffDefError, DiffDefSceneLogic  # noqa: E402

CONDITIONS = {"age": 72.0, "ventricle_volume": 30.0}


def node_ids(scene) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def ijk_to_ras(node) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return mrml.numpy_matrix(m)


@pytest.fixture(scope="module")
def session(tiny_bundle):
    scene = slicer.vtkMRMLScene()
    logic = DiffDefSceneLogic(scene)
    # the decoder's own field: the untrained tiny model's ventricles, calibrated from the template's to 30 ml, would
    # make a field steeper than VTK's iterative inverse (ToParent) resolves to the 1e-3 mm the tests below ask
    result = logic.generate(CONDITIONS, bundle_path=tiny_bundle, device="cpu", seed=3, steps=2, calibrate_volumes=False)
    return scene, logic, result


@pytest.fixture(scope="module")
def subject(session):
    """A 'subject': the template at 2 mm, with its labels as a segmentation on the same grid."""
    from diffdef.geometry import Grid
    from diffdef.template import LABELS, load_template

    scene, _, _ = session
    template = load_template()
    t1 = np.ascontiguousarray(template.t1[::2, ::2, ::2]) * 300.0
    labels = np.ascontiguousarray(template.labels[::2, ::2, ::2])
    grid = Grid(t1.shape, template.grid.affine @ np.diag([2.0, 2.0, 2.0, 1.0]))
    volume = mrml.add_volume(scene, t1, grid, "subject T1")
    segmentation = mrml.add_segmentation(scene, labels, grid, LABELS, "subject labels", reference_volume=volume)
    return volume, segmentation, t1, labels, grid


@pytest.fixture(scope="module")
def compared(session, subject, tiny_bundle):
    scene, logic, result = session
    volume, segmentation, *_ = subject
    return logic.compare(volume, CONDITIONS, subject_segmentation=segmentation, bundle_path=tiny_bundle, device="cpu",
                         seed=3, atlas=result)


# ------------------------------------------------------------------------------------------------ generate
def test_atlas_volume_geometry_and_voxels(session):
    scene, logic, result = session
    atlas = result.atlas
    np.testing.assert_array_equal(ijk_to_ras(result.atlas_volume), atlas.grid.affine)
    from diffdef.template import load_template

    np.testing.assert_array_equal(ijk_to_ras(result.atlas_volume), load_template().grid.affine)
    # slicer.util.arrayFromVolume gives (k, j, i); from_kji is the one crossing back to the core's (i, j, k)
    from diffdef.geometry import from_kji

    np.testing.assert_array_equal(from_kji(slicer.util.arrayFromVolume(result.atlas_volume)), atlas.t1)
    assert result.atlas_volume.GetName() == "DiffDef atlas (age 72, ventricle_volume 30)"


def test_grid_transform_moves_points_as_core_displacement(session):
    """FromParent(p) = p + u(p) at voxel centres and between them (trilinear, as the core samples u); ToParent
    inverts it."""
    import torch

    from diffdef.fields import sample_points

    _, _, result = session
    atlas = result.atlas
    node = result.transform
    assert node.IsA("vtkMRMLGridTransformNode")
    from_parent, to_parent = node.GetTransformFromParent(), node.GetTransformToParent()
    rng = np.random.default_rng(0)
    shape = np.array(atlas.grid.shape)
    ijk = rng.integers(5, shape - 5, size=(40, 3))
    points = atlas.grid.voxel_to_world(ijk)
    u = atlas.displacement_mm[ijk[:, 0], ijk[:, 1], ijk[:, 2]]
    moved = np.array([from_parent.TransformPoint(*p) for p in points])
    np.testing.assert_allclose(moved, points + u, atol=1e-5)
    # between voxel centres
    frac = atlas.grid.voxel_to_world(rng.uniform(5, shape - 5, size=(40, 3)))
    field = torch.from_numpy(np.ascontiguousarray(atlas.displacement_mm.transpose(3, 0, 1, 2)))[None].double()
    u_frac = sample_points(field, atlas.grid, frac).T.numpy()
    moved = np.array([from_parent.TransformPoint(*p) for p in frac])
    np.testing.assert_allclose(moved, frac + u_frac, atol=1e-4)
    # the other direction
    back = np.array([to_parent.TransformPoint(*q) for q in points + u])
    np.testing.assert_allclose(back, points, atol=1e-3)
    # the stored field reads back exactly
    disp, grid = mrml.displacement_from_grid_transform(node)
    assert grid.same_as(atlas.grid, tol=1e-9)
    np.testing.assert_array_equal(disp, atlas.displacement_mm.astype(np.float32))


def test_grid_transform_convention_with_a_large_oblique_field():
    """The tiny model's field is small; check the same helper on a smooth ~4 mm field on an oblique grid,
    both directions."""
    from diffdef.geometry import Grid

    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]) @ np.diag([2.0, 1.5, 2.5])
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = rot, [10.0, -20.0, 5.0]
    grid = Grid((30, 28, 26), affine)
    ii, jj, kk = np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij")
    u = np.stack([4 * np.sin(ii / 6.0), 3 * np.cos(jj / 7.0), 2 * np.sin((ii + kk) / 8.0)], -1).astype(np.float32)
    scene = slicer.vtkMRMLScene()
    node = mrml.add_grid_transform(scene, u, grid, "T")
    ijk = np.array([[3, 4, 5], [15, 14, 13], [25, 20, 20], [10, 22, 7]])
    p = grid.voxel_to_world(ijk)
    q = p + u[ijk[:, 0], ijk[:, 1], ijk[:, 2]]
    np.testing.assert_allclose([node.GetTransformFromParent().TransformPoint(*x) for x in p], q, atol=1e-5)
    np.testing.assert_allclose([node.GetTransformToParent().TransformPoint(*x) for x in q], p, atol=1e-2)


def test_segmentation_segments_and_volumes(session):
    from diffdef.template import LABELS

    _, _, result = session
    segmentation = result.segmentation.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(LABELS) - 1
    for value, name, rgb in LABELS[1:]:
        segment = segmentation.GetSegment(name)
        assert segment is not None and segment.GetName() == name
        np.testing.assert_allclose(segment.GetColor(), rgb, atol=1e-6)
        assert mrml.segment_volume_ml(result.segmentation, name) == pytest.approx(result.atlas.label_volumes_ml[name],
                                                                                rel=1e-9)
        mask = mrml.segment_mask(result.segmentation, name, result.atlas.grid)
        np.testing.assert_array_equal(mask, result.atlas.labels == value)


def test_closed_surfaces_with_registered_converters(session):
    """The converter rules are registered by the Logic itself (no Segmentations module outside the app)."""
    from diffdef.template import LABELS

    scene = slicer.vtkMRMLScene()
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[3:9, 3:9, 3:9] = 2
    from diffdef.geometry import Grid

    node = mrml.add_segmentation(scene, labels, Grid(labels.shape, np.eye(4)), LABELS, "s", surfaces=True)
    surface = node.GetSegmentation().GetSegment("gray matter").GetRepresentation(mrml.CLOSED_SURFACE)
    assert surface is not None and surface.GetNumberOfPoints() > 0


# ------------------------------------------------------------------------------------------------ compare
def test_compare_nodes_equal_core_values(compared):
    comparison = compared.comparison
    rows = mrml.table_rows(compared.table)
    by_key = {(r["Metric"], r["Segment"]): r["Value"] for r in rows}
    assert by_key[("Folding ratio", "")] == pytest.approx(comparison.folding_ratio, abs=1e-12)
    assert by_key[("Centrality (mean displacement)", "")] == pytest.approx(comparison.mean_displacement_mm, rel=1e-12)
    for row in comparison.rows():
        name = row["name"]
        assert by_key[("Dice", name)] == pytest.approx(row["dice"], rel=1e-12)
        assert by_key[("HD95", name)] == pytest.approx(row["hd95_mm"], rel=1e-12)
        assert by_key[("Atlas volume", name)] == pytest.approx(row["atlas_ml"], rel=1e-12)
        assert by_key[("Subject volume (aligned)", name)] == pytest.approx(row["subject_ml"], rel=1e-12)
    assert all(0.3 < comparison.dice[n] <= 1.0 for n in comparison.dice)
    # log-Jacobian map, diverging colours, foreground-ready
    from diffdef.geometry import from_kji

    np.testing.assert_array_equal(from_kji(slicer.util.arrayFromVolume(compared.log_jacobian_volume)),
                                  comparison.log_jacobian)
    np.testing.assert_array_equal(ijk_to_ras(compared.log_jacobian_volume), comparison.grid.affine)
    display = compared.log_jacobian_volume.GetDisplayNode()
    assert display.GetColorNode().GetName().startswith("DiffDef diverging")
    assert display.GetLevel() == pytest.approx(0.0)
    # the transform: atlas point y -> subject point affine(y + w(y))
    grid = comparison.grid
    ijk = np.array([[60, 80, 70], [100, 120, 90], [130, 100, 60]])
    y = grid.voxel_to_world(ijk)
    w = comparison.inverse_displacement_mm[ijk[:, 0], ijk[:, 1], ijk[:, 2]]
    a = comparison.affine_ras
    expected = (y + w) @ a[:3, :3].T + a[:3, 3]
    moved = np.array([compared.transform.GetTransformFromParent().TransformPoint(*p) for p in y])
    np.testing.assert_allclose(moved, expected, atol=1e-3)


def test_compare_shows_log_jacobian_as_foreground(session, subject, tiny_bundle):
    scene, logic, result = session
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    try:
        mrml.show_in_slice_views(scene, background=result.atlas_volume, foreground=result.atlas_volume)
        assert composite.GetForegroundVolumeID() == result.atlas_volume.GetID()
    finally:
        scene.RemoveNode(composite)


# ------------------------------------------------------------------------------------------------ trajectory
def test_trajectory_sequence(tiny_bundle):
    scene = slicer.vtkMRMLScene()
    logic = DiffDefSceneLogic(scene)
    fractions = []
    out = logic.trajectory("age", [55, 75], {"ventricle_volume": 30}, bundle_path=tiny_bundle, device="cpu",
                           steps=2, progress=lambda f, m: fractions.append(f))
    assert out.sequence.GetNumberOfDataNodes() == 2 and out.label_sequence.GetNumberOfDataNodes() == 2
    assert out.sequence.GetIndexName() == "age" and out.sequence.GetIndexUnit() == "years"
    assert [out.sequence.GetNthIndexValue(i) for i in range(2)] == ["55", "75"]
    assert out.browser.GetMasterSequenceNode() is out.sequence
    proxy = out.browser.GetProxyNode(out.sequence)
    assert proxy is not None and proxy.IsA("vtkMRMLScalarVolumeNode")
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


# ------------------------------------------------------------------------------------------------ save / reload
def test_scene_survives_save_and_reload(session, compared, tmp_path):
    scene, _, result = session
    names = {scene.GetNthNode(i).GetName() for i in range(scene.GetNumberOfNodes())
             if scene.GetNthNode(i).IsA("vtkMRMLStorableNode")}
    path = mrml.save_scene(scene, tmp_path / "scene")
    reloaded = mrml.load_scene(path)
    names2 = {reloaded.GetNthNode(i).GetName() for i in range(reloaded.GetNumberOfNodes())
              if reloaded.GetNthNode(i).IsA("vtkMRMLStorableNode")}
    assert names <= names2
    atlas = reloaded.GetFirstNodeByName(result.atlas_volume.GetName())
    np.testing.assert_allclose(ijk_to_ras(atlas), result.atlas.grid.affine, atol=1e-6)
    np.testing.assert_allclose(mrml.array_from_volume(atlas), result.atlas.t1, atol=1e-6)
    seg = reloaded.GetFirstNodeByName(result.segmentation.GetName())
    for name, ml in result.atlas.label_volumes_ml.items():
        assert seg.GetSegmentation().GetSegment(name) is not None
        assert mrml.segment_volume_ml(seg, name) == pytest.approx(ml, rel=1e-9)
    transform = reloaded.GetFirstNodeByName(result.transform.GetName())
    p = result.atlas.grid.voxel_to_world(np.array([90.0, 110.0, 80.0]))
    np.testing.assert_allclose(transform.GetTransformFromParent().TransformPoint(*p),
                               p + result.atlas.displacement_mm[90, 110, 80], atol=1e-4)
    table = reloaded.GetFirstNodeByName(compared.table.GetName())
    a = {(r["Metric"], r["Segment"]): r["Value"] for r in mrml.table_rows(compared.table)}
    b = {(r["Metric"], r["Segment"]): r["Value"] for r in mrml.table_rows(table)}
    assert a.keys() == b.keys()
    for k in a:
        assert float(b[k]) == pytest.approx(a[k], rel=1e-5, abs=1e-6, nan_ok=True)  # TSV keeps 6 digits


# ------------------------------------------------------------------------------------------------ bad input
def _expect_clean_failure(scene, call, match):
    before = node_ids(scene)
    with pytest.raises(DiffDefError, match=match):
        call()
    assert node_ids(scene) == before


def test_bad_inputs_leave_the_scene_unchanged(session, subject, tiny_bundle, tmp_path):
    from diffdef.geometry import Grid
    from diffdef.template import LABELS

    scene, logic, result = session
    volume, segmentation, t1, labels, grid = subject
    kw = dict(bundle_path=tiny_bundle, device="cpu", atlas=result)
    # a 2-D volume
    flat = mrml.add_volume(scene, t1[:, :, 40:41], Grid(t1[:, :, 40:41].shape, grid.affine), "flat")
    _expect_clean_failure(scene, lambda: logic.compare(flat, CONDITIONS, **kw), "2-D")
    # a segmentation on another grid (1.5 mm)
    other = Grid((20, 20, 20), np.diag([1.5, 1.5, 1.5, 1.0]) @ np.eye(4))
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[5:15, 5:15, 5:15] = 3
    foreign = mrml.add_segmentation(scene, lab, other, LABELS, "foreign")
    _expect_clean_failure(scene, lambda: logic.compare(volume, CONDITIONS, subject_segmentation=foreign, **kw),
                          "another grid")
    # an empty segmentation: no segments, and segments without voxels
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    _expect_clean_failure(scene, lambda: logic.compare(volume, CONDITIONS, subject_segmentation=empty, **kw), "empty")
    blank = mrml.add_segmentation(scene, np.zeros(grid.shape, np.uint8), grid, LABELS, "blank")
    _expect_clean_failure(scene, lambda: logic.compare(volume, CONDITIONS, subject_segmentation=blank, **kw), "empty")
    # an invalid bundle
    (tmp_path / "notabundle").mkdir()
    _expect_clean_failure(scene, lambda: logic.generate(CONDITIONS, bundle_path=tmp_path / "notabundle", device="cpu"),
                          "model.json")
    # an unsupported device
    _expect_clean_failure(scene, lambda: logic.generate(CONDITIONS, bundle_path=tiny_bundle, device="tpu"),
                          "Unknown device")
    import torch

    if not torch.cuda.is_available():
        _expect_clean_failure(scene, lambda: logic.generate(CONDITIONS, bundle_path=tiny_bundle, device="cuda"),
                              "no usable GPU")
    # bad conditions
    _expect_clean_failure(scene, lambda: logic.generate({"age": float("nan")}, bundle_path=tiny_bundle, device="cpu"),
                          "finite")
    _expect_clean_failure(scene, lambda: logic.generate({"height": 3}, bundle_path=tiny_bundle, device="cpu"),
                          "Unknown condition")
    # bad sampling settings
    _expect_clean_failure(scene, lambda: logic.generate(CONDITIONS, bundle_path=tiny_bundle, device="cpu", samples=0),
                          "averaged samples must be at least 1")
    _expect_clean_failure(scene, lambda: logic.trajectory("age", [50, 60], bundle_path=tiny_bundle, device="cpu",
                                                          steps=-1), "sampling steps must be at least 1")
    _expect_clean_failure(scene, lambda: logic.compare(volume, CONDITIONS, samples=-1, **kw),
                          "averaged samples must be at least 1")


def test_compare_generates_its_atlas_with_the_sampling_asked(session, subject, tiny_bundle, monkeypatch):
    """Without an atlas to reuse, Compare passes steps, guidance and samples on to the core's comparison."""
    import diffdef.compare

    scene, logic, _ = session
    seen = {}

    def stop(*args, **kwargs):
        seen.update(kwargs["sampling"])
        raise ValueError("stopped after the check")

    monkeypatch.setattr(diffdef.compare, "compare_subject", stop)
    with pytest.raises(DiffDefError, match="stopped after the check"):
        logic.compare(subject[0], CONDITIONS, bundle_path=tiny_bundle, device="cpu", steps=2, samples=3)
    assert seen == {"steps": 2, "guidance": None, "samples": 3, "calibrate_volumes": True}


def test_generate_calibrates_the_requested_volume_unless_asked_not_to(session, tiny_bundle):
    scene, logic, result = session
    assert result.atlas.volume_calibration == {} and result.atlas.sampling["calibrate_volumes"] is False
    calibrated = logic.generate(CONDITIONS, bundle_path=tiny_bundle, device="cpu", seed=3, steps=2)
    report = calibrated.atlas.volume_calibration["ventricle_volume"]
    assert report["requested_ml"] == CONDITIONS["ventricle_volume"] and report["converged"]
    segments = calibrated.segmentation.GetSegmentation()
    assert segments.GetSegment(segments.GetSegmentIdBySegmentName("lateral ventricles")) is not None
    assert calibrated.atlas.label_volumes_ml["lateral ventricles"] == pytest.approx(CONDITIONS["ventricle_volume"], rel=0.03)


def test_extrapolation_is_a_warning(session, tiny_bundle):
    scene, logic, _ = session
    spec = logic.condition_spec(tiny_bundle, "cpu")
    warnings = logic.validate_conditions(spec, {"age": 110})
    assert warnings and "outside the training range" in warnings[0]


def test_cancel_leaves_the_scene_unchanged(session, tiny_bundle):
    from diffdef.sampling import Cancelled

    scene, logic, _ = session
    before = node_ids(scene)
    with pytest.raises(Cancelled):
        logic.generate(CONDITIONS, bundle_path=tiny_bundle, device="cpu", cancel=lambda: True)
    assert node_ids(scene) == before


def test_progress_is_countable(tiny_bundle):
    scene = slicer.vtkMRMLScene()
    calls = []
    DiffDefSceneLogic(scene).generate(CONDITIONS, bundle_path=tiny_bundle, device="cpu", steps=3,
                                      progress=lambda f, m: calls.append((f, m)))
    steps = [m for _, m in calls if "Diffusion step" in m]
    assert steps and steps[-1].endswith("3/3")
    assert [f for f, _ in calls] == sorted(f for f, _ in calls) and calls[-1][0] == 1.0


# ------------------------------------------------------------------------------------------------ dependencies
def test_nothing_heavy_at_import_and_dependencies_present():
    code = ("import sys; sys.path.insert(0, 'DiffDefSlicer'); import DiffDefLib.logic, DiffDefLib.dependencies as d; "
            "assert 'torch' not in sys.modules and 'diffdef.generate' not in sys.modules, 'heavy import'; "
            "print(d.missing())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
