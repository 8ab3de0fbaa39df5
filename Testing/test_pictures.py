"""Pictures (the PNG preview, trajectory frames, the icon): orientation on any grid, voxel-exact label boundaries,
and no matplotlib in the core."""
from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffdef import outputs
from diffdef.geometry import Grid, to_ras_axes
from diffdef.template import LABELS, VENTRICLES, WM, load_template

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
PERMUTED = np.array([[0.0, 0.0, -1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])


def marker_volume(grid: Grid, ras_mm) -> np.ndarray:
    """1 at the voxel nearest to the RAS point ``ras_mm``, 0 elsewhere."""
    volume = np.zeros(grid.shape, np.uint8)
    volume[tuple(np.round(grid.world_to_voxel(ras_mm)).astype(int))] = 1
    return volume


@pytest.mark.parametrize("affine", [np.eye(4), LPS, PERMUTED], ids=["RAS", "LPS", "permuted"])
def test_each_plane_shows_right_anterior_superior_where_a_reader_expects(affine):
    """A point right, anterior and superior of the centre lands in the upper right of the coronal and axial
    pictures (neurological display) and of the sagittal one (anterior on the right), whatever the voxel order."""
    affine = affine.copy()
    affine[:3, 3] = -affine[:3, :3] @ np.array([10.0, 10.0, 10.0])  # voxel (10, 10, 10) at the world origin
    grid = Grid((21, 21, 21), affine)
    volume_ras = to_ras_axes(marker_volume(grid, [6.0, 7.0, 8.0]), grid)
    position = dict(zip("RAS", np.argwhere(volume_ras)[0]))
    for plane, (up, right) in {"sagittal": ("S", "A"), "coronal": ("S", "R"), "axial": ("A", "R")}.items():
        picture = outputs.display_slice(volume_ras, plane, position["RAS"[outputs.PLANES[plane]]])
        row, col = np.argwhere(picture)[0]
        assert row < picture.shape[0] // 2 and col > picture.shape[1] // 2, f"{plane}: marker at row {row}, col {col}"
        assert (picture.shape[0] - 1 - row, col) == (position[up], position[right])


def test_label_edges_mark_both_sides_of_each_boundary():
    labels = np.zeros((6, 7), np.uint8)
    labels[2:4, 2:5] = WM
    edge = outputs.label_edges(labels)
    inside_ring = edge & (labels == WM)
    assert inside_ring.sum() == 6  # a 2x3 block is all boundary
    outside = edge & (labels == 0)
    assert outside.sum() == 2 * 3 + 2 * 2  # the 4-neighbours just outside: 3 above, 3 below, 2 left, 2 right
    rgb = np.zeros(labels.shape + (3,), np.uint8)
    outputs.paint_label_edges(rgb, labels)
    colour = np.round(np.asarray(dict((v, c) for v, _, c in LABELS)[WM]) * 255)
    assert np.all(rgb[labels == WM] == colour) and not rgb[labels == 0].any()  # background edges stay unpainted


def test_preview_is_a_png_with_every_label_colour():
    template = load_template()
    png = outputs.render_preview(template.t1, template.labels, template.grid, "title")
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG" and im.size[0] > 1000 and im.size[1] > 400
        colours = {tuple(c) for c in np.asarray(im.convert("RGB")).reshape(-1, 3)}
    for value, name, rgb in LABELS[1:]:
        assert tuple(int(round(c * 255)) for c in rgb) in colours, f"no {name} boundary or legend in the preview"


def test_trajectory_frame_is_cut_through_the_given_slice():
    template = load_template()
    grid = template.grid
    centre = outputs.focus(to_ras_axes(template.labels, grid))
    frame = outputs._frame_image(template.t1, template.labels, grid, "coronal", centre[1], "age = 70")
    vent = np.round(np.asarray(dict((v, c) for v, _, c in LABELS)[VENTRICLES]) * 255)
    assert np.any(np.all(np.asarray(frame) == vent, axis=-1)), "the slice through the ventricles shows no ventricle"
    assert frame.size[0] == 2 * grid.shape[0] + 12  # the R-L axis, enlarged twice, between two 6-pixel margins


def test_the_core_writes_pictures_without_matplotlib_or_monai():
    """``pip install .`` (no extras) has no matplotlib: the preview must not need it, nor MONAI (a slow import)."""
    code = ("import sys, numpy as np\n"
            "from diffdef import outputs\n"
            "from diffdef.geometry import Grid\n"
            "labels = np.zeros((8, 9, 10), np.uint8); labels[2:6, 3:6, 4:7] = 4\n"
            "outputs.render_preview(labels / 4.0, labels, Grid(labels.shape, np.eye(4)), 'x')\n"
            "print(sorted(m for m in ('matplotlib', 'monai') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
