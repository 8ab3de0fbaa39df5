"""Subject comparison: where does a brain differ from its condition-matched atlas?

:func:`compare_subject` runs, for a subject T1 on any grid (any spacing, any orientation):

1. the condition-matched atlas (generated with :class:`~diffdef.generate.AtlasGenerator`, or reused);
2. affine registration of the subject to the atlas T1 (SimpleITK, :mod:`diffdef.affine`), the subject resampled
   onto the 1 mm template grid (linear) and normalised onto the template's 0..1 intensity scale;
3. atlas and aligned subject block-averaged onto the bundle's working grid (as
   :meth:`Template.on_working_grid` does), and the bundle's frozen registration network run with moving = atlas,
   fixed = subject: a stationary velocity ``v`` (working-grid voxels), integrated by scaling and squaring into
   ``u = exp(v)`` and ``w = exp(-v)``, both resampled to the 1 mm template grid.

Frames. Every array of a :class:`Comparison` lies on the 1 mm template grid ``grid``, ``(i, j, k)``. Two frames
share that grid:

* the *atlas frame* (the atlas's anatomy): ``atlas.t1``, ``atlas.labels``, ``subject_in_atlas``, ``log_jacobian``,
  ``inverse_displacement_mm``;
* the *aligned subject frame* (the subject's anatomy after the affine only): ``subject_affine``,
  ``warped_atlas_labels``, ``subject_labels_affine``, ``displacement_mm``.

Displacements are RAS mm vectors ``(i, j, k, 3)`` in the pull-back convention of :mod:`diffdef.geometry`:

* ``displacement_mm`` = ``u``: ``warped_atlas(x) = atlas(x + u(x))`` for ``x`` in the aligned subject frame;
* ``inverse_displacement_mm`` = ``w``: ``subject_in_atlas(y) = subject_affine(y + w(y))`` for ``y`` in the atlas
  frame. ``w`` is the displacement of ``exp(-v)``, the inverse of ``u`` up to integration error.

``affine_ras`` is the 4x4 map (atlas-frame RAS mm) -> (subject scanner RAS mm); ``transform`` is the same map as a
``sitk.AffineTransform`` (LPS, ITK's resampling convention: fixed = atlas, moving = subject). The full map from the
atlas frame to the subject's own image is ``y -> affine_ras(y + w(y))`` (a Slicer grid transform ``w`` followed
by the linear transform).

Log-Jacobian sign. ``log_jacobian(y) = log det(I + grad w(y))`` on the atlas frame: ``y -> y + w(y)`` takes an atlas
point to the corresponding point of the (affinely aligned) subject, so ``det > 1`` means a small neighbourhood of
the atlas corresponds to a larger region of the subject. **Positive = the subject is locally larger than its
atlas (expansion), negative = locally smaller (shrinkage)**, 0 = same size. The global size difference is taken
out by the affine (its volume ratio is ``affine_volume_ratio``). Where the map folds (``det <= 0``), the value is
clamped to ``log(1e-3)``. Summed over an atlas structure, ``exp(log_jacobian)`` gives the structure's volume in
the aligned subject, which ``volumes[name]["subject_ml"]`` measures by counting ``warped_atlas_labels``.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import affine as affine_mod
from . import fields, metrics
from .generate import Atlas, AtlasGenerator
from .geometry import Grid, displacement_to_mm
from .sampling import Cancelled
from .template import LABELS, NUM_LABELS

__all__ = ["Comparison", "compare_subject", "deformations", "working_layout", "to_working_grid", "log_jacobian",
           "Cancelled"]

#: det J is clamped to this before the log (folded voxels): log_jacobian >= log(1e-3) ~ -6.9.
MIN_DET = 1e-3
LABEL_VALUES = tuple(v for v, _, _ in LABELS if v)
LABEL_NAME = {v: name for v, name, _ in LABELS}


@dataclass
class Comparison:
    """Result of :func:`compare_subject` (frames and conventions in the module docstring). Arrays ``(i, j, k)``
    on ``grid`` (the 1 mm template grid).

    * ``subject_affine`` float32 0..1: the subject after the affine, on the template's intensity scale.
    * ``subject_in_atlas`` float32 0..1: the subject in atlas space (affine, then the inverse deformation).
    * ``warped_atlas_labels`` uint8: the atlas labels carried onto the subject's (aligned) anatomy.
    * ``subject_labels_affine`` uint8 or None: the subject's own labels after the affine (nearest).
    * ``log_jacobian`` float32: log det J of the atlas -> subject map, positive = subject locally larger.
    * ``displacement_mm`` / ``inverse_displacement_mm`` float32 ``(i, j, k, 3)`` RAS mm: ``u`` and ``w``.
    * ``affine_ras`` 4x4: atlas RAS mm -> subject RAS mm; ``transform``: the same, ``sitk.AffineTransform``.
    * ``affine_volume_ratio``: ``|det affine|`` = subject volume / aligned volume (global size).
    * ``folding_ratio`` % of voxels with ``det(I + grad u) <= 0`` (:func:`diffdef.metrics.folding_ratio`).
    * ``mean_displacement_mm``: mean ``|u|`` over the subject's brain (``warped_atlas_labels > 0``), mm
      (:func:`diffdef.metrics.centrality` of the single field ``u``).
    * ``volumes``: ``{label name: {atlas_ml, subject_ml, difference_ml, difference_percent, subject_native_ml
      [, labelled_ml]}}``; ``subject_ml`` counts ``warped_atlas_labels`` (aligned frame, global size taken out),
      ``subject_native_ml = subject_ml * affine_volume_ratio`` (in the subject's own space), ``labelled_ml`` the
      subject's label map on its own grid (when given); differences are ``subject_ml - atlas_ml``.
    * ``dice`` / ``hd95_mm``: ``{label name: value}`` between ``warped_atlas_labels`` and
      ``subject_labels_affine`` (:func:`diffdef.metrics.dice` / :func:`~diffdef.metrics.hd95`, mm), or None
      without subject labels; nan where a label is absent from both maps, HD95 inf where absent from one.
    * ``velocity`` ``(1, 3, ...)`` on the bundle's working grid, working-grid voxels (the network's output).
    """

    grid: Grid
    atlas: Atlas
    subject_affine: np.ndarray
    subject_in_atlas: np.ndarray
    warped_atlas_labels: np.ndarray
    log_jacobian: np.ndarray
    displacement_mm: np.ndarray
    inverse_displacement_mm: np.ndarray
    affine_ras: np.ndarray
    transform: object
    affine_volume_ratio: float
    folding_ratio: float
    mean_displacement_mm: float
    volumes: dict
    velocity: torch.Tensor
    subject_labels_affine: np.ndarray | None = None
    dice: dict | None = None
    hd95_mm: dict | None = None
    conditions: dict = field(default_factory=dict)
    seed: int = 0
    warnings: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def rows(self) -> list[dict]:
        """One row per label (value, name, volumes in ml, difference in ml and %, Dice, HD95 in mm): the
        per-structure table for CSV files and Slicer table nodes."""
        out = []
        for value in LABEL_VALUES:
            name = LABEL_NAME[value]
            row = {"label": value, "name": name, **self.volumes[name]}
            if self.dice is not None:
                row["dice"] = self.dice[name]
                row["hd95_mm"] = self.hd95_mm[name]
            out.append(row)
        return out

    def summary(self) -> dict:
        """JSON-ready scalars: conditions, seed, affine, folding ratio, mean displacement, volumes, Dice, HD95."""
        return {"conditions": self.conditions, "seed": self.seed, "affine_ras": self.affine_ras.tolist(),
                "affine_volume_ratio": self.affine_volume_ratio, "folding_ratio_percent": self.folding_ratio,
                "mean_displacement_mm": self.mean_displacement_mm, "volumes": self.volumes, "dice": self.dice,
                "hd95_mm": self.hd95_mm, "warnings": list(self.warnings), "timings": self.timings,
                "registration": self.info}


# --------------------------------------------------------------------------------------------------------------------
# Working grid
# --------------------------------------------------------------------------------------------------------------------


def working_layout(fine: Grid, work: Grid) -> tuple[tuple[int, int, int], int]:
    """(crop start in ``fine`` voxels, factor) such that ``work == fine.crop(start, factor * work.shape)
    .downsample(factor)`` (the bundle's working grid is a block-downsampled crop of the 1 mm template grid)."""
    factor = int(round(float(work.spacing[0]) / float(fine.spacing[0])))
    if factor >= 1:
        centre = fine.world_to_voxel(work.voxel_to_world(np.zeros(3)))
        start = np.round(centre - (factor - 1) / 2.0).astype(int)
        if np.all(start >= 0) and np.all(start + factor * np.asarray(work.shape) <= np.asarray(fine.shape)):
            candidate = fine.crop(tuple(start), tuple(factor * s for s in work.shape)).downsample(factor)
            if candidate.same_as(work):
                return tuple(int(s) for s in start), factor
    raise ValueError(f"The bundle's working grid (shape {work.shape}, spacing {np.round(work.spacing, 3).tolist()} "
                     f"mm) is not a block-downsampled crop of the template grid (shape {fine.shape}); "
                     "the bundle does not belong to this template.")


def to_working_grid(array: np.ndarray, fine: Grid, work: Grid) -> torch.Tensor:
    """Block average of a 1 mm array ``(i, j, k)`` on ``fine`` onto ``work`` -> ``(1, 1, ...)`` float32 tensor
    (the reduction :meth:`Template.on_working_grid` applies to the template)."""
    start, factor = working_layout(fine, work)
    sl = tuple(slice(s, s + factor * n) for s, n in zip(start, work.shape))
    t = torch.from_numpy(np.ascontiguousarray(np.asarray(array, dtype=np.float32)[sl]))[None, None]
    return F.avg_pool3d(t, factor)


@torch.no_grad()
def deformations(velocity: torch.Tensor, work: Grid, grid: Grid, steps: int = fields.DEFAULT_INTEGRATION_STEPS
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Velocity ``(1, 3, ...)`` on ``work`` (voxels) -> ``(u, w)``: the displacements of ``exp(v)`` and
    ``exp(-v)``, resampled to ``grid``, in ``grid`` voxels."""
    u = fields.resample_displacement(fields.integrate_velocity(velocity, steps), work, grid)
    w = fields.resample_displacement(fields.integrate_velocity(-velocity, steps), work, grid)
    return u, w


def log_jacobian(disp: torch.Tensor) -> torch.Tensor:
    """``log det(I + grad disp)`` ``(B, 1, ...)`` of a voxel-unit displacement ``(B, 3, ...)``, det clamped to
    :data:`MIN_DET`. For ``disp = w`` (atlas frame -> subject), positive = subject locally larger."""
    return torch.log(fields.jacobian_determinant(disp).clamp_min(MIN_DET))


# --------------------------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------------------------


def _check_subject(subject, grid: Grid) -> np.ndarray:
    if isinstance(subject, torch.Tensor):
        subject = subject.detach().cpu().numpy()
    a = np.asarray(subject)
    if a.ndim != 3:
        hint = " Take one 3-D volume of the series first." if a.ndim == 4 else ""
        raise ValueError(f"The subject must be a 3-D volume (i, j, k); got a {a.ndim}-D array of shape "
                         f"{tuple(a.shape)}.{hint}")
    if a.dtype.kind not in "iufb":
        raise ValueError(f"The subject must hold numbers; got dtype {a.dtype}.")
    if not isinstance(grid, Grid):
        raise TypeError(f"subject_grid must be a diffdef.geometry.Grid, got {type(grid).__name__}.")
    if tuple(a.shape) != grid.shape:
        raise ValueError(f"The subject's shape {tuple(a.shape)} does not match its grid {grid.shape}.")
    a = a.astype(np.float32)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"The subject contains {int((~np.isfinite(a)).sum())} NaN or infinite voxel(s); "
                         "fix or mask them first.")
    if not a.max() > a.min():
        raise ValueError(f"The subject image is constant (every voxel = {float(a.max()):.4g}): nothing to compare.")
    return a


def _check_labels(labels, subject_grid: Grid, labels_grid: Grid | None) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    a = np.asarray(labels)
    if a.ndim != 3:
        raise ValueError(f"The subject label map must be 3-D (i, j, k); got shape {tuple(a.shape)}.")
    if labels_grid is not None:
        subject_grid.require_same(labels_grid, "subject label map")
    if tuple(a.shape) != subject_grid.shape:
        raise ValueError(f"The subject label map is on another grid (shape {tuple(a.shape)}) than the subject "
                         f"(shape {subject_grid.shape}). Resample it onto the subject's grid first.")
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
            raise ValueError("The subject label map must hold integer labels; it has NaN or fractional values.")
    elif a.dtype.kind not in "iub":
        raise ValueError(f"The subject label map must hold integer labels; got dtype {a.dtype}.")
    a = a.astype(np.int64)
    present = np.unique(a)
    if not np.any(present != 0):
        raise ValueError("The subject label map is empty (every voxel is background 0): nothing to compare.")
    unknown = sorted(int(v) for v in present if v != 0 and int(v) not in LABEL_VALUES)
    if unknown:
        valid = ", ".join(f"{v} {n}" for v, n in LABEL_NAME.items())
        raise ValueError(f"The subject label map has value(s) {unknown} that are not template labels; "
                         f"valid values: {valid}.")
    return a.astype(np.uint8)


def _resolve_atlas(generator: AtlasGenerator, conditions: dict | None, atlas: Atlas | None):
    if atlas is None:
        if conditions is None:
            raise ValueError("Give the subject's conditions (e.g. {'age': 70}) or a generated atlas.")
        generator.spec.validate(conditions)  # raises a clear error before any work
        return None
    if not isinstance(atlas, Atlas):
        raise TypeError(f"atlas must be a diffdef.generate.Atlas, got {type(atlas).__name__}.")
    generator.template.grid.require_same(atlas.grid, "atlas")
    if conditions:
        values, _ = generator.spec.validate(conditions)
        differ = {k: (v, atlas.conditions.get(k)) for k, v in values.items()
                  if not (v is None and atlas.conditions.get(k) is None)
                  and (v is None or atlas.conditions.get(k) is None or not math.isclose(v, atlas.conditions[k]))}
        if differ:
            raise ValueError("The atlas was generated for other conditions than requested: "
                             + ", ".join(f"{k} {b} (atlas) vs {a} (requested)" for k, (a, b) in differ.items()))
    return atlas


# --------------------------------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------------------------------


def compare_subject(generator: AtlasGenerator, subject: np.ndarray, subject_grid: Grid, conditions: dict | None,
                    subject_labels: np.ndarray | None = None, seed: int = 0, atlas: Atlas | None = None,
                    progress: Callable[[float, str], None] | None = None, cancel: Callable[[], bool] | None = None,
                    labels_grid: Grid | None = None,
                    affine_options: affine_mod.AffineOptions | None = None, sampling: dict | None = None) -> Comparison:
    """Compare a subject T1 with its condition-matched atlas (see the module docstring).

    ``subject``: a 3-D T1 ``(i, j, k)`` on ``subject_grid`` (any spacing / orientation, skull-stripped as the
    template, any intensity scale). ``conditions``: ``{name: value}`` of the bundle's spec (None when ``atlas`` is
    given). ``subject_labels``: optional label map on ``subject_grid`` (template values 0..4; ``labels_grid``, when
    given, must equal ``subject_grid``). ``seed``: atlas sampling and affine metric sampling. ``atlas``: reuse an
    atlas from ``generator.generate`` instead of generating one. ``progress(fraction, message)`` is called between
    steps; ``cancel()`` returning True raises :class:`~diffdef.sampling.Cancelled`. ``affine_options``: see
    :class:`diffdef.affine.AffineOptions` (its seed is replaced by ``seed``). ``sampling``: ``steps``, ``guidance``
    and ``samples`` for :meth:`~diffdef.generate.AtlasGenerator.generate` (None or absent: the bundle's).

    Raises ``ValueError`` with a clear message for a subject that is not 3-D, holds NaN / inf or is constant;
    labels on another grid, empty, or with non-template values; invalid conditions (a ``ConditionError``)."""
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    subject = _check_subject(subject, subject_grid)
    labels = _check_labels(subject_labels, subject_grid, labels_grid) if subject_labels is not None else None
    atlas = _resolve_atlas(generator, conditions, atlas)
    if "registration" not in generator.bundle.nets:
        raise ValueError(f"The bundle {generator.bundle.path} has no registration network; subject comparison "
                         "needs one.")
    template = generator.template
    grid = template.grid
    work = generator.bundle.working_grid
    working_layout(grid, work)  # a clear error for a foreign bundle, before any work
    device = generator.device

    def step(fraction: float, message: str) -> None:
        if cancel is not None and cancel():
            raise Cancelled("Subject comparison was cancelled.")
        if progress is not None:
            progress(fraction, message)

    # 1. atlas
    if atlas is None:
        step(0.0, "Generating the condition-matched atlas")
        t = time.perf_counter()
        atlas = generator.generate(conditions, seed=seed, **(sampling or {}), cancel=cancel,
                                   progress=(lambda f, m: progress(0.4 * f, "Atlas generated" if f >= 1 else m))
                                   if progress else None)
        timings["atlas_s"] = time.perf_counter() - t
    # 2. affine
    step(0.4, "Affine registration of the subject to the atlas (SimpleITK)")
    t = time.perf_counter()
    options = dataclasses.replace(affine_options or affine_mod.AffineOptions(), seed=int(seed))
    transform, info = affine_mod.register_subject(subject, subject_grid, atlas.t1, grid, options)
    affine_ras = affine_mod.transform_to_ras(transform)
    aligned = affine_mod.resample_into(subject, subject_grid, transform, grid)
    aligned, norm = affine_mod.normalise_to_template(aligned, template)
    info.update(norm)
    labels_aligned = (affine_mod.resample_into(labels, subject_grid, transform, grid, labels=True)
                      if labels is not None else None)
    timings["affine_s"] = time.perf_counter() - t
    # 3. learned deformable registration on the working grid
    step(0.6, "Deformable registration (registration network)")
    t = time.perf_counter()
    steps = int(generator.sampling.get("integration_steps", fields.DEFAULT_INTEGRATION_STEPS))
    with torch.no_grad():
        moving = to_working_grid(atlas.t1, grid, work).to(device)
        fixed = to_working_grid(aligned, grid, work).to(device)
        velocity = generator.bundle.nets["registration"](moving, fixed).float()
        u, w = deformations(velocity, work, grid, steps)
    timings["network_s"] = time.perf_counter() - t
    # 4. outputs on the 1 mm grid
    step(0.7, "Warping the atlas and the subject")
    t = time.perf_counter()
    with torch.no_grad():
        warped_labels = fields.warp_labels(torch.from_numpy(atlas.labels.astype(np.int64))[None, None].to(device), u)
        warped_labels = warped_labels[0, 0].cpu().numpy().astype(np.uint8)
        subject_in_atlas = fields.warp_image(torch.from_numpy(aligned)[None, None].to(device), w)[0, 0].cpu().numpy()
        u_mm = displacement_to_mm(u, grid)
        w_mm = displacement_to_mm(w, grid)
        det_u = fields.jacobian_determinant(u)
        folding = metrics.folding_ratio(det_u)
        del det_u
        logj = log_jacobian(w)[0, 0].cpu().numpy().astype(np.float32)
        # = metrics.centrality(u_mm, mask=brain) (the mean of one field is itself), in float32: 10x faster
        brain = torch.from_numpy(warped_labels > 0).to(device)
        mean_disp = float(torch.linalg.vector_norm(u_mm[0], dim=0)[brain].double().mean())
    timings["warping_s"] = time.perf_counter() - t
    # 5. volumes and overlap
    step(0.8, "Volumes and overlap")
    t = time.perf_counter()
    ratio = float(abs(np.linalg.det(affine_ras[:3, :3])))
    vox = grid.voxel_volume_ml
    atlas_counts = np.bincount(atlas.labels.ravel(), minlength=NUM_LABELS)
    subject_counts = np.bincount(warped_labels.ravel(), minlength=NUM_LABELS)
    labelled = np.bincount(labels.ravel(), minlength=NUM_LABELS) if labels is not None else None
    volumes = {}
    for value in LABEL_VALUES:
        a_ml, s_ml = float(atlas_counts[value]) * vox, float(subject_counts[value]) * vox
        row = {"atlas_ml": a_ml, "subject_ml": s_ml, "difference_ml": s_ml - a_ml,
               "difference_percent": 100.0 * (s_ml - a_ml) / a_ml if a_ml > 0 else float("nan"),
               "subject_native_ml": s_ml * ratio}
        if labelled is not None:
            row["labelled_ml"] = float(labelled[value]) * subject_grid.voxel_volume_ml
        volumes[LABEL_NAME[value]] = row
    dice = hd = None
    if labels_aligned is not None:
        if not np.any(labels_aligned):
            raise ValueError("The subject label map falls outside the atlas after the affine registration "
                             "(nothing left to compare); check that it belongs to this subject.")
        dice = {LABEL_NAME[k]: v for k, v in metrics.dice(warped_labels, labels_aligned, LABEL_VALUES).items()}
        step(0.85, "HD95 per label")
        hd = {LABEL_NAME[k]: v for k, v in metrics.hd95(warped_labels, labels_aligned, grid, LABEL_VALUES).items()}
    timings["metrics_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_all
    if progress:
        progress(1.0, "Done")
    return Comparison(
        grid=grid, atlas=atlas, subject_affine=aligned, subject_in_atlas=subject_in_atlas.astype(np.float32),
        warped_atlas_labels=warped_labels, log_jacobian=logj,
        displacement_mm=u_mm[0].permute(1, 2, 3, 0).cpu().numpy().astype(np.float32),
        inverse_displacement_mm=w_mm[0].permute(1, 2, 3, 0).cpu().numpy().astype(np.float32),
        affine_ras=affine_ras, transform=transform, affine_volume_ratio=ratio, folding_ratio=folding,
        mean_displacement_mm=mean_disp, volumes=volumes, velocity=velocity.cpu(), subject_labels_affine=labels_aligned,
        dice=dice, hd95_mm=hd, conditions=dict(atlas.conditions), seed=int(seed), warnings=list(atlas.warnings),
        timings=timings, info=info)
