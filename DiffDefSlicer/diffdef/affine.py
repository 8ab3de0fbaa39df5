"""Affine alignment of a subject T1 to template space (SimpleITK) and intensity normalisation onto the template's
0..1 scale. One implementation, shared by subject comparison (:mod:`diffdef.compare`) and the training package's
real-cohort preprocessing (``diffdef_training.cohort``).

Registration (:func:`register_affine`): the subject T1 (moving; any grid, any orientation) is registered to a fixed
image (the template or a generated atlas T1 on the 1 mm template grid): centred initialisation by image moments,
Mattes mutual information sampled within the dilated fixed brain (the fixed image is skull-stripped), regular-step
gradient descent with physical-shift scales, three levels (shrink 4/2/1, smoothing 2/1/0 mm), on copies of both
images smoothed and resampled to ``registration_spacing_mm`` (3 mm by default: a 12-parameter affine needs no finer
detail, and it keeps a subject to a few seconds on a shared CPU). Deterministic for a given ``seed``.

The result is a ``sitk.AffineTransform`` in ITK's resampling convention: it maps a *fixed* (template-space) LPS point
to the *moving* (subject) LPS point. :func:`transform_to_ras` / :func:`ras_to_transform` convert it to / from the
4x4 RAS matrix of the same map (template-space RAS mm -> subject RAS mm). :func:`resample_into` brings a subject
image (linear) or label map (nearest) into the fixed grid as an ``(i, j, k)`` array; every crossing of
(i, j, k) <-> (k, j, i) and RAS <-> LPS goes through :func:`diffdef.geometry.to_sitk` / ``from_sitk``.

Intensities (:func:`normalise_intensity`, :func:`normalise_to_template`): the percentiles ``(0.5, 99.5)`` of the
aligned subject within the template brain mask are mapped onto the *template's* percentiles within the same mask
(about 0.25 and 0.92 for the MNI T1), piecewise linearly with 0 kept at 0, clipped to [0, 1], so the subject lives on
the template's intensity scale (background 0, CSF dark but not black), which is what the autoencoder and the
registration network compare it with.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np

from .geometry import Grid, from_sitk, to_sitk
from .template import CROP_SIZE, CROP_START, Template

__all__ = ["AffineOptions", "register_affine", "register_subject", "resample_into", "resample_to_spacing",
           "transform_to_ras", "ras_to_transform", "normalise_intensity", "normalise_to_template", "brain_mask",
           "template_percentiles"]

_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


def _sitk():
    import SimpleITK as sitk

    return sitk


@dataclass(frozen=True)
class AffineOptions:
    """Settings of :func:`register_affine` (defaults: the cohort preprocessing's)."""

    registration_spacing_mm: float = 3.0  # both images are resampled to this spacing for the registration
    shrink_factors: tuple[int, ...] = (4, 2, 1)
    smoothing_sigmas_mm: tuple[float, ...] = (2.0, 1.0, 0.0)
    iterations: int = 100  # per level
    histogram_bins: int = 32
    sampling_percentage: float = 0.5
    learning_rate: float = 2.0  # mm of physical shift per step at the start
    seed: int = 0  # sampling seed of the metric: same seed, same transform
    fixed_mask_threshold: float = 0.02  # the metric is sampled where the fixed image exceeds this (dilated 2 voxels)


def resample_to_spacing(image, spacing_mm: float):
    """Smooth (anti-alias) and resample a SimpleITK image to an isotropic spacing, same extent and orientation."""
    sitk = _sitk()
    old = np.asarray(image.GetSpacing())
    if np.all(np.abs(old - spacing_mm) < 1e-3):
        return image
    sigma = np.sqrt(np.maximum((spacing_mm / 2.0) ** 2 - (old / 2.0) ** 2, 0.0))
    if np.any(sigma > 0):
        image = sitk.SmoothingRecursiveGaussian(image, [float(s) if s > 0 else 1e-3 for s in sigma])
    size = [max(1, int(round(n * s / spacing_mm))) for n, s in zip(image.GetSize(), old)]
    # keep the physical corner of the first voxel's block: origin of the block corner + half the new voxel
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    corner = np.asarray(image.GetOrigin()) - direction @ (old / 2.0)
    origin = corner + direction @ (np.full(3, spacing_mm) / 2.0)
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, origin.tolist(), [spacing_mm] * 3,
                         image.GetDirection(), 0.0, sitk.sitkFloat32)


def register_affine(fixed, moving, options: AffineOptions | None = None):
    """Affine registration of ``moving`` to ``fixed`` (both SimpleITK images; ``fixed`` may already be at the
    registration spacing, then it is used as is). ``options``: :class:`AffineOptions` (or a subclass such as the
    cohort's ``PreprocessOptions``), defaults when None. Returns ``(sitk.AffineTransform fixed LPS point -> moving
    LPS point, info dict)``; raises ``RuntimeError`` when SimpleITK fails."""
    sitk = _sitk()
    o = options or AffineOptions()
    fixed_r = resample_to_spacing(sitk.Cast(fixed, sitk.sitkFloat32), o.registration_spacing_mm)
    moving_r = resample_to_spacing(sitk.Cast(moving, sitk.sitkFloat32), o.registration_spacing_mm)
    initial = sitk.CenteredTransformInitializer(fixed_r, moving_r, sitk.AffineTransform(3),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=o.histogram_bins)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(o.sampling_percentage, o.seed)
    # the fixed image is skull-stripped: sample the metric only where it has brain (avoid the empty background)
    reg.SetMetricFixedMask(sitk.BinaryDilate(sitk.Cast(fixed_r > o.fixed_mask_threshold, sitk.sitkUInt8), [2] * 3))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=o.learning_rate, minStep=1e-3,
                                                 numberOfIterations=o.iterations,
                                                 relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(o.shrink_factors))
    reg.SetSmoothingSigmasPerLevel(list(o.smoothing_sigmas_mm))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(initial, inPlace=False)
    start = time.perf_counter()
    out = reg.Execute(fixed_r, moving_r)
    transform = sitk.AffineTransform(out.GetNthTransform(0) if out.GetName() == "CompositeTransform" else out)
    info = {"metric": float(reg.GetMetricValue()), "iterations_last_level": int(reg.GetOptimizerIteration()),
            "stop": reg.GetOptimizerStopConditionDescription(), "registration_s": time.perf_counter() - start}
    return transform, info


def register_subject(subject: np.ndarray, subject_grid: Grid, fixed: np.ndarray, fixed_grid: Grid,
                     options: AffineOptions | None = None):
    """Register a subject T1 ``(i, j, k)`` on ``subject_grid`` (any spacing, any orientation) to ``fixed``
    ``(i, j, k)`` on ``fixed_grid``. Returns ``(sitk.AffineTransform, info)`` as :func:`register_affine`."""
    sitk = _sitk()
    stats = sitk.StatisticsImageFilter()
    moving = to_sitk(np.asarray(subject, dtype=np.float32), subject_grid)
    stats.Execute(moving)
    if not stats.GetMaximum() > stats.GetMinimum():
        raise ValueError(f"The subject image is constant (every voxel = {stats.GetMaximum():.4g}): nothing to register.")
    try:
        return register_affine(to_sitk(np.asarray(fixed, dtype=np.float32), fixed_grid), moving, options)
    except RuntimeError as exc:
        raise RuntimeError("Affine registration of the subject to the atlas failed: "
                           f"{str(exc).strip().splitlines()[-1]}") from exc


def resample_into(array: np.ndarray, grid: Grid, transform, target: Grid, labels: bool = False) -> np.ndarray:
    """Resample ``array`` ``(i, j, k)`` on ``grid`` through ``transform`` (target LPS point -> ``grid``'s LPS point,
    as :func:`register_affine` returns) onto ``target``: linear -> float32 (outside: 0), or nearest with
    ``labels`` -> the input's integer dtype (outside: 0). Returns ``(i, j, k)`` of ``target``'s shape."""
    sitk = _sitk()
    reference = to_sitk(np.zeros(target.shape, np.uint8), target)
    if labels:
        a = np.asarray(array)
        src = to_sitk(a.astype(np.int32 if a.dtype.kind == "i" else np.uint32), grid)
        out = sitk.Resample(src, reference, transform, sitk.sitkNearestNeighbor, 0, src.GetPixelID())
        return from_sitk(out)[0].astype(a.dtype)
    src = to_sitk(np.asarray(array, dtype=np.float32), grid)
    out = sitk.Resample(src, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return from_sitk(out)[0].astype(np.float32)


def transform_to_ras(transform) -> np.ndarray:
    """4x4 RAS matrix of a SimpleITK affine (or Euler/similarity/translation) transform: the same point map,
    (template-space RAS mm) -> (subject RAS mm) for a transform from :func:`register_affine`."""
    try:  # every SimpleITK linear transform (affine, Euler, similarity, versor) has these three
        a = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
        c = np.asarray(transform.GetCenter(), dtype=np.float64)
        t = np.asarray(transform.GetTranslation(), dtype=np.float64)
    except AttributeError as exc:
        raise ValueError(f"Expected a linear SimpleITK transform, got {transform.GetName()}.") from exc
    lps = np.eye(4)
    lps[:3, :3] = a
    lps[:3, 3] = c + t - a @ c
    return _FLIP @ lps @ _FLIP


def ras_to_transform(matrix: np.ndarray):
    """Inverse of :func:`transform_to_ras`: a 4x4 RAS point map -> ``sitk.AffineTransform`` (LPS)."""
    sitk = _sitk()
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise ValueError(f"Expected a finite 4x4 matrix, got shape {m.shape}.")
    lps = _FLIP @ m @ _FLIP
    t = sitk.AffineTransform(3)
    t.SetMatrix(lps[:3, :3].ravel().tolist())
    t.SetTranslation(lps[:3, 3].tolist())
    return t


# --------------------------------------------------------------------------------------------------------------------
# Intensity normalisation onto the template's scale
# --------------------------------------------------------------------------------------------------------------------


def brain_mask(template: Template) -> np.ndarray:
    """Template brain (labels > 0) on the 1 mm crop (``CROP_START``, ``CROP_SIZE``): where intensities are
    normalised. The whole template brain lies inside the crop."""
    sl = tuple(slice(s, s + n) for s, n in zip(CROP_START, CROP_SIZE))
    return template.labels[sl] > 0


@functools.lru_cache(maxsize=4)
def template_percentiles(template: Template, percentiles: tuple[float, float] = (0.5, 99.5)) -> tuple[float, float]:
    """The template T1's ``percentiles`` within its brain mask (about 0.25 and 0.92 for the MNI T1)."""
    sl = tuple(slice(s, s + n) for s, n in zip(CROP_START, CROP_SIZE))
    lo, hi = np.percentile(template.t1[sl][brain_mask(template)], percentiles)
    return float(lo), float(hi)


def normalise_intensity(image: np.ndarray, mask: np.ndarray, percentiles=(0.5, 99.5),
                        target=(0.0, 1.0)) -> tuple[np.ndarray, dict]:
    """Map the ``percentiles`` (lo, hi) of ``image`` within ``mask`` onto ``target`` (t_lo, t_hi), clip to [0, 1].

    Piecewise linear with the landmarks 0 -> 0, lo -> t_lo, hi -> t_hi (the upper segment extended beyond hi), so
    the background of a skull-stripped image stays exactly 0. If lo <= 0 (an image with an offset), one straight
    line through (lo, t_lo) and (hi, t_hi) is used. Returns (float32 image, {intensity_low, intensity_high})."""
    values = image[mask]
    if values.size == 0:
        raise ValueError("The brain mask is empty after resampling; the registration failed.")
    lo, hi = (float(v) for v in np.percentile(values, percentiles))
    if not hi > lo:
        raise ValueError(f"The image is constant within the brain ({lo:.4g}); is it empty or mis-registered?")
    t_lo, t_hi = target
    out = t_lo + (image - lo) * ((t_hi - t_lo) / (hi - lo))
    if lo > 0:
        below = image < lo
        out[below] = image[below] * (t_lo / lo)
    out = np.clip(out, 0.0, 1.0).astype(np.float32)
    return out, {"intensity_low": lo, "intensity_high": hi}


def normalise_to_template(image: np.ndarray, template: Template, percentiles=(0.5, 99.5),
                          match_template: bool = True) -> tuple[np.ndarray, dict]:
    """Normalise an aligned subject image onto the template's 0..1 scale (see the module docstring). ``image``
    lies either on the 1 mm template grid or on its brain crop (``CROP_SIZE``); ``match_template=False`` maps the
    percentiles onto 0 and 1 instead of the template's own."""
    image = np.asarray(image, dtype=np.float32)
    crop_mask = brain_mask(template)
    if image.shape == crop_mask.shape:
        mask = crop_mask
    elif image.shape == template.grid.shape:
        mask = np.zeros(image.shape, dtype=bool)
        mask[tuple(slice(s, s + n) for s, n in zip(CROP_START, CROP_SIZE))] = crop_mask
    else:
        raise ValueError(f"The image of shape {image.shape} is neither on the template grid {template.grid.shape} "
                         f"nor on its crop {crop_mask.shape}.")
    target = template_percentiles(template, tuple(percentiles)) if match_template else (0.0, 1.0)
    return normalise_intensity(image, mask, tuple(percentiles), target)
