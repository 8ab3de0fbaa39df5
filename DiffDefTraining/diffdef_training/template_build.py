"""Derive DiffDef's template resources from the MNI ICBM152 2009a (symmetric) files that nilearn ships.

Run ``python -m diffdef_training.template_build`` to rebuild ``DiffDefSlicer/Resources/Template``; the core
reads the committed result so that Slicer users need no nilearn. Offline: nilearn's package data, no fetcher.

Definitions (RAS mm, MNI space):
* brain mask: T1 > 0.1 (of its 0..1 range), closed (2 iterations) and hole-filled;
* tissue: per brain voxel the largest of p_GM, p_WM and p_CSF = clip(1 - p_GM - p_WM, 0, 1);
* lateral ventricles: CSF voxels (p_CSF > 0.5) inside the box |x| in [2, 35], y in [-50, 35], z in [-5, 35]
  and more than 12 mm inside the brain mask, keeping the largest connected component on each side of x = 0
  (the two lateral ventricles; the midline third ventricle is excluded by |x| >= 2).
"""
from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from diffdef.io import write_image
from diffdef.template import LABELS, TEMPLATE_DIR, TEMPLATE_FILES
from diffdef.geometry import Grid

NILEARN_NAME = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


def nilearn_file(kind: str) -> Path:
    import nilearn

    return Path(os.path.dirname(nilearn.__file__)) / "datasets" / "data" / NILEARN_NAME.format(kind)


def derive_labels(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, grid: Grid) -> np.ndarray:
    """Label map (uint8, values of :data:`diffdef.template.LABELS`) from T1 / GM / WM in 0..1."""
    brain = ndi.binary_fill_holes(ndi.binary_closing(t1 > 0.1, iterations=2))
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    tissue = np.argmax(np.stack([csf, gm, wm]), axis=0) + 1
    labels = np.where(brain, tissue, 0).astype(np.uint8)
    ras = grid.voxel_to_world(np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), -1))
    x, y, z = ras[..., 0], ras[..., 1], ras[..., 2]
    box = (np.abs(x) >= 2) & (np.abs(x) <= 35) & (y >= -50) & (y <= 35) & (z >= -5) & (z <= 35)
    deep = ndi.distance_transform_edt(brain) > 12
    candidates = (labels == 1) & (csf > 0.5) & box & deep
    ventricles = np.zeros_like(candidates)
    for side in (x < 0, x > 0):
        comp, n = ndi.label(candidates & side)
        if n:
            sizes = ndi.sum(np.ones_like(comp), comp, index=range(1, n + 1))
            ventricles |= comp == (1 + int(np.argmax(sizes)))
    labels[ventricles] = 4
    return labels


def build(out_dir: Path = TEMPLATE_DIR) -> dict:
    load = lambda kind: nib.load(str(nilearn_file(kind)))
    t1_img = load("t1")
    grid = Grid(t1_img.shape, t1_img.affine)
    t1, gm, wm = (np.asarray(load(k).dataobj).astype(np.float32) / 255.0 for k in ("t1", "gm", "wm"))
    labels = derive_labels(t1, gm, wm, grid)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_image(out_dir / TEMPLATE_FILES["t1"], np.asarray(t1_img.dataobj).astype(np.uint8), grid, overwrite=True)
    write_image(out_dir / TEMPLATE_FILES["labels"], labels, grid, overwrite=True)
    return {name: float((labels == value).sum()) * grid.voxel_volume_ml for value, name, _ in LABELS}


if __name__ == "__main__":
    for name, ml in build().items():
        print(f"{name:20s} {ml:9.1f} ml")
