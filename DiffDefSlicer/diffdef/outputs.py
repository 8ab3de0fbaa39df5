"""Writing generated atlases and trajectories to a folder.

A folder of outputs is written as one transaction: every target path is checked first (nothing is written when
one exists and ``overwrite`` is off), every file is written to a temporary file beside its target
(:func:`diffdef.io.atomic_path`), and the temporary files are renamed onto their targets only once all of them
were written. An error or Ctrl-C on the way removes the temporary files, so the folder is left as it was.

Files of :func:`write_atlas` (``prefix`` defaults to ``atlas``):

================================  ==========================================================================
``atlas_t1.nii.gz``               atlas T1 (float32, 0..1) on the 1 mm template grid
``atlas_labels.nii.gz``           atlas label map (uint8, values and names in the sidecar)
``atlas_displacement.nii.gz``     ITK / ANTs displacement field (5-D NIfTI, LPS mm vectors)
``atlas_displacement.nrrd``       the same field as Slicer loads it (grid transform)
``atlas_jacobian.nii.gz``         determinant of the Jacobian of x -> x + u(x) (only with ``jacobian``)
``atlas_preview.png``             three orthogonal slices with label contours
``atlas.json``                    sidecar: conditions, model, seed, volumes, folding ratio, warnings, timings
================================  ==========================================================================

The displacement ``u`` is a pull-back map: ``atlas(x) = template(x + u(x))``. In ITK terms it is the transform
that resamples the template (moving) onto the atlas grid (fixed), e.g. ``antsApplyTransforms -i template -r
atlas_t1.nii.gz -t atlas_displacement.nii.gz``.
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import io as _io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from . import __version__
from .geometry import Grid, to_ras_axes
from .io import atomic_path, write_displacement_itk, write_image
from .template import LABELS, TEMPLATE_ID

ATLAS_FILES = {
    "t1": "{p}_t1.nii.gz",
    "labels": "{p}_labels.nii.gz",
    "displacement_itk": "{p}_displacement.nii.gz",
    "displacement_slicer": "{p}_displacement.nrrd",
    "jacobian": "{p}_jacobian.nii.gz",
    "preview": "{p}_preview.png",
    "sidecar": "{p}.json",
}
TRAJECTORY_FILES = {
    "t1": "{p}_t1_4d.nii.gz",
    "labels": "{p}_labels_4d.nii.gz",
    "animation": "{p}.gif",
    "montage": "{p}_montage.png",
    "table": "{p}.csv",
    "sidecar": "{p}.json",
}
WRITE_THREADS = 2  # gzip (zlib) releases the GIL: two files compress at once on a 2-core machine


def atlas_paths(folder, prefix: str = "atlas", jacobian: bool = False) -> dict[str, Path]:
    """Target path of each output of :func:`write_atlas`."""
    folder = Path(folder)
    return {k: folder / v.format(p=prefix) for k, v in ATLAS_FILES.items() if jacobian or k != "jacobian"}


def trajectory_paths(folder, prefix: str = "trajectory") -> dict[str, Path]:
    folder = Path(folder)
    return {k: folder / v.format(p=prefix) for k, v in TRAJECTORY_FILES.items()}


def check_targets(paths: Iterable[Path], overwrite: bool = False) -> None:
    """Raise :class:`FileExistsError` naming every existing target (before anything is written)."""
    paths = [Path(p) for p in paths]
    for p in paths:
        if p.exists() and not p.is_file():
            raise FileExistsError(f"{p} exists and is not a file; choose another output folder.")
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        names = ", ".join(p.name for p in existing)
        raise FileExistsError(f"{len(existing)} output file(s) already exist in {existing[0].parent}: {names}. "
                              "Nothing was written; choose another output folder or pass --overwrite to replace them.")


@contextlib.contextmanager
def _transaction(paths: dict[str, Path], overwrite: bool):
    """Yield ``{key: temporary path}``; all temporary files replace their targets together at the end."""
    check_targets(paths.values(), overwrite)
    with contextlib.ExitStack() as stack:
        yield {k: stack.enter_context(atomic_path(p, overwrite=overwrite)) for k, p in paths.items()}


def _run_parallel(jobs: list[Callable[[], object]], threads: int | None = None) -> None:
    threads = WRITE_THREADS if threads is None else threads
    if threads <= 1 or len(jobs) <= 1:
        for job in jobs:
            job()
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(job) for job in jobs]
        for f in futures:  # re-raise the first error; the rest finish before the pool closes
            f.result()


# --------------------------------------------------------------------------------------------------------------
# Metadata


def model_summary(bundle) -> dict:
    """Provenance summary of a :class:`diffdef.bundle.Bundle` (or None) for sidecars."""
    if bundle is None:
        return {}
    meta = bundle.meta
    prov = meta.get("provenance", {})
    keep = ("cohort", "cohort_size", "cohort_seed", "steps", "stage_seconds", "morphology_preservation_loss",
            "neighbours", "sigma", "device", "machine", "date", "git_commit", "diffdef_version", "torch_version")
    return {
        "path": str(Path(bundle.path).resolve()),
        "template": meta.get("template", {}).get("id", TEMPLATE_ID),
        "conditions": meta.get("conditions"),
        "working_grid": {"shape": meta.get("working_grid", {}).get("shape"),
                         "spacing_mm": np.round(bundle.working_grid.spacing, 4).tolist()},
        "sampling_defaults": meta.get("sampling"),
        "weights_sha256": {k: v.get("sha256") for k, v in meta.get("weights", {}).items()},
        "provenance": {k: prov[k] for k in keep if k in prov},
    }


def labels_table() -> list[dict]:
    return [{"value": v, "name": n, "rgb": list(c)} for v, n, c in LABELS]


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, Path):
        return str(x)
    return x


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(_jsonable(data), indent=2) + "\n")


# --------------------------------------------------------------------------------------------------------------
# Pictures


def focus(labels_ras: np.ndarray) -> tuple[int, int, int]:
    """Slice positions: centre of the lateral ventricles when present, else of the labelled brain."""
    from .template import VENTRICLES

    mask = labels_ras == VENTRICLES
    if not mask.any():
        mask = labels_ras > 0
    if not mask.any():
        return tuple(s // 2 for s in labels_ras.shape)
    return tuple(int(round(float(np.mean(idx)))) for idx in np.nonzero(mask))


PLANES = {"sagittal": 0, "coronal": 1, "axial": 2}


def display_slice(volume_ras: np.ndarray, plane: str, index: int) -> np.ndarray:
    """Slice ``index`` of a volume on (R, A, S)-increasing axes as a picture: rows from top to bottom, columns from
    left to right. Sagittal: anterior on the right, superior at the top; coronal and axial: neurological (the
    subject's right on the right), superior / anterior at the top."""
    cut = [slice(None)] * 3
    cut[PLANES[plane]] = index
    return volume_ras[tuple(cut)].T[::-1]  # a view: np.take would copy the whole volume


def check_slice_index(grid: Grid, plane: str, index: int) -> None:
    """Raise ValueError unless ``index`` is a slice of ``grid`` in ``plane`` (the order of :func:`display_slice`)."""
    count = to_ras_axes(np.broadcast_to(np.uint8(0), grid.shape), grid).shape[PLANES[plane]]  # no voxels made
    if not 0 <= index < count:
        start = {"sagittal": "left", "coronal": "back", "axial": "feet"}[plane]
        raise ValueError(f"Slice {index} is outside the {plane} slices of the atlas grid: use 0 to {count - 1} "
                         f"(counted from the subject's {start}), or omit --slice for the one through the ventricles.")


def label_edges(labels2d: np.ndarray) -> np.ndarray:
    """Pixels whose label differs from one of their four neighbours (both sides of every boundary)."""
    edge = np.zeros(labels2d.shape, dtype=bool)
    rows, cols = labels2d[1:, :] != labels2d[:-1, :], labels2d[:, 1:] != labels2d[:, :-1]
    edge[1:, :] |= rows
    edge[:-1, :] |= rows
    edge[:, 1:] |= cols
    edge[:, :-1] |= cols
    return edge


def paint_label_edges(rgb: np.ndarray, labels2d: np.ndarray) -> np.ndarray:
    """Paint, in place, the boundary pixels of each label of ``labels2d`` in its colour of
    :data:`diffdef.template.LABELS` onto ``rgb`` ((rows, cols, 3) uint8 of the same size). Voxel-exact
    boundaries rather than interpolated iso-lines: the preview shows the label map as written."""
    edge = label_edges(labels2d)
    for value, _, colour in LABELS[1:]:
        rgb[edge & (labels2d == value)] = np.round(np.asarray(colour) * 255).astype(np.uint8)


def _panel(t1_slice: np.ndarray, label_slice: np.ndarray, vmax: float, scale: int) -> np.ndarray:
    """(rows * scale, cols * scale, 3) uint8: the grey T1 slice (0..vmax) enlarged ``scale`` times (nearest), with
    its label boundaries."""
    grey = np.round(np.clip(t1_slice / vmax, 0.0, 1.0) * 255).astype(np.uint8)
    grey, labels = (np.repeat(np.repeat(a, scale, axis=0), scale, axis=1) for a in (grey, label_slice))
    rgb = np.repeat(grey[..., None], 3, axis=2)
    paint_label_edges(rgb, labels)
    return rgb


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _captioned(panels: list[np.ndarray], title: str, captions: list[str] | None = None, legend: bool = False,
               gap: int = 6):
    """PIL image: ``panels`` side by side (centred vertically), ``title`` above, optional captions above each
    panel and a legend of the label colours below."""
    from PIL import Image, ImageDraw

    font, small = _font(15), _font(12)
    top = 26 + (18 if captions else 0)
    bottom = 24 if legend else 4
    width = sum(p.shape[1] for p in panels) + gap * (len(panels) + 1)
    tallest = max(p.shape[0] for p in panels)
    height = tallest + top + bottom
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((width / 2, 13), title, fill="black", font=font, anchor="mm")
    x = gap
    for n, panel in enumerate(panels):
        canvas.paste(Image.fromarray(panel, "RGB"), (x, top + (tallest - panel.shape[0]) // 2))
        if captions:
            draw.text((x + panel.shape[1] / 2, top - 9), captions[n], fill="black", font=small, anchor="mm")
        x += panel.shape[1] + gap
    if legend:
        names = [(name, tuple(int(round(c * 255)) for c in colour)) for _, name, colour in LABELS[1:]]
        widths = [14 + 6 + draw.textlength(name, font=small) + 18 for name, _ in names]
        x, y = (width - sum(widths)) / 2, height - bottom / 2
        for (name, colour), w in zip(names, widths):
            draw.rectangle([x, y - 5, x + 14, y + 5], fill=colour, outline="black")
            draw.text((x + 20, y), name, fill="black", font=small, anchor="lm")
            x += w
    return canvas


def render_preview(t1: np.ndarray, labels: np.ndarray, grid: Grid, title: str = "", scale: int = 2) -> bytes:
    """PNG bytes: sagittal, coronal and axial slices through the lateral ventricles (neurological display, the
    subject's right on the right), enlarged ``scale`` times, with label boundaries and a legend."""
    t1_ras, lab_ras = to_ras_axes(t1, grid), to_ras_axes(labels, grid)
    centre = focus(lab_ras)
    vmax = float(np.percentile(t1[::2, ::2, ::2], 99.5)) or 1.0  # display contrast: every 8th voxel is plenty
    planes = list(PLANES)
    panels = [_panel(display_slice(t1_ras, p, centre[PLANES[p]]), display_slice(lab_ras, p, centre[PLANES[p]]),
                     vmax, scale) for p in planes]
    buf = _io.BytesIO()
    _captioned(panels, title, captions=planes, legend=True).save(buf, format="PNG")
    return buf.getvalue()


def _frame_image(t1: np.ndarray, labels: np.ndarray, grid: Grid, plane: str, index: int, text: str,
                 scale: int = 2):
    """One RGB frame (PIL image) of a fixed slice with label boundaries and a caption."""
    t1_ras, lab_ras = to_ras_axes(t1, grid), to_ras_axes(labels, grid)
    panel = _panel(display_slice(t1_ras, plane, index), display_slice(lab_ras, plane, index), 1.0, scale)
    return _captioned([panel], text)


# --------------------------------------------------------------------------------------------------------------
# Atlas


def atlas_sidecar(atlas, bundle=None, requested: dict | None = None, files: dict | None = None) -> dict:
    units = {}
    if bundle is not None:
        units = {c.name: c.unit for c in bundle.spec.conditions}
    return {
        "diffdef_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "conditions_requested": requested if requested is not None else atlas.conditions,
        "conditions": atlas.conditions,
        "condition_units": units,
        "seed": atlas.seed,
        **_sampling_used(atlas),
        "model": model_summary(bundle),
        "template": TEMPLATE_ID,
        "grid": {"shape": list(atlas.grid.shape), "affine_ras": atlas.grid.affine.tolist(),
                 "spacing_mm": np.round(atlas.grid.spacing, 4).tolist()},
        "labels": labels_table(),
        "label_volumes_ml": atlas.label_volumes_ml,
        "volume_calibration": dict(atlas.volume_calibration),
        "held_volumes": list(atlas.held_volumes),
        "folding_ratio": atlas.folding_ratio,
        "folding_ratio_grid": "working grid (where the velocity is integrated)",
        "folding_ratio_1mm": atlas.folding_ratio_1mm,
        "displacement_grid": {"shape": list(_export_field(atlas)[1].shape),
                              "spacing_mm": np.round(_export_field(atlas)[1].spacing, 4).tolist()},
        "warnings": list(atlas.warnings),
        "timings_s": dict(atlas.timings),
        "displacement_convention": "pull-back: atlas(x) = template(x + u(x)); the .nii.gz is an ITK/ANTs "
                                   "displacement field (LPS mm), the .nrrd a Slicer grid transform; both resample "
                                   "the template onto the atlas.",
        "files": {k: Path(p).name for k, p in (files or {}).items()},
    }


def _sampling_used(atlas) -> dict:
    """The DDIM steps, guidance, averaged samples and velocity smoothing (mm) that made ``atlas`` and whether its
    requested volumes were calibrated (None where it does not say)."""
    return {k: atlas.sampling.get(k) for k in ("steps", "guidance", "samples", "smoothing_mm", "calibrate_volumes")}


def _export_field(atlas):
    """(displacement (i, j, k, 3) RAS mm, grid) to export: the working-grid field when the atlas has it."""
    if getattr(atlas, "working_displacement_mm", None) is not None:
        return atlas.working_displacement_mm, atlas.working_grid
    return atlas.displacement_mm, atlas.grid


def write_atlas(atlas, folder, bundle=None, requested: dict | None = None, prefix: str = "atlas",
                overwrite: bool = False, preview: bool = True, progress: Callable | None = None) -> dict[str, Path]:
    """Write ``atlas`` (a :class:`diffdef.generate.Atlas`) into ``folder``; returns ``{kind: path}``.

    The Jacobian determinant map is written when ``atlas.jacobian`` is set. ``atlas.timings["writing_s"]`` is
    set to the time spent here. Raises :class:`FileExistsError` (nothing written) when a target exists and
    ``overwrite`` is off."""
    t0 = time.perf_counter()
    paths = atlas_paths(folder, prefix, jacobian=atlas.jacobian is not None)
    if not preview:
        paths.pop("preview")
    grid = atlas.grid
    with _transaction(paths, overwrite) as tmp:
        if progress:
            progress(0.0, "Writing the atlas")
        jobs = [
            # the field on its native working grid: ITK / Slicer interpolate it linearly, exactly as DiffDef did
            # to warp the 1 mm template, in a file ~60x smaller than its 1 mm resampling
            lambda: write_displacement_itk(tmp["displacement_itk"], *_export_field(atlas), overwrite=True),
            lambda: write_displacement_itk(tmp["displacement_slicer"], *_export_field(atlas), overwrite=True),
            lambda: write_image(tmp["t1"], np.asarray(atlas.t1, dtype=np.float32), grid, overwrite=True),
            lambda: write_image(tmp["labels"], np.asarray(atlas.labels, dtype=np.uint8), grid, overwrite=True),
        ]
        if "jacobian" in tmp:
            jobs.append(lambda: write_image(tmp["jacobian"], np.asarray(atlas.jacobian, dtype=np.float32), grid,
                                            overwrite=True))
        if "preview" in tmp:
            title = ", ".join(f"{k} {v:g}" for k, v in atlas.conditions.items() if v is not None) or "unconditional"
            jobs.append(lambda: tmp["preview"].write_bytes(render_preview(atlas.t1, atlas.labels, grid,
                                                                           f"DiffDef atlas: {title}")))
        _run_parallel(jobs)
        atlas.timings["writing_s"] = time.perf_counter() - t0
        _write_json(tmp["sidecar"], atlas_sidecar(atlas, bundle, requested, paths))
    atlas.timings["writing_s"] = time.perf_counter() - t0
    if progress:
        progress(1.0, "Written")
    return paths


# --------------------------------------------------------------------------------------------------------------
# Trajectory


def write_trajectory(frames: list, folder, varying: str, bundle=None, requested: dict | None = None,
                     prefix: str = "trajectory", overwrite: bool = False, plane: str = "coronal",
                     slice_index: int | None = None, frame_ms: int = 400,
                     progress: Callable | None = None) -> dict[str, Path]:
    """Write a series of atlases (``frames``: Atlas objects; their displacement is not needed) as a 4-D T1 and
    label NIfTI (i, j, k, t), an animated GIF and a PNG montage of one fixed slice (through the ventricles of
    the first frame unless ``slice_index``), a CSV of conditions and volumes per frame and a JSON sidecar."""
    if not frames:
        raise ValueError("A trajectory needs at least one atlas.")
    t0 = time.perf_counter()
    grid = frames[0].grid
    for f in frames[1:]:
        grid.require_same(f.grid, "atlas")
    paths = trajectory_paths(folder, prefix)
    names = list(frames[0].conditions)
    labels_all = [l for _, l, _ in LABELS[1:]]
    with _transaction(paths, overwrite) as tmp:
        if progress:
            progress(0.0, "Writing the trajectory")
        t1_4d = np.stack([np.asarray(f.t1, dtype=np.float32) for f in frames], axis=-1)
        lab_4d = np.stack([np.asarray(f.labels, dtype=np.uint8) for f in frames], axis=-1)
        _run_parallel([lambda: write_image(tmp["t1"], t1_4d, grid, overwrite=True),
                       lambda: write_image(tmp["labels"], lab_4d, grid, overwrite=True)])
        del t1_4d, lab_4d
        if slice_index is None:
            slice_index = focus(to_ras_axes(frames[0].labels, grid))[PLANES[plane]]
        check_slice_index(grid, plane, slice_index)
        images = []
        for n, f in enumerate(frames):
            value = f.conditions.get(varying)
            images.append(_frame_image(f.t1, f.labels, grid, plane, slice_index,
                                       f"{varying} = {value:g}" if value is not None else varying))
            if progress:
                progress(0.8 * (n + 1) / len(frames), f"Frame {n + 1}/{len(frames)}")
        images[0].save(tmp["animation"], format="GIF", save_all=True, append_images=images[1:],
                       duration=frame_ms, loop=0)
        from PIL import Image

        w, h = images[0].size
        cols = min(len(images), 6)
        rows = -(-len(images) // cols)
        montage = Image.new("RGB", (cols * w, rows * h), "white")
        for n, im in enumerate(images):
            montage.paste(im, ((n % cols) * w, (n // cols) * h))
        montage.save(tmp["montage"], format="PNG")
        with open(tmp["table"], "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["frame"] + names + [f"{l} (ml)" for l in labels_all] + ["folding_ratio", "warnings"])
            for n, f in enumerate(frames):
                writer.writerow([n] + ["" if f.conditions[c] is None else f"{f.conditions[c]:g}" for c in names]
                                + [f"{f.label_volumes_ml[l]:.3f}" for l in labels_all]
                                + [f"{f.folding_ratio:g}", " | ".join(f.warnings)])
        sidecar = {
            "diffdef_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "varying": varying,
            "conditions_requested": requested,
            "seed": frames[0].seed,
            **_sampling_used(frames[0]),
            "model": model_summary(bundle),
            "template": TEMPLATE_ID,
            "grid": {"shape": list(grid.shape), "affine_ras": grid.affine.tolist()},
            "slice": {"plane": plane, "index_ras_display": int(slice_index)},
            "labels": labels_table(),
            "frames": [{"conditions": f.conditions, "label_volumes_ml": f.label_volumes_ml,
                        "volume_calibration": dict(f.volume_calibration), "held_volumes": list(f.held_volumes),
                        "folding_ratio": f.folding_ratio, "warnings": list(f.warnings), "timings_s": dict(f.timings)}
                       for f in frames],
            "writing_s": time.perf_counter() - t0,
            "files": {k: p.name for k, p in paths.items()},
        }
        _write_json(tmp["sidecar"], sidecar)
    if progress:
        progress(1.0, "Written")
    return paths


# --------------------------------------------------------------------------------------------------------------
# Subject comparison

COMPARISON_FILES = {
    "subject_in_atlas": "{p}_subject_in_atlas.nii.gz",
    "subject_affine": "{p}_subject_affine.nii.gz",
    "log_jacobian": "{p}_log_jacobian.nii.gz",
    "warped_atlas_labels": "{p}_warped_atlas_labels.nii.gz",
    "subject_labels_affine": "{p}_subject_labels_affine.nii.gz",
    "displacement_itk": "{p}_displacement.nii.gz",
    "displacement_slicer": "{p}_displacement.nrrd",
    "affine": "{p}_affine.tfm",
    "atlas_t1": "{p}_atlas_t1.nii.gz",
    "atlas_labels": "{p}_atlas_labels.nii.gz",
    "table": "{p}.csv",
    "sidecar": "{p}.json",
}


def comparison_paths(folder, prefix: str = "compare", with_labels: bool = False) -> dict[str, Path]:
    folder = Path(folder)
    return {k: folder / v.format(p=prefix) for k, v in COMPARISON_FILES.items()
            if with_labels or k != "subject_labels_affine"}


def write_comparison(result, folder, bundle=None, requested: dict | None = None, prefix: str = "compare",
                     overwrite: bool = False, progress: Callable | None = None) -> dict[str, Path]:
    """Write a :class:`diffdef.compare.Comparison`: images on the 1 mm template grid (frames as in
    :mod:`diffdef.compare`), the atlas-frame -> aligned-subject displacement ``w`` (ITK/ANTs .nii.gz and Slicer
    .nrrd), the affine (ITK .tfm, atlas -> subject), a per-label CSV (volumes, Dice, HD95) and a JSON summary."""
    import SimpleITK as sitk

    t0 = time.perf_counter()
    paths = comparison_paths(folder, prefix, with_labels=result.subject_labels_affine is not None)
    grid = result.grid
    with _transaction(paths, overwrite) as tmp:
        if progress:
            progress(0.0, "Writing the comparison")
        f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
        u8 = lambda a: np.asarray(a, dtype=np.uint8)  # noqa: E731
        jobs = [
            lambda: write_image(tmp["subject_in_atlas"], f32(result.subject_in_atlas), grid, overwrite=True),
            lambda: write_image(tmp["subject_affine"], f32(result.subject_affine), grid, overwrite=True),
            lambda: write_image(tmp["log_jacobian"], f32(result.log_jacobian), grid, overwrite=True),
            lambda: write_image(tmp["warped_atlas_labels"], u8(result.warped_atlas_labels), grid, overwrite=True),
            lambda: write_image(tmp["atlas_t1"], f32(result.atlas.t1), grid, overwrite=True),
            lambda: write_image(tmp["atlas_labels"], u8(result.atlas.labels), grid, overwrite=True),
            lambda: write_displacement_itk(tmp["displacement_itk"], result.inverse_displacement_mm, grid,
                                           overwrite=True),
            lambda: write_displacement_itk(tmp["displacement_slicer"], result.inverse_displacement_mm, grid,
                                           overwrite=True),
        ]
        if "subject_labels_affine" in tmp:
            jobs.append(lambda: write_image(tmp["subject_labels_affine"], u8(result.subject_labels_affine), grid,
                                            overwrite=True))
        _run_parallel(jobs)
        sitk.WriteTransform(result.transform, str(tmp["affine"]))
        rows = result.rows()
        with open(tmp["table"], "w", newline="") as fh:
            keys = list(dict.fromkeys(k for r in rows for k in r))
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
        summary = result.summary()
        summary.update({
            "diffdef_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "conditions_requested": requested,
            "model": model_summary(bundle),
            "labels": labels_table(),
            "writing_s": time.perf_counter() - t0,
            "displacement_convention": "the displacement w is on the atlas frame: subject_in_atlas(y) = "
                                       "subject_affine(y + w(y)); the full map to the subject's own image is "
                                       "y -> affine(y + w(y)) (affine.tfm: ITK resampling convention, fixed = atlas).",
            "files": {k: p.name for k, p in paths.items()},
        })
        _write_json(tmp["sidecar"], summary)
    if progress:
        progress(1.0, "Written")
    return paths
