"""Requested-volume calibration of a generated atlas, at generation time (no training).

The deformation decoder meets a requested label volume (the lateral ventricles for ``ventricle_volume``) only as
closely as its training got: within a few % inside the training range, but +13.5 % at 40 years and -22 % at 96 ml
for the shipped model (docs/evaluation.md). The calibration makes the atlas measure what was asked: it moves the
decoded velocity (working grid, voxels) along the requested volume's own gradient, smoothed, with the gradients of
the volumes the decoder was trained to keep at its neighbourhood's (``decoder.neighbourhood_volume_labels``: brain
tissue) projected out, so that to first order only the requested structure changes; a secant search on that line
finds where the volume of the atlas's 1 mm label map equals the request (within 0.3 %). The labels and their roles are
those of the bundle's training configuration (``provenance.config.decoder``), so a model retrained on another
cohort calibrates its own volume conditions. Why not in MONAI: it is a property of this model's outputs, a few
lines on top of the warps of :mod:`diffdef.fields`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import fields, metrics
from .bundle import Bundle, BundleError
from .geometry import Grid
from .template import NUM_LABELS, Template

TOLERANCE = 0.003  # |log(V / V requested)|: stop within 0.3 %
MAX_EVALUATIONS = 6  # volume measurements per condition (the shipped model needs 1-3)
SMOOTHING_VOXELS = 1.0  # Gaussian sigma of the search direction, working-grid voxels (4 mm on the shipped grid)
BOX_MARGIN_MM = 25  # around a label: room for it to grow (96 ml ventricles fit in the template's 8 ml box + 25 mm)


@dataclass
class LabelVolume:
    """A label group's volume in an atlas: its 1 mm template indicator warped onto a box around it, every
    ``stride``-th 1 mm voxel along each axis. Trilinear with stride 2 (an unbiased 1/8 sample of the 1 mm count, as
    the synthetic law's calibration; 8 times cheaper) it is differentiable: the decoder's training measure with
    ``decoder.volume_on_template_grid``. Nearest-neighbour with stride 1 it is the count of the atlas's 1 mm label
    map itself (``AtlasGenerator.generate`` warps the labels by nearest neighbour), what the calibration meets."""

    indicator: torch.Tensor  # (1, 1, ...) on the template grid
    template_grid: Grid
    samples: Grid
    mode: str = "bilinear"

    @classmethod
    def around(cls, template: Template, labels: list[int], margin_mm: int, stride: int = 2,
               mode: str = "bilinear") -> "LabelVolume":
        mask = np.isin(template.labels, labels)
        ijk = np.argwhere(mask)
        lo = np.maximum(ijk.min(0) - margin_mm, 0)
        size = (np.minimum(ijk.max(0) + margin_mm + 1, template.grid.shape) - lo) // stride
        samples = Grid(tuple(int(n) for n in size),
                       template.grid.crop(lo, stride * size).affine @ np.diag([stride, stride, stride, 1.0]))
        return cls(torch.from_numpy(mask).float()[None, None], template.grid, samples, mode)

    def ml(self, disp: torch.Tensor, working_grid: Grid) -> torch.Tensor:
        """Volume (ml, 0-d tensor) in the atlas of working-grid displacement ``disp`` (1, 3, ...) voxels."""
        fine = fields.resample_displacement(disp, working_grid, self.samples)
        self.indicator = self.indicator.to(disp)  # once per device and dtype (a no-op after)
        warped = fields.warp_onto(self.indicator, self.template_grid, fine, self.samples, mode=self.mode)
        return warped.sum() * self.samples.voxel_volume_ml


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


class VolumeCalibrator:
    """Calibrates decoded velocities of one bundle (see the module docstring)."""

    def __init__(self, bundle: Bundle, template: Template):
        labels, held = bundle_volume_labels(bundle)
        self.working_grid = bundle.working_grid
        self.steps = int(bundle.meta["sampling"].get("integration_steps", fields.DEFAULT_INTEGRATION_STEPS))
        self.targets = {name: LabelVolume.around(template, [label], BOX_MARGIN_MM, stride=1, mode="nearest")
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
        from monai.networks.layers import GaussianFilter  # lazily, as every MONAI import here: not at import time

        self.smooth = GaussianFilter(3, SMOOTHING_VOXELS, truncated=3.0, approx="sampled")

    def _measure(self, counter: LabelVolume, velocity: torch.Tensor) -> tuple[float, bool]:
        """(volume ml on the 1 mm grid, whether the map folds) of ``velocity``, from one integration."""
        with torch.no_grad():
            disp = fields.integrate_velocity(velocity, self.steps)
            return float(counter.ml(disp, self.working_grid)), metrics.folding_ratio(fields.jacobian_determinant(disp)) > 0

    def __call__(self, velocity: torch.Tensor, requested: dict) -> tuple[torch.Tensor, dict]:
        """``velocity`` (1, 3, ...) working-grid voxels and ``{condition: ml}`` (None = not asked) -> the calibrated
        velocity and, per calibrated condition, ``requested_ml``, ``decoder_ml`` and ``calibrated_ml`` (the atlas
        label map's 1 mm count), ``evaluations`` and ``converged`` (within 0.3 %; False when the search stopped short,
        e.g. where a larger step would fold the map)."""
        asked = {n: float(v) for n, v in requested.items() if n in self.targets and v is not None and v > 0}
        if not asked:
            return velocity, {}
        v = velocity.detach().float().clone().requires_grad_(True)
        coarse_volumes = fields.warp_probabilities(torch.cat([*(self.coarse[n] for n in asked), *self.held], 1).to(v),
                                                   fields.integrate_velocity(v, self.steps)).sum(dim=(0, 2, 3, 4))
        smooth = self.smooth.to(v.device)
        grads = [smooth(torch.autograd.grad(w, v, retain_graph=True)[0]) for w in coarse_volumes]
        basis = []  # orthonormal: the held volumes' gradients, then each calibrated volume's direction, in turn

        def orthogonal(g):
            for b in basis:
                g = g - (g * b).sum() * b
            return g

        def add_to_basis(g):
            if float(g.norm()) > 0:
                basis.append(g / g.norm())

        for g in grads[len(asked):]:
            add_to_basis(orthogonal(g))
        base = velocity.detach().float()
        report = {}
        for (name, target), g, coarse in zip(asked.items(), grads, coarse_volumes):
            direction = orthogonal(g)
            before, base_folds = self._measure(self.targets[name], base)
            ts, fs = [0.0], [math.log(before / target)]
            slope = float((g * direction).sum()) / coarse.item()  # d log V / dt at t = 0, on the working grid
            t = -fs[0] / slope if slope > 0 else 0.0
            evaluations = 0
            while abs(fs[-1]) >= TOLERANCE and evaluations < MAX_EVALUATIONS and t != ts[-1]:
                evaluations += 1
                volume, folds = self._measure(self.targets[name], base + t * direction)
                if folds and not base_folds:
                    t = (t + ts[-1]) / 2  # back off towards the last map that did not fold
                    continue
                ts.append(t)
                fs.append(math.log(volume / target))
                if fs[-1] == fs[-2]:
                    break
                t = ts[-1] - fs[-1] * (ts[-1] - ts[-2]) / (fs[-1] - fs[-2])
            best = int(np.argmin(np.abs(fs)))
            base = base + ts[best] * direction
            add_to_basis(direction)
            own = before if not report else self._measure(self.targets[name], velocity.detach().float())[0]
            report[name] = {"requested_ml": target, "decoder_ml": own,
                            "calibrated_ml": target * math.exp(fs[best]), "evaluations": evaluations,
                            "converged": bool(abs(fs[best]) < TOLERANCE)}
        return base.to(velocity.dtype), report
