"""Baselines that the evaluation compares DiffDef with.

* :func:`identity_atlas` -- the unconditional MNI template itself (the identity deformation).
* :func:`groupwise_template` -- the conventional conditional template: a Gaussian-weighted neighbourhood of
  training subjects averaged by iterative groupwise registration (SimpleITK diffeomorphic demons), timed.
* :func:`intensity_atlas` -- direct intensity generation: the bundle's autoencoder image decoder applied to the
  same diffusion latents DiffDef decodes into a deformation; labels by registering the template to the
  generated image with the bundle's registration network.

Conventions as in :mod:`diffdef.geometry`: tensors ``(B, C, i, j, k)``, displacements in voxel units of their
grid, pull-back ``warped(x) = image(x + u(x))``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from diffdef import fields
from diffdef.geometry import Grid, displacement_from_mm, from_sitk, to_sitk
from diffdef.sampling import sample_latents
from diffdef.template import NUM_LABELS, Template


@dataclass
class BaselineAtlas:
    """An atlas on the 1 mm template grid: T1 (i, j, k) float32, labels (i, j, k) uint8, the displacement that
    maps the template onto it when the method computes one (``(1, 3, ...)`` 1 mm voxels, else None), wall
    seconds, and method-specific details."""

    t1: np.ndarray
    labels: np.ndarray
    displacement: torch.Tensor | None
    seconds: float
    details: dict


def identity_atlas(template: Template) -> BaselineAtlas:
    """The unconditional template: same atlas for every condition (zero displacement)."""
    t = time.perf_counter()
    return BaselineAtlas(template.t1, template.labels, None, time.perf_counter() - t, {"displacement": "zero"})


def _upsample_to_template(x: torch.Tensor, src: Grid, template: Template, padding_value: float = 0.0) -> torch.Tensor:
    """Trilinear resampling of ``(1, C, ...)`` on ``src`` (a coarse crop of the template grid) onto the 1 mm
    template grid; outside ``src``'s extent the value is ``padding_value``."""
    out = fields.resample(x, src, template.grid, padding="zeros")
    if padding_value:
        inside = fields.resample(torch.ones_like(x[:, :1]), src, template.grid, padding="zeros")
        out = out + (1.0 - inside) * padding_value
    return out


# ------------------------------------------------------------------------- conventional groupwise template
def _demons(fixed: torch.Tensor, moving: torch.Tensor, grid: Grid, iterations: int, sigma_vox: float) -> torch.Tensor:
    """SimpleITK diffeomorphic demons of ``moving`` onto ``fixed`` (both ``(i, j, k)`` on ``grid``) after
    histogram matching; returns the pull-back displacement ``(1, 3, ...)`` in voxels of ``grid``:
    ``moving(x + u(x)) ~ fixed(x)``."""
    import SimpleITK as sitk

    f = to_sitk(fixed.numpy().astype(np.float32), grid)
    m = to_sitk(moving.numpy().astype(np.float32), grid)
    m = sitk.HistogramMatching(m, f, numberOfHistogramLevels=256, numberOfMatchPoints=15, thresholdAtMeanIntensity=True)
    demons = sitk.DiffeomorphicDemonsRegistrationFilter()
    demons.SetNumberOfIterations(int(iterations))
    demons.SetSmoothDisplacementField(True)
    demons.SetStandardDeviations(float(sigma_vox))  # ITK's field smoothing is in voxels (pixel coordinates)
    field = demons.Execute(f, m)
    disp_mm, _ = from_sitk(field)  # (i, j, k, 3) RAS mm
    return displacement_from_mm(torch.from_numpy(np.ascontiguousarray(disp_mm)).permute(3, 0, 1, 2)[None].float(), grid)


def _invert(disp: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Inverse of a pull-back displacement (voxels of ``grid``) with SimpleITK's InvertDisplacementField."""
    import SimpleITK as sitk

    from diffdef.geometry import displacement_to_mm

    mm = displacement_to_mm(disp, grid)[0].permute(1, 2, 3, 0).numpy().astype(np.float64)
    inv = sitk.InvertDisplacementField(to_sitk(mm, grid, is_vector=True), maximumNumberOfIterations=20,
                                       maxErrorToleranceThreshold=0.01, meanErrorToleranceThreshold=0.001,
                                       enforceBoundaryCondition=True)
    inv_mm, _ = from_sitk(inv)
    return displacement_from_mm(torch.from_numpy(np.ascontiguousarray(inv_mm)).permute(3, 0, 1, 2)[None].float(), grid)


def groupwise_template(images: torch.Tensor, fractions: torch.Tensor, weights: torch.Tensor, grid: Grid,
                       iterations: int = 3, demons_iterations: int = 40, sigma_vox: float = 1.5) -> dict:
    """Weighted groupwise template of ``images`` ``(N, 1, ...)`` with label fractions ``(N, L, ...)`` on ``grid``.

    Start from the weighted mean of the (unregistered) images. Each iteration: register every image to the
    current template (demons, histogram-matched), average the warped images with ``weights``, and remove the
    weighted mean displacement ``u_bar`` by warping the average with the inverse of ``x -> x + u_bar(x)`` (the
    template moves to the neighbourhood's mean shape, as in ANTs' template construction). The label map is the
    weighted average of the neighbours' label fractions warped the same way (probabilistic label fusion).
    Returns image ``(1, 1, ...)``, fractions ``(1, L, ...)``, the last mean displacement's size and timings."""
    w = (weights / weights.sum()).float()
    n = len(images)
    template = (w[:, None, None, None, None] * images).sum(0, keepdim=True)
    frac = (w[:, None, None, None, None] * fractions).sum(0, keepdim=True)
    history = []
    for _ in range(iterations):
        disps = torch.cat([_demons(template[0, 0], images[i, 0], grid, demons_iterations, sigma_vox) for i in range(n)])
        mean_disp = (w[:, None, None, None, None] * disps).sum(0, keepdim=True)
        inv = _invert(mean_disp, grid)
        # warp each image once: u_n composed with the inverse mean map
        total = torch.cat([fields.compose(disps[i : i + 1], inv) for i in range(n)])
        template = (w[:, None, None, None, None] * fields.warp_image(images, total)).sum(0, keepdim=True)
        frac = (w[:, None, None, None, None] * fields.warp_probabilities(fractions, total)).sum(0, keepdim=True)
        history.append(float(mean_disp.norm(dim=1).mean() * grid.spacing[0]))
    return {"image": template, "fractions": frac, "mean_displacement_mm": history}


def conventional_atlas(template: Template, images: torch.Tensor, fractions: torch.Tensor, weights: torch.Tensor,
                       grid: Grid, iterations: int = 3, demons_iterations: int = 40) -> BaselineAtlas:
    """:func:`groupwise_template` on ``grid`` (a crop of the 1 mm template grid, downsampled), brought to the
    1 mm template grid: image trilinear (0 outside the crop), labels = argmax of the upsampled fractions
    (background outside). The time is the groupwise construction only (subjects are given)."""
    t = time.perf_counter()
    out = groupwise_template(images, fractions, weights, grid, iterations, demons_iterations)
    seconds = time.perf_counter() - t
    t1 = _upsample_to_template(out["image"], grid, template)[0, 0]
    frac = _upsample_to_template(out["fractions"], grid, template)
    frac[:, 0] += 1.0 - _upsample_to_template(torch.ones_like(out["image"]), grid, template)[:, 0]
    labels = frac.argmax(1)[0].to(torch.uint8)
    return BaselineAtlas(t1.numpy().astype(np.float32), labels.numpy(), None, seconds,
                         {"neighbours": int(len(images)), "iterations": iterations, "demons_iterations": demons_iterations,
                          "grid_spacing_mm": float(grid.spacing[0]), "mean_displacement_mm": out["mean_displacement_mm"]})


# --------------------------------------------------------------------------- direct intensity generation
@torch.no_grad()
def intensity_atlas(bundle, template: Template, conditions: torch.Tensor, seed: int, steps: int | None = None,
                    guidance: float | None = None) -> BaselineAtlas:
    """Direct intensity generation from the bundle: the DDIM latent of ``conditions`` (normalised ``(1, K)``)
    with the generator seeded as :class:`diffdef.generate.AtlasGenerator` does (so the same latent DiffDef
    decodes into a deformation), divided by the latent scale factor and decoded by the autoencoder's image
    decoder on the working grid. Labels: the registration network registers the template (moving) to the
    generated image (fixed); the template labels are warped by that map at 1 mm (nearest)."""
    if "image_decoder" not in bundle.nets:
        raise ValueError(f"The bundle {bundle.path} has no image_decoder: direct intensity generation needs it.")
    t = time.perf_counter()
    nets, sampling = bundle.nets, bundle.meta["sampling"]
    gen = torch.Generator().manual_seed(int(seed))
    latent = sample_latents(nets["diffusion"], nets["condition_embedding"], bundle.meta["architecture"]["scheduler"],
                            conditions, bundle.latent_shape, steps=int(steps or sampling["steps"]),
                            guidance=float(sampling["guidance"] if guidance is None else guidance), generator=gen)
    image = nets["image_decoder"].decode(latent / bundle.scale_factor).float().clamp(0, 1)
    work = bundle.working_grid
    factor = int(bundle.meta["working_grid"]["factor"])
    moving, _ = template.on_working_grid(factor)
    velocity = nets["registration"](moving, image)
    disp_work = fields.integrate_velocity(velocity, int(sampling.get("integration_steps", 7)))
    disp = fields.resample_displacement(disp_work, work, template.grid)
    labels = fields.warp_labels(template.labels_tensor(), disp)[0, 0].to(torch.uint8)
    t1 = _upsample_to_template(image, work, template)[0, 0]
    seconds = time.perf_counter() - t
    return BaselineAtlas(t1.numpy().astype(np.float32), labels.numpy(), None, seconds,
                         {"label_transfer_folding_pct": float((fields.jacobian_determinant(disp_work) <= 0).float().mean() * 100)})


def block_average(x: torch.Tensor, template: Template, factor: int) -> torch.Tensor:
    """``(1, C, ...)`` on the 1 mm template grid -> the working grid of ``factor`` (crop, then block mean), as
    :meth:`diffdef.template.Template.on_working_grid` does for the template."""
    from diffdef.template import CROP_SIZE, CROP_START

    sl = (slice(None), slice(None)) + tuple(slice(s, s + n) for s, n in zip(CROP_START, CROP_SIZE))
    return F.avg_pool3d(x[sl].float(), factor)


__all__ = ["BaselineAtlas", "identity_atlas", "groupwise_template", "conventional_atlas", "intensity_atlas",
           "block_average", "NUM_LABELS"]
