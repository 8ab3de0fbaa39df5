"""Requested-volume calibration of a generated atlas, at generation time (no training).

The deformation decoder meets a requested label volume (the lateral ventricles for ``ventricle_volume``) only as
closely as its training got: within a few % inside the training range, but +13.5 % at 40 years and -22 % at 96 ml
for the shipped model (docs/evaluation.md). The calibration makes the atlas measure what was asked: it moves the
decoded velocity (working grid, voxels) along the requested volume's own gradient, smoothed, with the gradients of
the volumes the decoder was trained to keep at its neighbourhood's (``decoder.neighbourhood_volume_labels``: brain
tissue) projected out, so that to first order only the requested structure changes; a secant search on that line
finds where the volume of the atlas's 1 mm label map equals the request (within 0.3 %). Before that the held
structures are searched, the same way along their own gradient, to the volume the training cohort gives the
condition (a bundle's ``held_volumes``: :class:`HeldVolumeModel`), or in a bundle without that model, after a
filter on the velocity (``smoothing_mm`` at generation), back to the volume they had before it (on every other 1 mm
voxel: brain tissue's box is large). The labels and
their roles are those of the bundle's training configuration (``provenance.config.decoder``), so a model retrained
on another cohort calibrates its own volume conditions. Why not in MONAI: it is a property of this model's outputs,
a few lines on top of the warps of :mod:`diffdef.fields`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import fields, metrics
from .bundle import Bundle, BundleError
from .geometry import Grid
from .template import NUM_LABELS, Template, bounding_box

TOLERANCE = 0.003  # |log(V / V requested)|: stop within 0.3 %
HELD_TOLERANCE = 0.001  # the same for a held structure searched back after a filter (brain tissue: 0.1 % is 1.6 ml)
MAX_EVALUATIONS = 12  # volume measurements per condition (the shipped model needs 1-3 where the warp is not
# nearly the identity; secant_search)
SMOOTHING_VOXELS = 1.0  # Gaussian sigma of the search direction, working-grid voxels (4 mm on the shipped grid)
BOX_MARGIN_MM = 25  # the training's fixed box around a label (96 ml ventricles fit in the template's 8 ml box + 25 mm)


@dataclass
class LabelVolume:
    """A label group's volume in an atlas: its 1 mm template indicator warped onto a box around it, every
    ``stride``-th 1 mm voxel along each axis. Trilinear with stride 2 (an unbiased 1/8 sample of the 1 mm count, as
    the synthetic law's calibration; 8 times cheaper) it is differentiable: the decoder's training measure with
    ``decoder.volume_on_template_grid``. Nearest-neighbour with stride 1 it is the count of the atlas's 1 mm label
    map itself (``AtlasGenerator.generate`` warps the labels by nearest neighbour), what the calibration meets.

    The box is the label's bounding box grown by ``margin_mm`` on every side, or, with ``margin_mm`` None, by each
    displacement's own :func:`~diffdef.fields.reach`: no voxel outside that box can pull the label in, so the count
    is the whole map's, on a box that fits the deformation (0.28 of the fixed 25 mm box's voxels at 70 y / 40 ml,
    0.44 at 65 y / 96 ml)."""

    indicator: torch.Tensor  # (1, 1, ...) on the template grid
    template_grid: Grid
    lo: np.ndarray  # the label's inclusive bounding box, template voxels (i, j, k)
    hi: np.ndarray
    margin_mm: int | None = None
    stride: int = 2
    mode: str = "bilinear"

    @classmethod
    def around(cls, template: Template, labels: list[int], margin_mm: int | None = None, stride: int = 2,
               mode: str = "bilinear") -> "LabelVolume":
        mask = template.mask(labels)
        return cls(torch.from_numpy(mask).float()[None, None], template.grid, *bounding_box(mask), margin_mm, stride,
                   mode)

    def samples(self, margin: np.ndarray) -> Grid:
        """The box grown by ``margin`` (template voxels, per axis), every ``stride``-th voxel."""
        lo = np.maximum(self.lo - margin, 0)
        size = (np.minimum(self.hi + margin + 1, self.template_grid.shape) - lo) // self.stride
        return Grid(tuple(int(n) for n in size),
                    self.template_grid.crop(lo, self.stride * size).affine @ np.diag([*[self.stride] * 3, 1.0]))

    def ml(self, disp: torch.Tensor, working_grid: Grid) -> torch.Tensor:
        """Volume (ml, 0-d tensor) in the atlas of working-grid displacement ``disp`` (1, 3, ...) voxels."""
        margin = (np.full(3, self.margin_mm) if self.margin_mm is not None
                  else fields.reach(disp, working_grid, self.template_grid))
        samples = self.samples(margin)
        fine = fields.resample_displacement(disp, working_grid, samples)
        self.indicator = self.indicator.to(disp)  # once per device and dtype (a no-op after)
        warped = fields.warp_onto(self.indicator, self.template_grid, fine, samples, mode=self.mode)
        return warped.sum() * samples.voxel_volume_ml


def bundle_volume_labels(bundle: Bundle) -> tuple[dict, list[list[int]]]:
    """The bundle's volume conditions ``{condition: template label}`` and held label groups, from the decoder
    settings it was trained with; ``({}, [])`` for a bundle trained without volume terms. Raises
    :class:`~diffdef.bundle.BundleError` for entries that are not conditions or template labels."""
    decoder = bundle.meta.get("provenance", {}).get("config", {}).get("decoder", {})
    volume_labels = decoder.get("volume_labels") or {}
    held = [g if isinstance(g, list) else [g] for g in decoder.get("neighbourhood_volume_labels") or []]
    for name, label in volume_labels.items():
        if name not in bundle.spec.names:
            raise BundleError(f"model.json's decoder.volume_labels names {name!r}, which is not a condition of the "
                              f"model ({', '.join(bundle.spec.names)}); re-export the bundle from its training run.")
    for label in list(volume_labels.values()) + [v for g in held for v in g]:
        if not isinstance(label, int) or not 0 < label < NUM_LABELS:
            raise BundleError(f"model.json's decoder volume labels hold {label!r}, which is not a template label "
                              f"(1-{NUM_LABELS - 1}); re-export the bundle from its training run.")
    return dict(volume_labels), held


def held_feature(value, condition, log_names):
    """A condition's coordinate in the held-volume fit (scalar or numpy array, NaN stays NaN): its value, or for a
    condition of ``log_names`` its logarithm, taken at the cohort's smallest value (``condition.low``) below that.
    The fit (``diffdef_training.held_volumes``) and its evaluation (:class:`HeldVolumeModel`) both use it."""
    return np.log(np.maximum(value, condition.low)) if condition.name in log_names else value


class HeldVolumeModel:
    """The bundle's model of its held volumes (model.json ``held_volumes``, fitted on the training cohort by
    ``diffdef_training.held_volumes``): per set of conditions, the log of each held group's volume (ml), linear in
    the conditions (each of ``log_conditions`` by its logarithm, below the cohort's smallest value taken at it).
    :meth:`volumes_ml` evaluates the fit of the conditions a request gives (or of the largest set of them that has
    one)."""

    def __init__(self, entry: dict, bundle: Bundle, held: list[list[int]]):
        spec = bundle.spec
        try:
            if entry["labels"] != held:
                raise ValueError(f"its labels {entry['labels']!r} are not the decoder's held groups {held!r}")
            self.log_names = set(entry["log_conditions"])
            self.fits = []
            for f in entry["fits"]:
                names = list(f["conditions"])
                unknown = [n for n in names + sorted(self.log_names) if n not in spec.names]
                if unknown:
                    raise ValueError(f"{unknown[0]!r} is not a condition of the model")
                intercept = np.asarray(f["intercept"], dtype=float)
                slopes = np.asarray(f["slopes"], dtype=float).reshape(len(names), len(held))
                if intercept.shape != (len(held),) or not (np.isfinite(intercept).all() and np.isfinite(slopes).all()):
                    raise ValueError("a fit's coefficients are not one finite number per held group")
                self.fits.append((names, intercept, slopes))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"model.json's held_volumes is invalid ({exc}); re-export the bundle from its training "
                              "run or write it again with diffdef-train held-volumes.") from exc
        if not any(names == [] for names, *_ in self.fits):
            raise BundleError("model.json's held_volumes has no fit without conditions; re-export the bundle from its "
                              "training run or write it again with diffdef-train held-volumes.")
        self.conditions = {c.name: c for c in spec.conditions}

    def volumes_ml(self, values: dict) -> np.ndarray:
        """Validated values ``{name: value or None}`` -> each held group's volume (ml)."""
        given = {n for n, v in values.items() if v is not None}
        names, intercept, slopes = max((f for f in self.fits if set(f[0]) <= given), key=lambda f: len(f[0]))
        x = np.array([held_feature(values[n], self.conditions[n], self.log_names) for n in names], dtype=float)
        return np.exp(intercept + x @ slopes)


def secant_search(measure: Callable[[float], float | None], f0: float, t1: float, tolerance: float,
                  max_evaluations: int = MAX_EVALUATIONS) -> tuple[float, float, int]:
    """The point nearest a root of ``f``, an increasing function of ``t`` with ``f(0) = f0``, searched from ``t1``:
    ``(t, f(t), evaluations)``, ``(0, f0, n)`` when no point was nearer. ``measure(t)`` returns ``f(t)``, or None
    where ``t`` is not allowed (the map folds there): the next try is then halfway back to the last point. Stops
    once ``|f| < tolerance``, after ``max_evaluations`` calls, or when the next point was already measured.

    A safeguarded secant (by hand: a few lines, where scipy's root finders would be a dependency of generation
    for this loop alone): the secant through the last two points, except that before the root is bracketed a step
    is at most 4 times the last one, and once it is, a secant point outside the bracket, or one after a step that
    did not halve ``|f|`` on the same side of the root, is replaced by the bracket's midpoint. Where ``f`` is
    smooth these are the plain secant's points. The 1 mm nearest-neighbour count is a staircase where the warp is
    nearly the identity (a request near the template's own 16.9 ml of ventricles), which sent the plain secant far
    out and back (50 y / 17.1 ml with a 6 mm smoothing: 6 evaluations, -0.9 %)."""
    ts, fs = [0.0], [float(f0)]
    t, evaluations = float(t1), 0
    while abs(fs[-1]) >= tolerance and evaluations < max_evaluations and t not in ts:
        evaluations += 1
        f = measure(t)
        if f is None:
            t = (t + ts[-1]) / 2
            continue
        ts.append(t)
        fs.append(float(f))
        t = _next_secant_point(ts, fs)
    best = int(np.argmin(np.abs(fs)))
    return ts[best], fs[best], evaluations


def _next_secant_point(ts: list, fs: list) -> float:
    """:func:`secant_search`'s next point from all points so far (``fs[0]`` at ``ts[0]`` first)."""
    (ta, fa), (tb, fb) = (ts[-2], fs[-2]), (ts[-1], fs[-1])
    secant = tb - fb * (tb - ta) / (fb - fa) if fb != fa else math.inf
    below = [(f, t) for t, f in zip(ts, fs) if f < 0]
    above = [(f, t) for t, f in zip(ts, fs) if f > 0]
    if below and above:  # bracketed: between the nearest points on either side
        lo, hi = max(below)[1], min(above)[1]
        stalled = fa * fb > 0 and abs(fb) > 0.5 * abs(fa)
        return (lo + hi) / 2 if stalled or not min(lo, hi) < secant < max(lo, hi) else secant
    reach = 4 * abs(tb - ta)  # not yet bracketed: towards the root (f increases with t), at most 4 steps' length
    towards = -math.copysign(1.0, fb)
    return tb + towards * (min(abs(secant - tb), reach) if (secant - tb) * towards > 0 else reach)


class VolumeCalibrator:
    """Calibrates decoded velocities of one bundle (see the module docstring)."""

    def __init__(self, bundle: Bundle, template: Template):
        labels, held = bundle_volume_labels(bundle)
        self.held_labels = held
        self.working_grid = bundle.working_grid
        self.steps = int(bundle.meta["sampling"].get("integration_steps", fields.DEFAULT_INTEGRATION_STEPS))
        self.targets = {name: LabelVolume.around(template, [label], stride=1, mode="nearest")
                        for name, label in labels.items()}
        # the search directions need only the gradients' shape: the working grid's label fractions give them in
        # 0.02 s where the 1 mm counts took 0.2 s (the search itself measures on the 1 mm grid)
        factor = int(bundle.meta["working_grid"].get("factor", 0))
        fractions = template.on_working_grid(factor)[1] if factor > 0 else None
        if fractions is None or tuple(fractions.shape[2:]) != tuple(self.working_grid.shape):
            raise BundleError(f"The bundle's working grid {tuple(self.working_grid.shape)} is not the template's crop "
                              f"at factor {factor}; re-export the bundle from its training run.")
        self.coarse = {name: fractions[:, [label]] for name, label in labels.items()}
        self.held = [fractions[:, group].sum(1, keepdim=True) for group in held]  # structures that keep their volume
        self.held_counters = [LabelVolume.around(template, group, mode="nearest") for group in held]  # 1/8 sample
        entry = bundle.meta.get("held_volumes")
        self.held_model = HeldVolumeModel(entry, bundle, held) if entry is not None and held else None
        from monai.networks.layers import GaussianFilter  # lazily, as every MONAI import here: not at import time

        self.smooth = GaussianFilter(3, SMOOTHING_VOXELS, truncated=3.0, approx="sampled")

    def _measure(self, counter: LabelVolume, velocity: torch.Tensor | None = None,
                 disp: torch.Tensor | None = None) -> tuple[float, bool]:
        """(volume ml on the 1 mm grid, whether the map folds) of ``velocity``, from one integration, or of its
        displacement ``disp`` when that is at hand."""
        with torch.no_grad():
            disp = fields.integrate_velocity(velocity, self.steps) if disp is None else disp
            return float(counter.ml(disp, self.working_grid)), metrics.folding_ratio(fields.jacobian_determinant(disp)) > 0

    def _gradients(self, velocity: torch.Tensor, fractions: torch.Tensor) -> tuple[list, torch.Tensor, torch.Tensor]:
        """The smoothed gradients of the K working-grid volumes ``fractions`` (1, K, ...) with respect to
        ``velocity``, their values and ``velocity``'s displacement. One backward pass: K copies of the velocity
        integrated as a batch, copy k warping volume k (0.27 s against 0.38 s for K = 2 backward passes)."""
        copies = velocity.detach().float().repeat(fractions.shape[1], 1, 1, 1, 1).requires_grad_(True)
        disp = fields.integrate_velocity(copies, self.steps)
        volumes = fields.warp_probabilities(fractions.to(copies).transpose(0, 1), disp).sum(dim=(1, 2, 3, 4))
        smooth = self.smooth.to(copies.device)
        grads = torch.autograd.grad(volumes.sum(), copies)[0]
        return [smooth(g[None]) for g in grads], volumes.detach(), disp[:1].detach()

    def held_targets(self, values: dict) -> list[float] | None:
        """The held groups' volumes (ml, 1 mm) that the cohort's fit gives for validated ``values``; None for a
        bundle without one."""
        if self.held_model is None:
            return None
        return [float(v) for v in self.held_model.volumes_ml(values)]

    def __call__(self, velocity: torch.Tensor, values: dict,
                 keep_held_of: torch.Tensor | None = None) -> tuple[torch.Tensor, dict, list]:
        """``velocity`` (1, 3, ...) working-grid voxels and validated condition ``values`` (None = not given; a
        volume condition's value in ml is the volume asked) -> the calibrated velocity; per calibrated condition
        ``requested_ml``, ``decoder_ml`` and ``calibrated_ml`` (the atlas label map's 1 mm count), ``evaluations``
        and ``converged`` (within 0.3 %; False when the search stopped short, e.g. where a larger step would fold
        the map, and for a request of 0 ml, which is reported, not met); and per held group (brain tissue)
        ``labels``, ``target_ml``, its ``source``, ``evaluations`` and ``converged`` (its search met it within
        0.1 %, counted on every other 1 mm voxel; the searches after it keep it to first order), empty where the
        held groups were not searched.

        A bundle with a held-volume model (:class:`HeldVolumeModel`) first brings the held groups to the volumes
        its fit gives for ``values``, along their own gradients; a bundle without one, given ``keep_held_of`` (a
        velocity like ``velocity``, e.g. the decoder's before a filter), to their 1 mm volume under that velocity.
        Then the requested volumes are met, the held ones kept to first order (their gradients projected out).
        ``decoder_ml`` is the volume under ``keep_held_of`` where given (what the decoder made, before the
        filter)."""
        asked = {n: float(v) for n, v in values.items() if n in self.targets and v is not None}
        empty = [n for n, v in asked.items() if v <= 0]  # no map empties a structure (nor has 0 ml a log ratio)
        asked = {n: v for n, v in asked.items() if v > 0}
        searches = {n: (self.targets[n], v) for n, v in asked.items()}
        reference = None  # the displacement whose volumes are reported as the decoder's; None: the decoded one
        if keep_held_of is not None:
            with torch.no_grad():
                reference = fields.integrate_velocity(keep_held_of.detach().float(), self.steps)
        held_ml, source = self.held_targets(values), "cohort fit"
        if held_ml is None and reference is not None:
            held_ml, source = [self._measure(c, disp=reference)[0] for c in self.held_counters], "decoder"
        if held_ml is not None:
            searches = {**{f"held {i}": (c, v) for i, (c, v) in enumerate(zip(self.held_counters, held_ml))},
                        **searches}
        if not searches:
            decoded = fields.integrate_velocity(velocity.detach().float(), self.steps) if empty else None
            own_disp = decoded if reference is None else reference
            return velocity, {n: self._not_calibrated(n, own_disp, decoded) for n in empty}, []
        searched = ([*self.held] if held_ml is not None else []) + [self.coarse[n] for n in asked]
        projected_out = [] if held_ml is not None else [*self.held]  # held, not searched: kept to first order
        grads, coarse_volumes, decoded = self._gradients(velocity, torch.cat(searched + projected_out, 1))
        own_disp = decoded if reference is None else reference  # the decoder's own volumes are reported from it
        basis = []  # orthonormal: the held volumes' gradients, then each calibrated volume's direction, in turn

        def orthogonal(g):
            for b in basis:
                g = g - (g * b).sum() * b
            return g

        def add_to_basis(g):
            if float(g.norm()) > 0:
                basis.append(g / g.norm())

        for g in grads[len(searches):]:
            add_to_basis(orthogonal(g))
        base = velocity.detach().float()
        report, held_report = {}, []
        for i, ((name, (counter, target)), g, coarse) in enumerate(zip(searches.items(), grads, coarse_volumes)):
            direction = orthogonal(g)
            before, base_folds = self._measure(counter, disp=decoded) if i == 0 else self._measure(counter, base)
            slope = float((g * direction).sum()) / coarse.item()  # d log V / dt at t = 0, on the working grid

            def log_ratio(t):  # called only within this iteration: the loop's names are this search's
                volume, folds = self._measure(counter, base + t * direction)
                # a label the map lost entirely (1 mm nearest neighbour) counts as a thousandth of a voxel
                return None if folds and not base_folds else math.log(max(volume, 1e-6) / target)

            f0 = math.log(before / target)
            t, f, evaluations = secant_search(log_ratio, f0, -f0 / slope if slope > 0 else 0.0,
                                              TOLERANCE if name in asked else HELD_TOLERANCE)
            base = base + t * direction
            add_to_basis(direction)
            if name in asked:
                own = before if i == 0 and reference is None else self._measure(counter, disp=own_disp)[0]
                report[name] = {"requested_ml": target, "decoder_ml": own, "calibrated_ml": target * math.exp(f),
                                "evaluations": evaluations, "converged": bool(abs(f) < TOLERANCE)}
            else:
                held_report.append({"labels": self.held_labels[i], "target_ml": target, "source": source,
                                    "evaluations": evaluations, "converged": bool(abs(f) < HELD_TOLERANCE)})
        if empty:
            final = fields.integrate_velocity(base, self.steps)
            report.update({n: self._not_calibrated(n, own_disp, final) for n in empty})
        return base.to(velocity.dtype), report, held_report

    def _not_calibrated(self, name: str, decoded: torch.Tensor, final: torch.Tensor) -> dict:
        """The report of a request of 0 ml, which is left as the decoder (and any other calibration) made it;
        ``decoded``: the decoder's displacement, ``final``: the atlas's."""
        own = self._measure(self.targets[name], disp=decoded)[0]
        atlas = own if final is decoded else self._measure(self.targets[name], disp=final)[0]
        return {"requested_ml": 0.0, "decoder_ml": own, "calibrated_ml": atlas, "evaluations": 0, "converged": False}
