"""A synthetic cohort with a known law, built from the real MNI template.

The law (all volumes in ml, measured on the template's 1 mm grid unless said otherwise):

* age ``a`` ~ Uniform[45, 82] years;
* lateral-ventricle volume ``V`` ~ LogNormal(log m(a), 0.35), clipped to [5, 120], with
  ``m(a) = 15 * exp(0.0265 (a - 45))``;
* brain tissue (GM + WM) ``B(a) = B_template * (1 - 0.0025 (a - 45))``;
* subject = template o exp(v_cond(a, V) + v_ind) (pull-back: ``subject(x) = template(phi(x))``), where
  ``v_cond = alpha * e_vent + beta * e_tissue``: ``e_vent`` is the gradient of the Gaussian-smoothed
  (sigma 6 mm) ventricle mask (alpha > 0 expands the ventricles), ``e_tissue`` minus the gradient of the smoothed
  (sigma 3 mm) tissue + ventricle mask (beta > 0 thins the cortex and widens sulcal CSF); both normalised to a
  peak of 1 mm. ``(alpha, beta)`` is solved so that the atlas has volume V and tissue B(a), from tables of the
  volumes as a function of (alpha, beta) computed with the Jacobian of the inverse map;
* ``v_ind``: zero-mean white noise smoothed with a 10 mm Gaussian, scaled to 2.5 mm RMS velocity in the brain;
* intensities: smooth multiplicative bias (sigma 30 mm, +-10 %), gamma contrast in [0.85, 1.15], Gaussian
  noise (sd 0.02);
* recorded conditions = what is *measured* on the subject: its age and the ventricle volume of its warped
  label fractions.

The law lives on the factor-4 (4 mm) working grid; fields are resampled to other grids in millimetres.
``true_atlas(condition)`` = template o exp(v_cond(condition)).
"""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from diffdef import fields
from diffdef.geometry import Grid
from diffdef.template import GM, NUM_LABELS, VENTRICLES, WM, Template, load_template

AGE_RANGE = (45.0, 82.0)
VENTRICLE_RANGE = (5.0, 120.0)
VENTRICLE_LOG_SD = 0.35
TISSUE_LOSS_PER_YEAR = 0.0025
CONDITIONS = (("age", "years"), ("ventricle_volume", "ml"))
LAW_FACTOR = 4
IND_SIGMA_MM, IND_RMS_MM = 10.0, 2.5
_ALPHAS = np.linspace(-6.0, 30.0, 37)
_TISSUE_ALPHAS = np.linspace(-6.0, 30.0, 7)
# nearest-neighbour label volumes respond little to sub-voxel moves: sample small betas finely
_BETAS = np.array([-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0])
_VENT_BOX_MARGIN_MM = 25
CACHE_VERSION = 1


def median_ventricle_volume(age) -> np.ndarray:
    """m(a) in ml."""
    return 15.0 * np.exp(0.0265 * (np.asarray(age, dtype=np.float64) - 45.0))


def _smooth(x: torch.Tensor, sigma_vox: float) -> torch.Tensor:
    from monai.networks.layers import GaussianFilter

    return GaussianFilter(3, sigma_vox)(x)


def _gradient(x: torch.Tensor) -> torch.Tensor:
    """(1, 1, ...) scalar -> (1, 3, ...) central-difference gradient in voxel units."""
    return torch.stack(torch.gradient(x[0, 0]), dim=0)[None]


@dataclass(frozen=True)
class Subject:
    image: torch.Tensor  # (1, i, j, k) T1 on the requested grid
    labels: torch.Tensor  # (1, i, j, k) int64 hard labels
    fractions: torch.Tensor  # (L, i, j, k) warped label fractions
    conditions: dict  # measured: age (years), ventricle_volume (ml)
    law: dict  # what the law drew: age, ventricle_volume, tissue_volume targets


class SyntheticLaw:
    """The generative law of the synthetic cohort (see module docstring)."""

    def __init__(self, template: Template | None = None):
        self.template = template or load_template()
        self.law_grid = self.template.working_grid(LAW_FACTOR).grid
        t1, frac = self.template.on_working_grid(LAW_FACTOR)
        self._frac = frac
        vent = frac[:, VENTRICLES : VENTRICLES + 1]
        mass = frac[:, GM : GM + 1] + frac[:, WM : WM + 1] + vent
        spacing = float(self.law_grid.spacing[0])
        e_vent = _gradient(_smooth(vent, 6.0 / spacing))
        e_tissue = -_gradient(_smooth(mass, 3.0 / spacing))
        # peak of 1 mm, expressed in law-grid voxels
        self.e_vent = e_vent / e_vent.norm(dim=1).max() / spacing
        self.e_tissue = e_tissue / e_tissue.norm(dim=1).max() / spacing
        t = self.template
        # every other 1 mm voxel along each axis: an unbiased 1/8 sample of the 1 mm label count
        self._sample_grid = Grid(tuple(n // 2 for n in t.grid.shape), t.grid.affine @ np.diag([2.0, 2.0, 2.0, 1.0]))
        vent_ijk = np.argwhere(t.labels == VENTRICLES)
        lo = vent_ijk.min(0) - _VENT_BOX_MARGIN_MM
        self._vent_box = t.grid.crop(lo, vent_ijk.max(0) + _VENT_BOX_MARGIN_MM - lo + 1)
        vols = self.template.label_volumes_ml()
        self.template_ventricles = vols["lateral ventricles"]
        self.template_tissue = vols["gray matter"] + vols["white matter"]
        self._tables()

    # -- calibration -------------------------------------------------------------------------------------------
    def _ventricle_volume(self, alpha: float) -> float:
        """Ventricle volume (ml) of the 1 mm nearest-neighbour warped labels of template o exp(alpha e_vent),
        measured in a box around the ventricles (beta moves the ventricle walls by < 2 %: ignored)."""
        disp = self.displacement(alpha * self.e_vent, self._vent_box)
        warped = fields.warp_onto(self.template.labels_tensor().float(), self.template.grid, disp, self._vent_box, "nearest")
        return float((warped == VENTRICLES).sum()) * self.template.grid.voxel_volume_ml

    def _tissue_volume(self, alpha: float, beta: float) -> float:
        """Tissue volume (ml) of the 1 mm nearest-neighbour warped labels of template o exp(v), counted on
        every eighth voxel (every other one along each axis) and scaled by 8."""
        v = alpha * self.e_vent + beta * self.e_tissue
        disp = self.displacement(v, self._sample_grid)
        warped = fields.warp_onto(self.template.labels_tensor().float(), self.template.grid, disp, self._sample_grid, "nearest")
        return float(((warped == GM) | (warped == WM)).sum()) * 8 * self.template.grid.voxel_volume_ml

    def _tables(self):
        """Calibration tables: ventricle volume V(alpha) and tissue volume B(alpha, beta), in ml; computed once
        (about 15 s) and cached under ~/.cache/diffdef keyed by the template and the law's constants."""
        import hashlib

        key = hashlib.sha256(repr((_ALPHAS, _TISSUE_ALPHAS, _BETAS, _VENT_BOX_MARGIN_MM, LAW_FACTOR,
                                   self.template_ventricles, self.template_tissue, CACHE_VERSION)).encode()).hexdigest()[:16]
        cache = Path(os.environ.get("DIFFDEF_CACHE", Path.home() / ".cache" / "diffdef")) / f"law_tables_{key}.npz"
        if cache.exists():
            data = np.load(cache)
            self._vent_table, self._tissue_table = data["vent"], data["tissue"]
            return
        self._vent_table = np.array([self._ventricle_volume(a) for a in _ALPHAS])
        self._tissue_table = np.array([[self._tissue_volume(a, b) for b in _BETAS] for a in _TISSUE_ALPHAS])
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, vent=self._vent_table, tissue=self._tissue_table)
        os.replace(tmp, cache)

    def tissue_volume(self, age) -> np.ndarray:
        """B(a) in ml."""
        return self.template_tissue * (1.0 - TISSUE_LOSS_PER_YEAR * (np.asarray(age, dtype=np.float64) - 45.0))

    def coefficients(self, age: float, ventricle_volume: float) -> tuple[float, float]:
        """(alpha, beta) in mm that realise ventricle volume V (ml) and tissue B(age)."""
        target_b = float(self.tissue_volume(age))
        alpha = float(np.interp(ventricle_volume, self._vent_table, _ALPHAS))
        ia = np.interp(alpha, _TISSUE_ALPHAS, np.arange(len(_TISSUE_ALPHAS)))
        lo = int(min(ia, len(_TISSUE_ALPHAS) - 2))
        b_row = (1 - (ia - lo)) * self._tissue_table[lo] + (ia - lo) * self._tissue_table[lo + 1]
        beta = float(np.interp(-target_b, -b_row, _BETAS))  # tissue decreases with beta
        return alpha, beta

    def condition_velocity(self, age: float, ventricle_volume: float) -> torch.Tensor:
        """v_cond on the law grid, (1, 3, ...) in law-grid voxels."""
        alpha, beta = self.coefficients(age, ventricle_volume)
        return alpha * self.e_vent + beta * self.e_tissue

    # -- sampling ---------------------------------------------------------------------------------------------
    def draw_conditions(self, rng: np.random.Generator) -> tuple[float, float]:
        age = float(rng.uniform(*AGE_RANGE))
        v = float(np.clip(median_ventricle_volume(age) * math.exp(VENTRICLE_LOG_SD * rng.standard_normal()), *VENTRICLE_RANGE))
        return age, v

    def individual_velocity(self, gen: torch.Generator) -> torch.Tensor:
        spacing = float(self.law_grid.spacing[0])
        noise = torch.randn((1, 3) + self.law_grid.shape, generator=gen)
        v = _smooth(noise, IND_SIGMA_MM / spacing)
        brain = self._frac[:, 1:].sum(1, keepdim=True) > 0.5
        rms = v.pow(2).sum(1, keepdim=True)[brain.expand(1, 1, *brain.shape[2:])].mean().sqrt()
        return v * (IND_RMS_MM / spacing / rms)

    def displacement(self, velocity: torch.Tensor, grid: Grid) -> torch.Tensor:
        """exp(velocity) on the law grid, resampled to ``grid`` (voxel units of ``grid``)."""
        disp = fields.integrate_velocity(velocity)
        return disp if grid.same_as(self.law_grid) else fields.resample_displacement(disp, self.law_grid, grid)

    def _template_on(self, factor: int | None):
        """(T1, fractions, grid) of the template on the working grid of ``factor``, or at 1 mm if None."""
        if factor is None:
            t = self.template
            return t.t1_tensor(), fields.one_hot(t.labels_tensor(), NUM_LABELS), t.grid
        t1, frac = self.template.on_working_grid(factor)
        return t1, frac, self.template.working_grid(factor).grid

    def _draw_subject(self, seed: int, index: int) -> tuple[np.random.Generator, torch.Generator, float, float]:
        """The random streams of subject ``index`` of cohort ``seed`` and its first draws: (rng, generator) left
        for the velocity and the image noise, age, the law's ventricle volume."""
        rng = np.random.default_rng([seed, index])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        return (rng, gen, *self.draw_conditions(rng))

    def _subject_velocity(self, gen: torch.Generator, age: float, v_law: float) -> torch.Tensor:
        return self.condition_velocity(age, v_law) + self.individual_velocity(gen)

    def subject_displacement(self, seed: int, index: int, grid: Grid) -> torch.Tensor:
        """The true displacement (template -> subject, pull-back, voxels of ``grid``) of subject ``index``."""
        _, gen, age, v_law = self._draw_subject(seed, index)
        return self.displacement(self._subject_velocity(gen, age, v_law), grid)

    def subject(self, seed: int, index: int, factor: int | None = LAW_FACTOR) -> Subject:
        """Subject ``index`` of cohort ``seed``, deterministic; on the working grid of ``factor`` (None: 1 mm)."""
        rng, gen, age, v_law = self._draw_subject(seed, index)
        velocity = self._subject_velocity(gen, age, v_law)
        t1, frac, grid = self._template_on(factor)
        disp = self.displacement(velocity, grid)
        image = fields.warp_image(t1, disp)
        warped = fields.warp_probabilities(frac, disp)
        spacing = float(grid.spacing[0])
        bias_noise = torch.randn((1, 1) + self.law_grid.shape, generator=gen)
        bias = _smooth(bias_noise, 30.0 / float(self.law_grid.spacing[0]))
        bias = 0.1 * bias / bias.abs().max()
        bias = fields.resample(bias, self.law_grid, grid, padding="border") if factor != LAW_FACTOR else bias
        gamma = float(rng.uniform(0.85, 1.15))
        image = image.clamp(0, 1).pow(gamma) * torch.exp(bias)
        image = image + 0.02 * torch.randn(image.shape, generator=gen)
        image = image * (warped[:, 0:1] < 0.99)  # background stays 0, as in a skull-stripped scan
        vox_ml = grid.voxel_volume_ml
        measured_v = float(warped[0, VENTRICLES].sum()) * vox_ml
        labels = warped.argmax(1, keepdim=True)
        return Subject(
            image=image[0].float(), labels=labels[0], fractions=warped[0],
            conditions={"age": age, "ventricle_volume": measured_v},
            law={"age": age, "ventricle_volume": v_law, "tissue_volume": float(self.tissue_volume(age)),
                 "measured_tissue_volume": float((warped[0, GM] + warped[0, WM]).sum()) * vox_ml, "spacing": spacing},
        )

    def true_atlas(self, age: float, ventricle_volume: float, factor: int | None = None) -> dict:
        """The true conditional atlas: image (1,1,...), labels (1,1,...), displacement (1,3,...) in voxels of
        the grid, and the grid; at 1 mm (template grid) by default."""
        t1, frac, grid = self._template_on(factor)
        disp = self.displacement(self.condition_velocity(age, ventricle_volume), grid)
        if factor is None:
            labels = fields.warp_labels(self.template.labels_tensor(), disp)
        else:
            labels = fields.warp_probabilities(frac, disp).argmax(1, keepdim=True)
        return {"image": fields.warp_image(t1, disp), "labels": labels, "displacement": disp, "grid": grid}


@functools.lru_cache(maxsize=1)
def default_law() -> SyntheticLaw:
    return SyntheticLaw()


class SyntheticCohort(torch.utils.data.Dataset):
    """``size`` subjects of cohort ``seed`` on the working grid of ``factor``, generated on first access and
    kept in memory. Items: dict(image (1, i, j, k), labels (1, i, j, k), conditions (2,) [age, V], index)."""

    def __init__(self, size: int, seed: int = 0, factor: int = LAW_FACTOR, offset: int = 0, law: SyntheticLaw | None = None):
        self.size, self.seed, self.factor, self.offset = size, seed, factor, offset
        self.law = law or default_law()
        self._cache: dict[int, dict] = {}

    def __len__(self):
        return self.size

    def __getitem__(self, i: int) -> dict:
        if i not in self._cache:
            s = self.law.subject(self.seed, self.offset + i, self.factor)
            cond = torch.tensor([s.conditions["age"], s.conditions["ventricle_volume"]], dtype=torch.float32)
            self._cache[i] = {"image": s.image, "labels": s.labels, "conditions": cond, "index": self.offset + i,
                              # each label's volume as the conditions measure it: the warped fractions' sum (ml)
                              "label_volumes_ml": s.fractions.sum(dim=(1, 2, 3)) * s.law["spacing"] ** 3 / 1000}
        return self._cache[i]

    def conditions(self) -> torch.Tensor:
        return torch.stack([self[i]["conditions"] for i in range(len(self))])


# ====================================================================================================================
# Export to disk, random affine, statistics, figure, command line (additions; the law above is unchanged)
# ====================================================================================================================

#: Ranges of the optional export-time random affine: rotation per axis (deg), scale per axis, shift per axis (mm).
AFFINE_ROTATION_DEG, AFFINE_SCALE, AFFINE_SHIFT_MM = 10.0, 0.08, 10.0
AGE_BINS = (45.0, 55.0, 65.0, 75.0, 82.0)


def _grid_of(law: SyntheticLaw, factor: int | None) -> Grid:
    return law.template.grid if factor is None else law.template.working_grid(factor).grid


def draw_random_affine(rng: np.random.Generator, center_ras=(0.0, -18.0, 18.0)):
    """A random ``sitk.AffineTransform`` (exported point -> law-space point, LPS, ITK's resampling convention):
    rotation up to ``AFFINE_ROTATION_DEG`` about each axis, scale ``1 +- AFFINE_SCALE`` per axis, shift up to
    ``AFFINE_SHIFT_MM`` per axis, about ``center_ras`` (the brain centre). Returns (transform, parameters dict)."""
    import SimpleITK as sitk

    from diffdef.geometry import ras_to_lps

    deg = rng.uniform(-AFFINE_ROTATION_DEG, AFFINE_ROTATION_DEG, 3)
    scale = rng.uniform(1 - AFFINE_SCALE, 1 + AFFINE_SCALE, 3)
    shift = rng.uniform(-AFFINE_SHIFT_MM, AFFINE_SHIFT_MM, 3)
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    rx = np.array([[1, 0, 0], [0, c[0], -s[0]], [0, s[0], c[0]]])
    ry = np.array([[c[1], 0, s[1]], [0, 1, 0], [-s[1], 0, c[1]]])
    rz = np.array([[c[2], -s[2], 0], [s[2], c[2], 0], [0, 0, 1]])
    t = sitk.AffineTransform(3)
    t.SetMatrix((rz @ ry @ rx @ np.diag(scale)).ravel().tolist())
    t.SetTranslation(shift.tolist())
    t.SetCenter(ras_to_lps(np.asarray(center_ras, dtype=np.float64)).tolist())
    return t, {"rotation_deg": deg, "scale": scale, "shift_mm": shift}


def affine_ras_matrix(transform) -> np.ndarray:
    """4x4 RAS matrix of an ``sitk.AffineTransform`` (exported RAS point -> law-space RAS point)."""
    flip = np.diag([-1.0, -1.0, 1.0])
    m = np.asarray(transform.GetMatrix()).reshape(3, 3)
    c = np.asarray(transform.GetCenter())
    tr = np.asarray(transform.GetTranslation())
    out = np.eye(4)
    out[:3, :3] = flip @ m @ flip
    out[:3, 3] = flip @ (m @ (-c) + c + tr)  # x_lps -> m (x - c) + c + t
    return out


def apply_affine(image: np.ndarray, labels: np.ndarray, grid: Grid, transform) -> tuple[np.ndarray, np.ndarray, Grid]:
    """Resample a subject (image linear, labels nearest) through ``transform`` (output point -> input point) onto
    an axis-aligned grid of the same spacing that holds the whole transformed field of view."""
    import SimpleITK as sitk

    from diffdef.geometry import from_sitk, to_sitk

    inverse = transform.GetInverse()
    corners = np.array([[i, j, k] for i in (0, grid.shape[0] - 1) for j in (0, grid.shape[1] - 1)
                        for k in (0, grid.shape[2] - 1)], dtype=np.float64)
    flip = np.array([-1.0, -1.0, 1.0])
    lps = grid.voxel_to_world(corners) * flip
    out_lps = np.array([inverse.TransformPoint(p.tolist()) for p in lps])
    # voxel coordinates of the mapped corners in the input grid's orientation, then a box around them
    ijk = grid.world_to_voxel(out_lps * flip)
    lo, hi = np.floor(ijk.min(0)) - 1, np.ceil(ijk.max(0)) + 1
    out_grid = grid.crop(lo.astype(int), (hi - lo + 1).astype(int))
    ref = to_sitk(np.zeros(out_grid.shape, np.float32), out_grid)
    img = sitk.Resample(to_sitk(image.astype(np.float32), grid), ref, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    lab = sitk.Resample(to_sitk(labels.astype(np.uint8), grid), ref, transform, sitk.sitkNearestNeighbor, 0,
                        sitk.sitkUInt8)
    return from_sitk(img)[0], from_sitk(lab)[0], out_grid


def _factor_name(factor: int | None) -> str:
    return "1 mm" if factor is None else f"{factor} mm grid"


def drawn_conditions(seed: int, index: int, law: SyntheticLaw | None = None) -> tuple[float, float]:
    """(age, V) the law draws for subject ``index`` of cohort ``seed``, without building the subject (the same
    random stream as :meth:`SyntheticLaw.subject`)."""
    return (law or default_law())._draw_subject(seed, index)[2:]


TRUTH_COLUMNS = ("subject", "seed", "index", "age", "ventricle_volume_law", "tissue_volume_law",
                 "ventricle_volume_measured", "tissue_volume_measured", "spacing_mm", "alpha_mm", "beta_mm",
                 "rotation_deg", "scale", "shift_mm", "affine_ras")


def export_cohort(out_dir, size: int, seed: int = 0, factor: int | None = LAW_FACTOR, random_affine: bool = False,
                  overwrite: bool = False, offset: int = 0, progress: bool = True,
                  law: SyntheticLaw | None = None) -> Path:
    """Write subjects ``offset .. offset+size-1`` of cohort ``seed`` to ``out_dir``: ``sub-NNNNN_t1.nii.gz``,
    ``sub-NNNNN_labels.nii.gz`` (template label values), ``manifest.csv`` (subject, image, labels, age,
    ventricle_volume — the *measured* conditions; what :func:`diffdef_training.cohort.read_manifest` reads with
    ``conditions=["age", "ventricle_volume"]``) and ``truth.csv`` (what the law drew, the (alpha, beta) of v_cond,
    the measured volumes and, with ``random_affine``, the affine applied).

    ``factor``: working-grid factor (4 = the 4 mm working grid, 2 = 2 mm), or None for the 1 mm template grid.
    ``random_affine``: resample each subject through :func:`draw_random_affine` (drawn from (seed, index), so
    the export is deterministic); ``affine_ras`` in truth.csv is the 3x4 RAS matrix (row-major, space
    separated) mapping an exported-image point to the law-space (template-space) point. Preprocessing must undo it.
    Every file is written atomically; existing files are refused unless ``overwrite``. Returns the manifest path.
    """
    import csv
    import io as _io

    from tqdm import tqdm

    from diffdef.io import atomic_path, write_image

    law = law or default_law()
    out = Path(out_dir)
    manifest, truth = out / "manifest.csv", out / "truth.csv"
    if not overwrite:
        for p in (manifest, truth):
            if p.exists():
                raise FileExistsError(f"{p} exists; choose another folder or pass overwrite (--overwrite).")
    grid = _grid_of(law, factor)
    m_rows, t_rows = [], []
    for index in tqdm(range(offset, offset + size), desc=f"synthesising {size} subjects ({_factor_name(factor)})",
                      disable=not progress, unit="subject"):
        s = law.subject(seed, index, factor)
        name = f"sub-{index:05d}"
        image, labels, out_grid = s.image[0].numpy(), s.labels[0].numpy().astype(np.uint8), grid
        params, affine = {}, ""
        if random_affine:
            transform, params = draw_random_affine(np.random.default_rng([seed, index, 7]))
            image, labels, out_grid = apply_affine(image, labels, grid, transform)
            affine = " ".join(f"{x:.6g}" for x in affine_ras_matrix(transform)[:3].ravel())
        write_image(out / f"{name}_t1.nii.gz", image.astype(np.float32), out_grid, overwrite=overwrite)
        write_image(out / f"{name}_labels.nii.gz", labels, out_grid, overwrite=overwrite)
        alpha, beta = law.coefficients(s.law["age"], s.law["ventricle_volume"])
        m_rows.append([name, f"{name}_t1.nii.gz", f"{name}_labels.nii.gz", f"{s.conditions['age']:.4f}",
                       f"{s.conditions['ventricle_volume']:.4f}"])
        fmt = lambda key: " ".join(f"{x:.4f}" for x in params[key]) if params else ""  # noqa: E731
        t_rows.append([name, seed, index, f"{s.law['age']:.4f}", f"{s.law['ventricle_volume']:.4f}",
                       f"{s.law['tissue_volume']:.3f}", f"{s.conditions['ventricle_volume']:.4f}",
                       f"{s.law['measured_tissue_volume']:.3f}", f"{s.law['spacing']:g}", f"{alpha:.4f}",
                       f"{beta:.4f}", fmt("rotation_deg"), fmt("scale"), fmt("shift_mm"), affine])

    def write_csv(path, header, rows):
        buf = _io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
        with atomic_path(path, overwrite) as tmp:
            tmp.write_text(buf.getvalue())

    write_csv(truth, TRUTH_COLUMNS, t_rows)
    write_csv(manifest, ("subject", "image", "labels") + tuple(n for n, _ in CONDITIONS), m_rows)
    return manifest


def lognormal_mean(age) -> np.ndarray:
    """E[V | a] of the law (log-normal around m(a) with log-sd 0.35, clipped to [5, 120]), by quadrature."""
    z = np.linspace(-6, 6, 2001)
    w = np.exp(-0.5 * z**2)
    w /= w.sum()
    m = median_ventricle_volume(np.atleast_1d(age))[:, None]
    return (np.clip(m * np.exp(VENTRICLE_LOG_SD * z[None]), *VENTRICLE_RANGE) * w).sum(1)


def measure_subjects(size: int, seed: int = 0, factor: int | None = LAW_FACTOR, offset: int = 0,
                     progress: bool = False, law: SyntheticLaw | None = None) -> np.ndarray:
    """Per subject: [age, V drawn, V measured, B(a), tissue measured (label fractions), tissue (hard labels),
    GM (fractions), GM (hard labels), WM (fractions), WM (hard labels)], volumes in ml."""
    from tqdm import tqdm

    law = law or default_law()
    rows = []
    for i in tqdm(range(offset, offset + size), desc=f"measuring ({_factor_name(factor)})", disable=not progress):
        s = law.subject(seed, i, factor)
        vox = _grid_of(law, factor).voxel_volume_ml
        gm_soft, gm_hard, wm_soft, wm_hard = (float(v) * vox for lab in (GM, WM)
                                              for v in (s.fractions[lab].sum(), (s.labels == lab).sum()))
        rows.append([s.law["age"], s.law["ventricle_volume"], s.conditions["ventricle_volume"], s.law["tissue_volume"],
                     s.law["measured_tissue_volume"], gm_hard + wm_hard, gm_soft, gm_hard, wm_soft, wm_hard])
    return np.array(rows)


def label_map_bias(m: np.ndarray, factor: int | None = LAW_FACTOR, law: SyntheticLaw | None = None) -> dict:
    """Mean bias (%) of GM and WM volumes relative to the template's when both are counted on hard label maps
    (the argmax of the fractions: what a cohort's majority-vote label maps give) instead of label fractions,
    over :func:`measure_subjects` rows ``m`` of that grid. It is what a neighbourhood-volume target computed from
    working-grid label maps is off by."""
    law = law or default_law()
    _, frac, _ = law._template_on(factor)
    hard = frac.argmax(1)[0]
    out = {}
    for name, lab, col in (("GM", GM, 6), ("WM", WM, 8)):
        template_soft, template_hard = float(frac[0, lab].sum()), float((hard == lab).sum())
        ratio = (m[:, col + 1] / template_hard) / (m[:, col] / template_soft)  # voxel size cancels
        out[name] = float(100 * (ratio.mean() - 1))
    return out


def age_bin_table(m: np.ndarray, bins=AGE_BINS) -> list[dict]:
    """Per age bin of :func:`measure_subjects` output: counts, mean measured V / mean m(a), / mean E[V|a],
    mean measured tissue / mean B(a) (fractions and hard labels)."""
    out = []
    for lo, hi in zip(bins[:-1], bins[1:]):
        sel = (m[:, 0] >= lo) & ((m[:, 0] < hi) if hi < bins[-1] else (m[:, 0] <= hi))
        r = m[sel]
        if not len(r):
            continue
        out.append({"bin": (lo, hi), "n": int(sel.sum()), "age": r[:, 0].mean(), "v_measured": r[:, 2].mean(),
                    "v_drawn": r[:, 1].mean(), "m": median_ventricle_volume(r[:, 0]).mean(),
                    "v_expected": lognormal_mean(r[:, 0]).mean(), "b": r[:, 3].mean(),
                    "tissue": r[:, 4].mean(), "tissue_hard": r[:, 5].mean()})
    return out


def atlas_ventricle_volume(law: SyntheticLaw, age: float, ventricle_volume: float, factor: int | None = None) -> float:
    """Ventricle volume (ml) of ``true_atlas(age, V)``'s labels (1 mm by default)."""
    atlas = law.true_atlas(age, ventricle_volume, factor)
    return float((atlas["labels"] == VENTRICLES).sum()) * atlas["grid"].voxel_volume_ml


def print_stats(size: int = 500, seed: int = 0, fine: int = 10, volumes=(8, 12, 20, 30, 40, 60, 80),
                ages=(45.0, 82.0), progress: bool = True, law: SyntheticLaw | None = None) -> dict:
    """The law's checks over ``size`` subjects (working grid), ``fine`` of them also at 1 mm, and true_atlas."""
    import time

    law = law or default_law()
    t0 = time.perf_counter()
    m = measure_subjects(size, seed, LAW_FACTOR, progress=progress, law=law)
    rows = age_bin_table(m)
    print(f"\n{size} synthetic subjects, seed {seed}, {LAW_FACTOR} mm working grid "
          f"(volumes from the warped label fractions), {time.perf_counter() - t0:.0f} s")
    print(f"{'age bin':>9} {'n':>4} {'mean V':>7} {'m(a)':>6} {'V/m(a)':>7} {'E[V|a]':>7} {'V/E[V]':>7} "
          f"{'V/drawn':>8} {'tissue':>7} {'B(a)':>7} {'T/B':>6} {'hard T/B':>8}")
    for r in rows:
        lo, hi = r["bin"]
        print(f"{lo:4.0f}-{hi:<4.0f} {r['n']:4d} {r['v_measured']:7.2f} {r['m']:6.2f} {r['v_measured'] / r['m']:7.3f} "
              f"{r['v_expected']:7.2f} {r['v_measured'] / r['v_expected']:7.3f} {r['v_measured'] / r['v_drawn']:8.3f} "
              f"{r['tissue']:7.1f} {r['b']:7.1f} {r['tissue'] / r['b']:6.4f} {r['tissue_hard'] / r['b']:8.4f}")
    print(f"per subject: measured/drawn V {np.mean(m[:, 2] / m[:, 1]):.3f} (sd {np.std(m[:, 2] / m[:, 1]):.3f}); "
          f"tissue/B(a) {np.mean(m[:, 4] / m[:, 3]):.4f} (sd {np.std(m[:, 4] / m[:, 3]):.4f})")
    bias = label_map_bias(m, LAW_FACTOR, law)
    print(f"label-map bias: GM {bias['GM']:+.2f} %, WM {bias['WM']:+.2f} % (volume relative to the template's, "
          f"hard labels vs fractions)")
    result = {"working": m, "bins": rows, "label_map_bias": bias}
    if fine:
        t0 = time.perf_counter()
        mf = measure_subjects(fine, seed, None, progress=progress, law=law)
        print(f"\nthe first {fine} subjects at 1 mm too ({time.perf_counter() - t0:.0f} s): tissue / B(a) per subject")
        print(f"  4 mm fractions {np.mean(m[:fine, 4] / m[:fine, 3]):.4f}, 1 mm fractions "
              f"{np.mean(mf[:, 4] / mf[:, 3]):.4f}, 1 mm hard labels {np.mean(mf[:, 5] / mf[:, 3]):.4f}; "
              f"4 mm / 1 mm fractions {np.mean(m[:fine, 4] / mf[:, 4]):.4f} "
              f"(range {np.min(m[:fine, 4] / mf[:, 4]):.4f}..{np.max(m[:fine, 4] / mf[:, 4]):.4f})")
        print(f"  ventricles: 4 mm / 1 mm measured V {np.mean(m[:fine, 2] / mf[:, 2]):.4f}")
        result["fine"] = mf
    if volumes:
        t0 = time.perf_counter()
        print("\ntrue_atlas at 1 mm: ventricle volume of its labels vs requested V")
        print(f"{'V':>5} " + " ".join(f"{'age ' + format(a, 'g'):>14}" for a in ages))
        table = []
        for v in volumes:
            got = [atlas_ventricle_volume(law, a, float(v)) for a in ages]
            table.append(got)
            print(f"{v:5g} " + " ".join(f"{g:7.2f} ({g / v:5.3f})" for g in got))
        print(f"({time.perf_counter() - t0:.0f} s)")
        result["atlas"] = np.array(table)
    return result


def figure(path, seed: int = 0, count: int = 5, factor: int | None = 2, law: SyntheticLaw | None = None) -> Path:
    """PNG of ``count`` subjects of cohort ``seed`` spread over the age range (the youngest to the oldest of the
    first 20 * count), an axial and a coronal slice each, lateral ventricles outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffdef.io import atomic_path

    law = law or default_law()
    rng_ages = [(i, drawn_conditions(seed, i, law)[0]) for i in range(20 * count)]
    rng_ages.sort(key=lambda t: t[1])
    picks = [rng_ages[int(round(k * (len(rng_ages) - 1) / max(count - 1, 1)))][0] for k in range(count)]
    fig, axes = plt.subplots(2, count, figsize=(2.6 * count, 5.6), facecolor="black")
    axes = np.asarray(axes).reshape(2, count)
    for c, idx in enumerate(picks):
        s = law.subject(seed, idx, factor)
        img, lab = s.image[0].numpy(), s.labels[0].numpy()
        centre = np.argwhere(lab == VENTRICLES).mean(0).round().astype(int) if (lab == VENTRICLES).any() \
            else np.array(img.shape) // 2
        ax_k, cor_j = int(centre[2]), int(centre[1])
        for r, (sl_img, sl_lab) in enumerate([(img[:, :, ax_k], lab[:, :, ax_k]), (img[:, cor_j, :], lab[:, cor_j, :])]):
            ax = axes[r, c]
            ax.imshow(sl_img.T, cmap="gray", origin="lower", vmin=0, vmax=1, interpolation="nearest")
            ax.contour((sl_lab == VENTRICLES).T.astype(float), levels=[0.5], colors=["#ff4040"], linewidths=1.0,
                       origin="lower")
            ax.set_xticks([]), ax.set_yticks([])
            for sp in ax.spines.values():
                sp.set_visible(False)
            if r == 0:
                ax.set_title(f"#{idx}: {s.conditions['age']:.0f} y, V {s.conditions['ventricle_volume']:.0f} ml",
                             color="white", fontsize=9)
        axes[0, 0].set_ylabel("axial", color="white")
        axes[1, 0].set_ylabel("coronal", color="white")
    fig.suptitle(f"Synthetic cohort (seed {seed}, {_factor_name(factor)}): lateral ventricles outlined in red",
                 color="white", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, overwrite=True) as tmp:
        fig.savefig(tmp, dpi=110, facecolor="black", format="png")
    plt.close(fig)
    return path


def _parse_factor(text: str) -> int | None:
    return None if text.lower() in ("1mm", "1", "none", "fine") else int(text)


def main(argv=None) -> int:
    """``python -m diffdef_training.synthetic {export,stats,figure}`` (also ``diffdef-train synthesize``,
    ``cohort-stats``, ``cohort-figure``)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m diffdef_training.synthetic", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("export", help="write a synthetic cohort: NIfTI images, label maps, manifest.csv, truth.csv")
    s.add_argument("output", help="folder")
    s.add_argument("--subjects", type=int, default=100)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--offset", type=int, default=0, help="index of the first subject")
    s.add_argument("--factor", default=str(LAW_FACTOR), help="working-grid factor (4 = 4 mm, 2 = 2 mm) or 1mm")
    s.add_argument("--random-affine", action="store_true", help="apply a random affine that preprocessing must undo")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--no-progress", action="store_true")
    s = sub.add_parser("stats", help="check the law: V per age decade vs m(a), tissue vs B(a), true_atlas vs V")
    s.add_argument("--subjects", type=int, default=500)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--fine", type=int, default=10, help="how many of them to measure at 1 mm too")
    s.add_argument("--no-atlas", action="store_true", help="skip the true_atlas check")
    s.add_argument("--no-progress", action="store_true")
    s = sub.add_parser("figure", help="PNG of a few subjects across the age range, ventricles outlined")
    s.add_argument("output", help="PNG path")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--count", type=int, default=5)
    s.add_argument("--factor", default="2", help="grid: 4, 2 or 1mm")
    a = p.parse_args(argv)
    if a.command == "export":
        path = export_cohort(a.output, a.subjects, a.seed, _parse_factor(a.factor), a.random_affine, a.overwrite,
                             a.offset, progress=not a.no_progress)
        print(f"manifest written to {path} (truth in {path.parent / 'truth.csv'})")
    elif a.command == "stats":
        print_stats(a.subjects, a.seed, a.fine, volumes=() if a.no_atlas else (8, 12, 20, 30, 40, 60, 80),
                    progress=not a.no_progress)
    else:
        print(figure(a.output, a.seed, a.count, _parse_factor(a.factor)))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
