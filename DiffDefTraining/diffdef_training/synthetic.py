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

    def subject(self, seed: int, index: int, factor: int | None = LAW_FACTOR) -> Subject:
        """Subject ``index`` of cohort ``seed``, deterministic; on the working grid of ``factor`` (None: 1 mm)."""
        rng = np.random.default_rng([seed, index])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        age, v_law = self.draw_conditions(rng)
        velocity = self.condition_velocity(age, v_law) + self.individual_velocity(gen)
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
            self._cache[i] = {"image": s.image, "labels": s.labels, "conditions": cond, "index": self.offset + i}
        return self._cache[i]

    def conditions(self) -> torch.Tensor:
        return torch.stack([self[i]["conditions"] for i in range(len(self))])
