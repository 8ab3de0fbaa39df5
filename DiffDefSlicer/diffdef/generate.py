"""Atlas generation: conditions -> DDIM latent -> deformation decoder -> velocity on the working grid ->
scaling and squaring -> displacement resampled to the 1 mm template grid -> warped template T1 and labels."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import fields, metrics
from .bundle import NETWORKS, Bundle, load_bundle
from .calibration import VolumeCalibrator
from .geometry import Grid, displacement_to_mm
from .sampling import Cancelled, sample_latents
from .template import LABEL_NAMES, load_template

__all__ = ["Atlas", "AtlasGenerator", "Cancelled", "resolve_device"]


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"Unknown device {device!r}: use auto, cpu or cuda.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("Device 'cuda' was requested but this torch has no usable GPU; use --device cpu or auto.")
    return torch.device(device)


@dataclass
class Atlas:
    """A generated atlas on the 1 mm template grid, arrays (i, j, k).

    ``displacement_mm``: (i, j, k, 3) RAS mm, pull-back: ``atlas(x) = template(x + u(x))``; it is the trilinear
    interpolation of ``working_displacement_mm`` ((i, j, k, 3) RAS mm on ``working_grid``, where the velocity is
    integrated), so exporting the working-grid field loses nothing (ITK interpolates it the same way).
    ``velocity``: (1, 3, ...) on the working grid, working-grid voxels.
    ``sampling``: the DDIM ``steps``, ``guidance``, number of averaged latents ``samples`` and ``smoothing_mm``
    that made it, and ``calibrate_volumes``.
    ``folding_ratio``: % of working-grid voxels with det J <= 0 (where the map is integrated); with
    ``jacobian`` the 1 mm det J map is kept and ``folding_ratio_1mm`` is measured on it as well.
    ``volume_calibration``: per requested volume condition, the decoder's volume and the calibrated one
    (:class:`~diffdef.calibration.VolumeCalibrator`); empty when none was asked or calibration was off.
    ``held_volumes``: per held label group (brain tissue), the volume it was brought to and why (the training
    cohort's fit, or the decoder's before the smoothing) and ``atlas_ml``, the label map's 1 mm count; empty where
    none was searched."""

    t1: np.ndarray
    labels: np.ndarray
    displacement_mm: np.ndarray
    grid: Grid
    conditions: dict
    seed: int
    folding_ratio: float
    sampling: dict
    label_volumes_ml: dict
    velocity: torch.Tensor
    working_displacement_mm: np.ndarray | None = None
    working_grid: Grid | None = None
    jacobian: np.ndarray | None = None
    folding_ratio_1mm: float | None = None
    warnings: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    volume_calibration: dict = field(default_factory=dict)
    held_volumes: list = field(default_factory=list)


class AtlasGenerator:
    """Generates atlases from a model bundle. ``progress(fraction 0..1, message)`` is called between steps;
    ``cancel()`` returning True stops the work with :class:`Cancelled`."""

    def __init__(self, bundle: Bundle | str | None = None, device: str = "auto"):
        self.device = resolve_device(device)
        # the image decoder (an evaluation baseline) is not needed to generate or compare: skip it
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, networks_wanted=NETWORKS)
        self.bundle.to(self.device)
        self.template = load_template()
        self.spec = self.bundle.spec
        self.sampling = self.bundle.meta["sampling"]
        self.calibrator = VolumeCalibrator(self.bundle, self.template)

    def velocity(self, conditions: dict, seed: int = 0, steps: int | None = None, guidance: float | None = None,
                 samples: int | None = None, smoothing_mm: float | None = None, progress: Callable | None = None,
                 cancel: Callable | None = None) -> tuple[torch.Tensor, dict, list, dict]:
        """Validated conditions -> velocity ``(1, 3, ...)`` on the working grid (voxels), values, warnings and the
        sampling settings used (``steps``, ``guidance``, ``samples``, ``smoothing_mm``; None = the bundle's).

        With ``samples`` K > 1, K latents are drawn in one batch and their decoded velocities averaged: the
        log-Euclidean mean of K draws of the condition's atlas, which stays diffeomorphic because the mean is taken
        before integration. The first latent of a batch is the one ``samples=1`` draws with the same seed.
        ``smoothing_mm`` > 0 then filters the mean by a Gaussian of that sigma (mm; :func:`fields.smooth`): the
        decoder leaves a fine-scale field off the cohort's anatomy that averaging the draws does not remove
        (docs/decoder-sweep.md, twenty-fifth round). A conditional template bundle (``Bundle.uses_latents``
        False) samples nothing: its decoder makes one velocity from the conditions, and ``steps``, ``guidance``,
        ``samples`` and ``seed`` do not apply (recorded as 0, 0 and 1)."""
        mean, values, warnings, used = self._mean_velocity(conditions, seed, steps, guidance, samples, smoothing_mm,
                                                           progress, cancel)
        return self._smoothed(mean, used), values, warnings, used

    def _smoothed(self, velocity: torch.Tensor, used: dict) -> torch.Tensor:
        return fields.smooth(velocity, used["smoothing_mm"] / float(self.bundle.working_grid.spacing[0]))

    def _mean_velocity(self, conditions, seed, steps, guidance, samples, smoothing_mm, progress, cancel):
        """:meth:`velocity` before the smoothing."""
        values, warnings = self.spec.validate(conditions)
        used = {"steps": int(steps or self.sampling["steps"]),
                "guidance": float(self.sampling["guidance"] if guidance is None else guidance),
                "samples": int(samples or self.sampling.get("samples", 1)),
                "smoothing_mm": float(self.sampling.get("smoothing_mm", 0.0) if smoothing_mm is None else smoothing_mm)}
        if used["steps"] < 1 or used["samples"] < 1:
            raise ValueError(f"steps and samples must be at least 1 (got steps {used['steps']}, "
                             f"samples {used['samples']}).")
        if not 0 <= used["smoothing_mm"] < float("inf"):
            raise ValueError(f"smoothing must be a finite number of mm >= 0 (0 = none), got {used['smoothing_mm']}.")
        nets = self.bundle.nets
        cond = self.spec.normalise(values).to(self.device)  # (1, K)
        if self.bundle.uses_latents:
            gen = torch.Generator().manual_seed(int(seed))
            latent = sample_latents(
                nets["diffusion"], nets["condition_embedding"], self.bundle.meta["architecture"]["scheduler"],
                cond.expand(used["samples"], -1), self.bundle.latent_shape, steps=used["steps"],
                guidance=used["guidance"], generator=gen, cancel=cancel,
                progress=(lambda n, total: progress(0.8 * n / total, f"Diffusion step {n}/{total}")) if progress else None)
        else:  # a conditional template network: nothing to sample or average, one velocity per condition
            used = {**used, "steps": 0, "guidance": 0.0, "samples": 1}
            if (steps, guidance, samples) != (None, None, None):
                warnings = warnings + ["This model is a conditional template network: it samples nothing, so the "
                                       "sampling steps, guidance and samples asked for do not apply."]
            latent = torch.zeros((1, *self.bundle.latent_shape), device=self.device)
        with torch.no_grad():  # one latent at a time: on 2 CPU threads the decoder's batch of 8 took 0.54-0.62 s,
            # eight single passes 0.38 s (the diffusion U-Net, by contrast, gains from the batch: 1.3 s against 2.4 s)
            velocity = sum(nets["decoder"](latent[i:i + 1], cond) for i in range(len(latent))) / len(latent)
        return velocity, values, warnings, used

    def generate(self, conditions: dict, seed: int = 0, steps: int | None = None, guidance: float | None = None,
                 samples: int | None = None, smoothing_mm: float | None = None, jacobian: bool = False,
                 calibrate_volumes: bool = True, progress: Callable | None = None,
                 cancel: Callable | None = None) -> Atlas:
        """The atlas for ``conditions``; ``steps``, ``guidance``, ``samples``, ``smoothing_mm``: see
        :meth:`velocity`. With ``calibrate_volumes`` each requested volume condition is met on the 1 mm grid
        (:mod:`diffdef.calibration`), and the structures the decoder was trained to hold at its neighbourhood's
        volume (brain tissue) get the volume the training cohort's fit gives the conditions (a bundle's
        ``held_volumes``), or, in a bundle without that fit, after a smoothing, the volume they had before it.
        Without it the atlas keeps the
        decoder's own volumes, so the bundle's default smoothing, which shrinks the ventricles and grows the tissue
        until the calibration gives them back, is not applied (an explicit ``smoothing_mm`` is)."""
        if smoothing_mm is None and not calibrate_volumes:
            smoothing_mm = 0.0
        timings = {}
        t0 = time.perf_counter()
        mean, values, warnings, used = self._mean_velocity(conditions, seed, steps, guidance, samples, smoothing_mm,
                                                           progress, cancel)
        velocity = self._smoothed(mean, used)
        timings["sampling_and_decoding_s"] = time.perf_counter() - t0
        if cancel is not None and cancel():
            raise Cancelled("Generation was cancelled.")
        calibration, held, used = {}, [], {**used, "calibrate_volumes": bool(calibrate_volumes)}
        if calibrate_volumes:
            if progress:
                progress(0.82, "Calibrating the requested volumes")
            t = time.perf_counter()
            velocity, calibration, held = self.calibrator(velocity, values,
                                                          keep_held_of=mean if used["smoothing_mm"] > 0 else None)
            timings["volume_calibration_s"] = time.perf_counter() - t
            warnings = warnings + [f"{n} = {c['requested_ml']:g} ml could not be met exactly: the atlas has "
                                   f"{c['calibrated_ml']:.1f} ml (the decoder gave {c['decoder_ml']:.1f} ml)."
                                   for n, c in calibration.items() if not c["converged"]]
        if progress:
            progress(0.85, "Integrating the velocity field")
        t = time.perf_counter()
        with torch.no_grad():
            disp_work = fields.integrate_velocity(velocity, int(self.sampling.get("integration_steps", 7)))
            disp = fields.resample_displacement(disp_work, self.bundle.working_grid, self.template.grid)
        timings["integration_s"] = time.perf_counter() - t
        if progress:
            progress(0.9, "Warping the template")
        t = time.perf_counter()
        with torch.no_grad():
            t1, labels = fields.warp_image_and_labels(self.template.t1_tensor().to(self.device),
                                                      self.template.labels_tensor().to(self.device), disp,
                                                      support=self.template.support())
            det = fields.jacobian_determinant(disp) if jacobian else None
        timings["warping_s"] = time.perf_counter() - t
        labels_np = labels[0, 0].cpu().numpy().astype(np.uint8)
        volumes = self.template.label_volumes_ml(labels_np)
        held = [{**h, "atlas_ml": sum(volumes[LABEL_NAMES[v]] for v in h["labels"])} for h in held]
        work = self.bundle.working_grid
        as_ijk3 = lambda d, g: displacement_to_mm(d, g)[0].permute(1, 2, 3, 0).cpu().numpy()
        atlas = Atlas(
            t1=t1[0, 0].cpu().numpy(), labels=labels_np, displacement_mm=as_ijk3(disp, self.template.grid),
            grid=self.template.grid, conditions=values, seed=int(seed), sampling=used,
            folding_ratio=metrics.folding_ratio(fields.jacobian_determinant(disp_work)),
            label_volumes_ml=volumes, velocity=velocity.cpu(),
            working_displacement_mm=as_ijk3(disp_work, work), working_grid=work,
            jacobian=det[0, 0].cpu().numpy() if jacobian else None,
            folding_ratio_1mm=metrics.folding_ratio(det) if jacobian else None,
            warnings=warnings, timings=timings, volume_calibration=calibration, held_volumes=held)
        if progress:
            progress(1.0, "Done")
        return atlas
