"""Make the extension icon from the project's own output: an axial slice of a generated atlas with its label
contours, 128 x 128 PNG, written to ``DiffDefSlicer/Resources/Icons/DiffDef.png`` and the top-level ``DiffDef.png``.

    python DiffDefSlicer/Resources/Icons/make_icon.py                 # the shipped model (Resources/Models/default)
    python DiffDefSlicer/Resources/Icons/make_icon.py --bundle runs/tiny/bundle

Rerun it after the shipped model is retrained. Conditions: the middle of each training range; seed 0.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
SIZE = 128


def icon_from_atlas(t1: np.ndarray, labels: np.ndarray, grid, size: int = SIZE) -> np.ndarray:
    """(size, size, 4) uint8 RGBA: the axial slice through the lateral ventricles' centre (anterior at the top, the
    subject's right on the right), brain cropped, label boundaries drawn in the label colours, transparent outside
    the brain. ``grid``: the :class:`diffdef.geometry.Grid` of both arrays."""
    from PIL import Image

    from diffdef.geometry import to_ras_axes
    from diffdef.outputs import display_slice, focus, paint_label_edges

    t1_ras, lab_ras = to_ras_axes(t1, grid), to_ras_axes(labels, grid)
    k = focus(lab_ras)[2]
    t, lab = display_slice(t1_ras, "axial", k), display_slice(lab_ras, "axial", k)
    rows, cols = np.nonzero(lab)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    side = max(r1 - r0, c1 - c0) + 4
    rc, cc = (r0 + r1) // 2, (c0 + c1) // 2
    sl = (slice(max(rc - side // 2, 0), rc + side // 2), slice(max(cc - side // 2, 0), cc + side // 2))
    t, lab = t[sl], lab[sl]
    grey = np.clip(t / max(float(np.percentile(t[lab > 0], 99.5)), 1e-6), 0, 1)
    rgb = (np.repeat(grey[..., None], 3, axis=2) * 255).astype(np.uint8)
    out = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR)).copy()
    lab_img = np.asarray(Image.fromarray(lab.astype(np.uint8)).resize((size, size), Image.NEAREST))
    paint_label_edges(out, lab_img)
    alpha = np.where(lab_img > 0, 255, 0).astype(np.uint8)
    return np.dstack([out, alpha])


def main(argv=None) -> list[Path]:
    from PIL import Image

    from diffdef.generate import AtlasGenerator
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=None, help="model bundle folder (default: the shipped model)")
    parser.add_argument("--output", nargs="*", default=[str(HERE / "DiffDef.png"), str(ROOT / "DiffDef.png")])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    gen = AtlasGenerator(args.bundle, device="cpu")
    conditions = {c.name: (c.low + c.high) / 2 for c in gen.spec.conditions}
    atlas = gen.generate(conditions, seed=args.seed)
    icon = icon_from_atlas(atlas.t1, atlas.labels, atlas.grid)
    written = []
    for path in args.output:
        Image.fromarray(icon, "RGBA").save(path)
        written.append(Path(path))
        print(f"wrote {path} ({SIZE}x{SIZE}, atlas for {conditions})")
    return written


if __name__ == "__main__":
    main()
