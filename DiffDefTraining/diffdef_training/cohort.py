"""Real-cohort ingestion: manifest -> validation -> SimpleITK preprocessing -> cache -> report -> torch Dataset.

A researcher points DiffDef at their own skull-stripped T1 images with a CSV manifest::

    image,labels,age,ventricle_volume
    sub-001/t1.nii.gz,sub-001/labels.nii.gz,63.5,24.1
    sub-002/t1.nrrd,,71,NA

* ``image`` (required): path of a 3-D T1, absolute or relative to the CSV's folder (NIfTI or any ITK format).
* ``labels`` (optional column, optional per row): a label map in the same space as the image
  (template label values: 0 background, 1 CSF, 2 GM, 3 WM, 4 lateral ventricles).
* ``subject`` (optional): an identifier, used in the report only.
* one column per condition, named by the caller; an empty cell, ``NA``, ``NaN``, ``n/a`` or ``None`` is a missing
  value and is kept as ``NaN``. Values must be finite and non-negative.

:func:`read_manifest` checks every row *before any work* (files exist, images are 3-D — from the header only —,
columns known and present, values numeric, finite, non-negative) and raises one :class:`ManifestError` listing
every problem as ``row N (line L): ...`` (N = 1-based data row, L = line in the file).

:func:`preprocess_subject` runs, per subject, with SimpleITK:

1. optional N4 bias-field correction (fitted on a shrunken copy, the bias field applied at full resolution);
2. affine registration of the subject T1 (moving) to the template T1 (fixed) with the core's
   :func:`diffdef.affine.register_affine` (shared with subject comparison): centred initialisation by image
   moments, Mattes mutual information, regular-step gradient descent with physical-shift scales, three levels
   (shrink 4/2/1, smoothing 2/1/0 mm) on copies of both images resampled to ``registration_spacing_mm``
   (3 mm by default: a 12-parameter affine needs no finer detail, and it keeps a subject to a few seconds on a
   shared CPU);
3. resampling onto the 1 mm template crop (T1 linear, labels nearest) and *block averaging* onto the working grid
   (T1 mean, labels majority vote) — the same reduction :meth:`Template.on_working_grid` applies to the template,
   so subject and template images are comparable voxel for voxel, and a 4 mm grid is not aliased by point
   sampling a 1 mm image;
4. robust intensity normalisation (the core's :func:`diffdef.affine.normalise_to_template`): the percentiles
   ``(0.5, 99.5)`` of the aligned subject within the template brain mask are mapped onto the *template's*
   percentiles within the same mask (0.25 and 0.92 for the MNI T1), piecewise linearly with 0 kept at 0, clipped
   to [0, 1]. The subject then lives on the template's 0..1 intensity scale (background 0, CSF dark but not
   black), which is what the autoencoder and the registration network compare it with;
   ``match_template=False`` maps the percentiles onto 0 and 1 instead;
5. with a label map, each label's volume in template space (:func:`template_space_volumes_ml`: the native count
   divided by the affine's determinant), which the held-volume fit of the export reads
   (:mod:`diffdef_training.held_volumes`); a cache entry made before it gets it on the next run.

It returns the arrays on the working grid (and, with ``keep_fine``, on the 1 mm crop) plus the fitted
``sitk.AffineTransform`` (template LPS point -> subject LPS point, ITK's resampling convention; saved as
``transform.tfm`` in the cache, loadable by Slicer and ANTs).

:func:`preprocess_cohort` runs all rows with a progress bar, keeps a content-addressed cache (key = hash of the
image/label file contents and the preprocessing options; entries written atomically), records every subject in
a report (CSV or JSON: row, line, subject, image, status ``ok`` / ``cached`` / ``failed``, error, seconds) and
returns a :class:`CohortDataset`. A failing subject is reported and skipped; the rest go on.

Command line: ``python -m diffdef_training.cohort manifest.csv --conditions age,ventricle_volume --cache DIR
--report report.csv``.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from diffdef.affine import (AffineOptions, brain_mask, normalise_intensity, normalise_to_template,  # noqa: F401
                            register_affine, resample_to_spacing)
from diffdef.geometry import Grid, from_sitk, to_sitk
from diffdef.io import atomic_path, read_image, write_image
from diffdef.template import CROP_SIZE, CROP_START, DEFAULT_FACTOR, NUM_LABELS, TEMPLATE_ID, Template, load_template

#: Bump when the preprocessing code changes in a way that changes its output: old cache entries are then ignored.
CACHE_VERSION = 1

IMAGE_COLUMN, LABELS_COLUMN, SUBJECT_COLUMN = "image", "labels", "subject"
MISSING_TOKENS = {"", "na", "nan", "n/a", "none", "null"}


# --------------------------------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------------------------------


class ManifestError(ValueError):
    """Every problem found in a manifest, one message per problem (``problems``), listed in ``str(error)``."""

    def __init__(self, path, problems: Sequence[str]):
        self.path = Path(path)
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{self.path}: {len(self.problems)} problem(s) in the manifest:\n{lines}")


@dataclass(frozen=True)
class ManifestRow:
    row: int  # 1-based data row
    line: int  # line of the file (the header is line 1)
    image: Path
    labels: Path | None
    conditions: tuple[float, ...]  # in the order of Manifest.condition_names, NaN = missing
    subject: str

    def where(self) -> str:
        return f"row {self.row} (line {self.line})"


@dataclass(frozen=True)
class Manifest:
    path: Path
    condition_names: tuple[str, ...]
    rows: tuple[ManifestRow, ...]

    def __len__(self) -> int:
        return len(self.rows)


def _image_header_shape(path: Path) -> tuple[tuple[int, ...], int]:
    """(spatial shape with trailing singleton dims removed, components per voxel), from the header only."""
    if str(path).lower().endswith((".nii", ".nii.gz")):
        import nibabel as nib

        shape = tuple(int(s) for s in nib.load(str(path)).header.get_data_shape())
        components = 1
    else:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        shape = tuple(int(s) for s in reader.GetSize())
        components = int(reader.GetNumberOfComponents())
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape, components


def _check_image(path: Path, what: str) -> tuple[str | None, tuple[int, ...] | None]:
    if not path.is_file():
        return f"{what} file not found: {path}", None
    try:
        shape, components = _image_header_shape(path)
    except Exception as exc:  # nibabel / ITK raise many types for unreadable files
        return f"{what} {path} cannot be read as an image ({type(exc).__name__}: {exc})", None
    if len(shape) != 3 or components != 1:
        extra = f" with {components} components" if components != 1 else ""
        return (f"{what} {path} is not a 3-D scalar image (shape {list(shape)}{extra}); "
                "take one 3-D volume first"), None
    return None, shape


def _parse_value(text: str) -> tuple[float | None, str | None]:
    """-> (value or NaN, None) or (None, problem)."""
    s = text.strip()
    if s.lower() in MISSING_TOKENS:
        return math.nan, None
    try:
        value = float(s)
    except ValueError:
        return None, f"is not a number ({text!r})"
    if math.isnan(value):
        return math.nan, None
    if math.isinf(value):
        return None, f"is infinite ({text!r})"
    if value < 0:
        return None, f"is negative ({text!r}); conditions must be >= 0"
    return value, None


def read_manifest(path, conditions: Sequence[str], require_labels: bool = False,
                  check_images: bool = True) -> Manifest:
    """Read and validate a manifest CSV; raise :class:`ManifestError` listing every problem, before any work.

    ``conditions``: the condition column names (all required as columns; cells may be missing).
    ``require_labels``: every row must name a label map. ``check_images``: read every image header (cheap).
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, [f"manifest file not found: {path}"])
    conditions = tuple(conditions)
    problems: list[str] = []
    if len(set(conditions)) != len(conditions):
        problems.append(f"condition names repeat: {list(conditions)}")
    reserved = {IMAGE_COLUMN, LABELS_COLUMN, SUBJECT_COLUMN} & set(conditions)
    if reserved:
        problems.append(f"condition names may not be {sorted(reserved)} (reserved columns)")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise ManifestError(path, ["the file is empty (a header line with at least 'image' is needed)"]) from None
        records = [(reader.line_num, rec) for rec in reader]
    known = (IMAGE_COLUMN, LABELS_COLUMN, SUBJECT_COLUMN) + conditions
    for name in header:
        if name not in known:
            problems.append(f"line 1: unknown column {name!r} (known: {', '.join(known)}; "
                            "pass it with --conditions if it is a condition)")
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        problems.append(f"line 1: repeated column(s) {dupes}")
    required = (IMAGE_COLUMN,) + conditions + ((LABELS_COLUMN,) if require_labels else ())
    for name in required:
        if name not in header:
            problems.append(f"line 1: missing required column {name!r}")
    if problems:  # rows cannot be interpreted without a sound header
        raise ManifestError(path, problems)

    col = {name: header.index(name) for name in header}
    base = path.parent
    rows: list[ManifestRow] = []
    n = 0
    for line, rec in records:
        if not any(c.strip() for c in rec):
            continue  # blank line
        n += 1
        where = f"row {n} (line {line})"
        if len(rec) != len(header):
            problems.append(f"{where}: has {len(rec)} cells, the header has {len(header)}")
            continue

        def resolve(cell: str) -> Path:
            p = Path(cell.strip()).expanduser()
            return p if p.is_absolute() else base / p

        image_cell = rec[col[IMAGE_COLUMN]].strip()
        image = labels = None
        image_shape = None
        if not image_cell:
            problems.append(f"{where}: the image cell is empty")
        else:
            image = resolve(image_cell)
            if check_images:
                problem, image_shape = _check_image(image, "image")
                if problem:
                    problems.append(f"{where}: {problem}")
            elif not image.is_file():
                problems.append(f"{where}: image file not found: {image}")
        label_cell = rec[col[LABELS_COLUMN]].strip() if LABELS_COLUMN in col else ""
        if label_cell:
            labels = resolve(label_cell)
            if check_images:
                problem, label_shape = _check_image(labels, "label map")
                if problem:
                    problems.append(f"{where}: {problem}")
                elif image_shape is not None and label_shape != image_shape:
                    problems.append(f"{where}: label map shape {list(label_shape)} differs from image shape "
                                    f"{list(image_shape)}; both must be on the same grid")
            elif not labels.is_file():
                problems.append(f"{where}: label map file not found: {labels}")
        elif require_labels:
            problems.append(f"{where}: the labels cell is empty (label maps are required)")
        values = []
        for name in conditions:
            value, problem = _parse_value(rec[col[name]])
            if problem:
                problems.append(f"{where}: column {name!r} {problem}")
            values.append(value)
        subject = rec[col[SUBJECT_COLUMN]].strip() if SUBJECT_COLUMN in col else ""
        if image is not None:
            rows.append(ManifestRow(n, line, image, labels, tuple(values), subject or f"row{n}"))
    if n == 0:
        problems.append("the manifest has no data rows")
    if problems:
        raise ManifestError(path, problems)
    return Manifest(path, conditions, tuple(rows))


# --------------------------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreprocessOptions(AffineOptions):
    """Everything that changes the output of :func:`preprocess_subject` (it is part of the cache key): the affine
    registration's settings (inherited) and the steps around it."""

    factor: int = DEFAULT_FACTOR  # working grid = 1 mm template crop downsampled by this factor
    n4: bool = False  # N4 bias-field correction
    n4_shrink: int = 4  # N4 is fitted on the image shrunk by this factor
    n4_iterations: tuple[int, ...] = (30, 30, 20)
    percentiles: tuple[float, float] = (0.5, 99.5)  # intensity normalisation within the brain
    match_template: bool = True  # map the percentiles onto the template's own (else onto 0 and 1)
    keep_fine: bool = False  # also keep the 1 mm crop (T1 + labels)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessOptions":
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(names)
        if unknown:
            raise ValueError(f"Unknown preprocessing option(s): {sorted(unknown)}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


@dataclass
class PreprocessResult:
    """Arrays (i, j, k) on the working grid ``grid`` (+ 1 mm crop ``fine_grid`` when kept) and the fitted transform."""

    image: np.ndarray  # float32 0..1
    labels: np.ndarray | None  # uint8
    grid: Grid
    transform: object  # sitk.AffineTransform: template (fixed) LPS point -> subject (moving) LPS point
    fine_image: np.ndarray | None = None
    fine_labels: np.ndarray | None = None
    fine_grid: Grid | None = None
    info: dict = field(default_factory=dict)  # metric value, iterations, seconds, normalisation percentiles


def _sitk():
    import SimpleITK as sitk

    return sitk


def set_threads(n: int | None) -> None:
    """Set SimpleITK's global default number of threads (``None``: leave it)."""
    if n:
        _sitk().ProcessObject.SetGlobalDefaultNumberOfThreads(int(n))


def _read_sitk(path: Path, pixel_type=None):
    """Read an image file as a SimpleITK image through diffdef.io (one geometry path for NIfTI and ITK formats)."""
    array, grid = read_image(path)
    array = np.asarray(array, dtype=np.float32 if pixel_type is None else pixel_type)
    return to_sitk(array, grid)


_FIXED_CACHE: dict = {}


def _fixed_image(template: Template, spacing_mm: float):
    key = (id(template), float(spacing_mm))
    if key not in _FIXED_CACHE:
        _FIXED_CACHE.clear()
        _FIXED_CACHE[key] = resample_to_spacing(to_sitk(template.t1.astype(np.float32), template.grid), spacing_mm)
    return _FIXED_CACHE[key]


def n4_correct(image, shrink: int = 4, iterations: Sequence[int] = (30, 30, 20)):
    """N4 bias-field correction fitted on a shrunken copy (mask: voxels above Otsu's threshold); the log bias
    field is evaluated at full resolution and divided out. Returns a float32 image."""
    sitk = _sitk()
    image = sitk.Cast(image, sitk.sitkFloat32)
    mask = sitk.OtsuThreshold(image, 0, 1, 200)
    small = sitk.Shrink(image, [shrink] * 3) if shrink > 1 else image
    small_mask = sitk.Shrink(mask, [shrink] * 3) if shrink > 1 else mask
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([int(i) for i in iterations])
    n4.Execute(small, small_mask)
    log_bias = n4.GetLogBiasFieldAsImage(image)
    return sitk.Cast(image / sitk.Exp(log_bias), sitk.sitkFloat32)


def _block_mean(array: np.ndarray, factor: int) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    return F.avg_pool3d(t, factor)[0, 0].numpy()


def _block_majority(labels: np.ndarray, factor: int) -> np.ndarray:
    """Most frequent label per block (ties: lowest label) — the argmax of the label fractions that
    :meth:`Template.on_working_grid` returns."""
    lab = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    onehot = F.one_hot(lab.clamp(0, NUM_LABELS - 1), NUM_LABELS).permute(3, 0, 1, 2)[None].float()
    return F.avg_pool3d(onehot, factor)[0].argmax(0).numpy().astype(np.uint8)


def template_space_volumes_ml(labels, transform) -> list[float]:
    """Each template label's volume (ml, labels 0 .. NUM_LABELS-1) in *template* space: the subject's label map
    ``labels`` (SimpleITK image, native space) counted at its own resolution, divided by the determinant of the
    fitted affine ``transform`` (template point -> subject point), as the atlas's volumes are counted on the
    template's grid. Exact for the affine, unlike a count of the labels resampled onto the 1 mm crop (nearest
    neighbour moves a boundary by up to half a voxel)."""
    sitk = _sitk()
    counts = np.bincount(sitk.GetArrayViewFromImage(labels).ravel().astype(np.int64), minlength=NUM_LABELS)
    native_ml = counts[:NUM_LABELS] * float(np.prod(labels.GetSpacing())) / 1000.0
    return (native_ml / affine_determinant(transform)).tolist()


def affine_determinant(transform) -> float:
    """|det| of the fitted affine ``transform`` (template point -> subject point): a subject's native volume is its
    template-space volume times this."""
    return abs(float(np.linalg.det(np.reshape(transform.GetMatrix(), (3, 3)))))


def preprocess_subject(image_path, labels_path=None, options: PreprocessOptions | None = None,
                       template: Template | None = None) -> PreprocessResult:
    """Preprocess one subject (see the module docstring). Raises on failure with a message naming the file."""
    sitk = _sitk()
    options = options or PreprocessOptions()
    template = template or load_template()
    start = time.perf_counter()
    moving = _read_sitk(Path(image_path), np.float32)
    stats = sitk.StatisticsImageFilter()
    stats.Execute(moving)
    if not stats.GetMaximum() > stats.GetMinimum():
        raise ValueError(f"{image_path} is constant (every voxel = {stats.GetMaximum():.4g}): nothing to register.")
    if options.n4:
        moving = n4_correct(moving, options.n4_shrink, options.n4_iterations)
    # the fixed image is resampled to the registration spacing once per process (register_affine then keeps it)
    try:
        transform, info = register_affine(_fixed_image(template, options.registration_spacing_mm), moving,
                                          options)
    except RuntimeError as exc:
        raise RuntimeError(f"Affine registration of {image_path} to the template failed: "
                           f"{str(exc).strip().splitlines()[-1]}") from exc
    working = template.working_grid(options.factor)
    fine_grid = working.fine
    reference = to_sitk(np.zeros(fine_grid.shape, np.uint8), fine_grid)
    fine_image, _ = from_sitk(sitk.Resample(moving, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    fine_image, norm = normalise_to_template(fine_image, template, options.percentiles, options.match_template)
    info.update(norm)
    fine_labels = None
    if labels_path is not None:
        labels = _read_sitk(Path(labels_path), np.uint8)
        fine_labels, _ = from_sitk(sitk.Resample(labels, reference, transform, sitk.sitkNearestNeighbor, 0,
                                                 sitk.sitkUInt8))
        fine_labels = fine_labels.astype(np.uint8)
    info["affine_determinant"] = affine_determinant(transform)
    if labels_path is not None:
        info["label_volumes_ml"] = template_space_volumes_ml(labels, transform)
    image = _block_mean(fine_image, options.factor)
    lab = _block_majority(fine_labels, options.factor) if fine_labels is not None else None
    info["seconds"] = time.perf_counter() - start
    return PreprocessResult(image, lab, working.grid, transform,
                            fine_image if options.keep_fine else None,
                            fine_labels if options.keep_fine else None,
                            fine_grid if options.keep_fine else None, info)


# --------------------------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------------------------


def file_digest(path, mode: str = "content") -> str:
    """``content``: sha256 of the bytes (survives moves and copies); ``stat``: path + size + mtime (instant)."""
    path = Path(path)
    if mode == "stat":
        st = path.stat()
        return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    if mode != "content":
        raise ValueError(f"Unknown hash mode {mode!r}; use 'content' or 'stat'.")
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_meta(folder) -> dict:
    """A cache entry's meta.json: grid, ``info`` (registration, normalisation, label volumes), options, files."""
    return json.loads((Path(folder) / "meta.json").read_text())


class PreprocessCache:
    """A folder of preprocessed subjects, one sub-folder per key::

        <root>/<key[:2]>/<key>/image.nii.gz, labels.nii.gz (if any), transform.tfm, meta.json
                               [fine_image.nii.gz, fine_labels.nii.gz with keep_fine]

    An entry is built in a temporary folder beside it and renamed into place, so a crash never leaves a half
    entry, and two processes racing on one key both end with a complete one.
    """

    def __init__(self, root, hash_mode: str = "content"):
        self.root = Path(root)
        self.hash_mode = hash_mode
        self.root.mkdir(parents=True, exist_ok=True)

    def key(self, image_path, labels_path, options: PreprocessOptions, template_id: str = TEMPLATE_ID) -> str:
        payload = {"version": CACHE_VERSION, "template": template_id, "options": options.to_dict(),
                   "image": file_digest(image_path, self.hash_mode),
                   "labels": file_digest(labels_path, self.hash_mode) if labels_path else None}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / key

    def has(self, key: str) -> bool:
        return (self.path(key) / "meta.json").is_file()

    def save(self, key: str, result: PreprocessResult, meta: dict | None = None) -> Path:
        sitk = _sitk()
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}.", dir=final.parent))
        try:
            write_image(tmp / "image.nii.gz", result.image.astype(np.float32), result.grid)
            if result.labels is not None:
                write_image(tmp / "labels.nii.gz", result.labels.astype(np.uint8), result.grid)
            if result.fine_image is not None:
                write_image(tmp / "fine_image.nii.gz", result.fine_image.astype(np.float32), result.fine_grid)
            if result.fine_labels is not None:
                write_image(tmp / "fine_labels.nii.gz", result.fine_labels.astype(np.uint8), result.fine_grid)
            sitk.WriteTransform(result.transform, str(tmp / "transform.tfm"))
            full = {"grid": result.grid.to_dict(), "info": result.info, **(meta or {})}
            (tmp / "meta.json").write_text(json.dumps(full, indent=1, default=str))  # written last: marks complete
            os.chmod(tmp, 0o777 & ~_umask())
            try:
                os.rename(tmp, final)
            except OSError:
                if not self.has(key):  # not a lost race: a stale incomplete folder is in the way
                    shutil.rmtree(final, ignore_errors=True)
                    os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return final

    def meta(self, key: str) -> dict:
        return read_meta(self.path(key))

    def complete_info(self, key: str, labels_path=None) -> dict:
        """The entry's ``info``, where an entry written before preprocessing recorded them gets its
        ``info["affine_determinant"]`` and, with a label file (the one the key was made from),
        ``info["label_volumes_ml"]``, from its stored transform; meta.json replaced atomically, and only when
        something was missing."""
        folder = self.path(key)
        meta = self.meta(key)
        info = meta.setdefault("info", {})
        missing = "affine_determinant" not in info or (labels_path and "label_volumes_ml" not in info)
        if not missing:
            return info
        transform = _sitk().AffineTransform(_sitk().ReadTransform(str(folder / "transform.tfm")))
        info["affine_determinant"] = affine_determinant(transform)
        if labels_path:
            info["label_volumes_ml"] = template_space_volumes_ml(_read_sitk(Path(labels_path), np.uint8), transform)
        with atomic_path(folder / "meta.json", overwrite=True) as tmp:
            tmp.write_text(json.dumps(meta, indent=1, default=str))
        return info

    def load(self, key: str) -> PreprocessResult:
        sitk = _sitk()
        folder = self.path(key)
        meta = self.meta(key)
        image, grid = read_image(folder / "image.nii.gz")
        labels = read_image(folder / "labels.nii.gz")[0] if (folder / "labels.nii.gz").is_file() else None
        fine_image = fine_labels = fine_grid = None
        if (folder / "fine_image.nii.gz").is_file():
            fine_image, fine_grid = read_image(folder / "fine_image.nii.gz")
        if (folder / "fine_labels.nii.gz").is_file():
            fine_labels = read_image(folder / "fine_labels.nii.gz")[0]
        transform = sitk.AffineTransform(sitk.ReadTransform(str(folder / "transform.tfm")))
        return PreprocessResult(image.astype(np.float32), None if labels is None else labels.astype(np.uint8), grid,
                                transform, fine_image, fine_labels, fine_grid, meta.get("info", {}))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------------------------------------------------
# Runner and dataset
# --------------------------------------------------------------------------------------------------------------------


class CohortDataset(torch.utils.data.Dataset):
    """Preprocessed subjects from a cache: ``dict(image=(1, i, j, k) float32, labels=(1, i, j, k) int64 or None,
    conditions=(C,) float32 with NaN for missing, subject=str, row=int)``, and with labels
    ``label_volumes_ml`` ((NUM_LABELS,) float64, template space, see :func:`template_space_volumes_ml`), and
    ``affine_determinant`` (float, see :func:`affine_determinant`). Loads lazily from the cache folders.

    ``labels`` is None for rows without a label map; use :func:`collate` in a DataLoader when some rows lack one.
    """

    def __init__(self, entries: Sequence[dict], condition_names: Sequence[str], grid: Grid):
        self.entries = list(entries)  # dicts: folder, conditions, subject, row
        self.condition_names = tuple(condition_names)
        self.grid = grid

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        e = self.entries[index]
        folder = Path(e["folder"])
        image, grid = read_image(folder / "image.nii.gz")
        self.grid.require_same(grid, f"cached image of {e['subject']}")
        item = {"image": torch.from_numpy(image.astype(np.float32))[None], "labels": None,
                "conditions": torch.tensor(e["conditions"], dtype=torch.float32), "subject": e["subject"],
                "row": e["row"]}
        info = read_meta(folder).get("info", {})
        if "affine_determinant" in info:
            item["affine_determinant"] = float(info["affine_determinant"])
        if (folder / "labels.nii.gz").is_file():
            item["labels"] = torch.from_numpy(read_image(folder / "labels.nii.gz")[0].astype(np.int64))[None]
            if "label_volumes_ml" in info:
                item["label_volumes_ml"] = torch.tensor(info["label_volumes_ml"], dtype=torch.float64)
        return item

    def conditions(self) -> torch.Tensor:
        """(N, C) condition matrix, NaN for missing."""
        return torch.tensor([e["conditions"] for e in self.entries], dtype=torch.float32).reshape(
            len(self.entries), len(self.condition_names))


def collate(batch: Sequence[dict]) -> dict:
    """DataLoader collate for :class:`CohortDataset`: stacks tensors; ``labels`` is a stacked tensor when every
    item has one, else a list with None for the missing ones."""
    labels = [b["labels"] for b in batch]
    return {"image": torch.stack([b["image"] for b in batch]),
            "labels": torch.stack(labels) if all(x is not None for x in labels) else labels,
            "conditions": torch.stack([b["conditions"] for b in batch]),
            "subject": [b["subject"] for b in batch], "row": torch.tensor([b["row"] for b in batch])}


REPORT_FIELDS = ("row", "line", "subject", "image", "labels", "status", "error", "seconds", "key",
                 "affine_determinant", "registration_metric")


def write_report(path, records: Sequence[dict]) -> Path:
    """Write the per-subject report, CSV or JSON by suffix, atomically (replacing an older report)."""
    path = Path(path)
    with atomic_path(path, overwrite=True) as tmp:
        if path.suffix.lower() == ".json":
            tmp.write_text(json.dumps(list(records), indent=1, default=str))
        else:
            with open(tmp, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=REPORT_FIELDS, extrasaction="ignore")
                w.writeheader()
                w.writerows(records)
    return path


def preprocess_cohort(manifest, cache_dir, options: PreprocessOptions | None = None, report=None,
                      conditions: Sequence[str] | None = None, progress: bool = True, threads: int | None = None,
                      hash_mode: str = "content", template: Template | None = None,
                      preprocess: Callable = preprocess_subject) -> tuple[CohortDataset, list[dict]]:
    """Preprocess every manifest row (cache hits are not recomputed), write ``report``, return (dataset, records).

    ``manifest``: a :class:`Manifest` or a CSV path (then ``conditions`` names the condition columns and the
    manifest is validated first). A subject that fails is recorded with its error and left out of the dataset.
    """
    from tqdm.auto import tqdm

    if not isinstance(manifest, Manifest):
        manifest = read_manifest(manifest, conditions or ())
    options = options or PreprocessOptions()
    template = template or load_template()
    set_threads(threads)
    cache = PreprocessCache(cache_dir, hash_mode)
    records, entries = [], []
    bar = tqdm(manifest.rows, desc="preprocessing", unit="subject", disable=not progress)
    for r in bar:
        rec = {"row": r.row, "line": r.line, "subject": r.subject, "image": str(r.image),
               "labels": str(r.labels) if r.labels else "", "status": "", "error": "", "seconds": 0.0, "key": "",
               "affine_determinant": "", "registration_metric": ""}
        start = time.perf_counter()
        try:
            key = cache.key(r.image, r.labels, options)
            rec["key"] = key
            if cache.has(key):
                rec["status"] = "cached"
                info = cache.complete_info(key, r.labels)
            else:
                result = preprocess(r.image, r.labels, options, template)
                cache.save(key, result, {"image": str(r.image), "labels": str(r.labels) if r.labels else None,
                                         "options": options.to_dict(), "template": TEMPLATE_ID})
                rec["status"], info = "ok", result.info
            rec["affine_determinant"], rec["registration_metric"] = info["affine_determinant"], info.get("metric", "")
            entries.append({"folder": str(cache.path(key)), "conditions": list(r.conditions),
                            "subject": r.subject, "row": r.row})
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            rec["status"] = "failed"
            rec["error"] = f"{type(exc).__name__}: {exc}".replace("\n", " ")
            rec["traceback"] = traceback.format_exc(limit=3)
        rec["seconds"] = round(time.perf_counter() - start, 3)
        records.append(rec)
        bar.set_postfix(failed=sum(x["status"] == "failed" for x in records))
    if report is not None:
        write_report(report, records)
    return CohortDataset(entries, manifest.condition_names, template.working_grid(options.factor).grid), records


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m diffdef_training.cohort",
                                          description="Validate and preprocess a real cohort (manifest CSV).")
    p.add_argument("manifest", help="CSV with columns image, [labels], [subject] and one per condition")
    p.add_argument("--conditions", default="", help="comma-separated condition columns, e.g. age,ventricle_volume")
    p.add_argument("--cache", required=True, help="cache folder (a second run reuses it)")
    p.add_argument("--report", default=None, help="report file, .csv or .json (default: <cache>/report.csv)")
    p.add_argument("--require-labels", action="store_true", help="every row must have a label map")
    p.add_argument("--validate-only", action="store_true", help="check the manifest and stop")
    p.add_argument("--n4", action="store_true", help="N4 bias-field correction")
    p.add_argument("--factor", type=int, default=DEFAULT_FACTOR, help="working-grid downsampling of the 1 mm crop")
    p.add_argument("--registration-spacing", type=float, default=PreprocessOptions.registration_spacing_mm,
                   help="spacing (mm) the affine registration runs at")
    p.add_argument("--keep-fine", action="store_true", help="also cache the 1 mm crop")
    p.add_argument("--hash", choices=("content", "stat"), default="content",
                   help="cache key from file contents (default) or path+size+mtime")
    p.add_argument("--threads", type=int, default=None, help="SimpleITK threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def preprocess_main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: validate the manifest, preprocess (cached), write the report. Exit code 0 if every subject
    succeeded, 1 if some failed, 2 for an invalid manifest."""
    args = build_parser().parse_args(argv)
    conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    try:
        manifest = read_manifest(args.manifest, conditions, require_labels=args.require_labels)
    except ManifestError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"{args.manifest}: {len(manifest)} subject(s), conditions {list(conditions)}: manifest valid.")
    if args.validate_only:
        return 0
    options = PreprocessOptions(factor=args.factor, n4=args.n4, registration_spacing_mm=args.registration_spacing,
                                keep_fine=args.keep_fine, seed=args.seed)
    report = args.report or str(Path(args.cache) / "report.csv")
    dataset, records = preprocess_cohort(manifest, args.cache, options, report, progress=not args.no_progress,
                                         threads=args.threads, hash_mode=args.hash)
    counts = {s: sum(r["status"] == s for r in records) for s in ("ok", "cached", "failed")}
    print(f"{counts['ok']} preprocessed, {counts['cached']} from the cache, {counts['failed']} failed; "
          f"report: {report}")
    done = sorted((r for r in records if r["status"] != "failed"), key=lambda r: r["affine_determinant"])
    if done:
        print(f"affine determinant (subject volume / template volume): median "
              f"{done[len(done) // 2]['affine_determinant']:.3f}, smallest {done[0]['affine_determinant']:.3f} "
              f"({done[0]['subject']}), largest {done[-1]['affine_determinant']:.3f} ({done[-1]['subject']}); a "
              f"subject far from the others is worth a look (a failed registration scales the brain)")
    for r in records:
        if r["status"] == "failed":
            print(f"  row {r['row']} (line {r['line']}) {r['image']}: {r['error']}", file=sys.stderr)
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(preprocess_main())
