"""The four training stages: autoencoder, latent diffusion, registration network, deformation decoder.

Each stage is a function ``(cfg, ctx, cohort, stage_dir, upstream, resume) -> trained modules`` built on
:func:`diffdef_training.engine.train`; the pipeline runs them in order and saves their weights.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffdef import fields
from diffdef.calibration import BOX_MARGIN_MM, LabelVolume
from diffdef.networks import ConditionEmbedding, DeformationDecoder, RegistrationNet, build_autoencoder, \
    build_diffusion, build_scheduler, channels_last_on_cpu
from diffdef.sampling import sample_latents
from diffdef.template import load_template

from . import held_volumes
from .config import TrainConfig, neighbourhood_volume_groups
from .engine import RunContext, StepData, sample_generator, train


class CohortTensors:
    """The training cohort in memory on the working grid: images (N,1,...), one-hot labels (N,L,...) or None,
    normalised conditions (N,K) with NaN for missing, plus the template on the same grid; ``label_volumes_ml``
    (N,L): each subject's label volumes measured finer than its working-grid labels count them, or None."""

    def __init__(self, images, labels, conditions, spec, template_t1, template_fractions, grid, label_volumes_ml=None):
        self.images, self.labels, self.conditions = images, labels, conditions
        self.spec, self.template_t1, self.template_fractions, self.grid = spec, template_t1, template_fractions, grid
        self.label_volumes_ml = label_volumes_ml

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):  # for the DistributedSampler: items are indices
        return i


def template_brain_mask(fractions: torch.Tensor) -> torch.Tensor:
    """(1, 1, ...) float mask of the voxels whose label fractions (1, L, ...) are more than half brain."""
    return (fractions[:, 1:].sum(1, keepdim=True) > 0.5).float()


# -- autoencoder ------------------------------------------------------------------------------------------------
def train_autoencoder(cfg: TrainConfig, ctx: RunContext, cohort: CohortTensors, out, resume=False, **kw) -> nn.Module:
    scfg = cfg.autoencoder
    ae = build_autoencoder(cfg.architecture["autoencoder"])
    data = StepData(cohort, scfg.batch_size, ctx, cfg.seed)
    images = cohort.images

    gens = []

    def sampling(z_mu, z_sigma):  # the reparameterisation noise from per-sample generators, not the global RNG:
        eps = torch.stack([torch.randn(z_sigma.shape[1:], generator=g) for g in gens])  # same draws for any split
        return z_mu + eps.to(z_sigma) * z_sigma

    def loss_fn(model, step, micro):
        idx = data.indices(step * scfg.accumulate + micro)
        gens[:] = [sample_generator(cfg.seed + 5, step * scfg.accumulate + micro, i) for i in idx]
        x = images[idx].to(ctx.device)
        recon, mu, sigma = model(x)
        l1 = F.l1_loss(recon.float(), x)
        kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-8) - 1).sum(dim=(1, 2, 3, 4)).mean()
        return l1 + scfg.kl_weight * kl, {"l1": l1.item(), "kl": kl.item()}

    ae.sampling = sampling  # an instance attribute: not part of the state dict
    try:
        return train("autoencoder", ae, loss_fn, scfg, ctx, out, resume, **kw)
    finally:
        del ae.sampling


@torch.no_grad()
def encode_latents(ae: nn.Module, images: torch.Tensor, device, batch: int = 16) -> torch.Tensor:
    """Posterior means of the images' latents ``(N, C, ...)``."""
    ae.eval().to(device)
    return torch.cat([ae.encode(images[i : i + batch].to(device))[0].cpu() for i in range(0, len(images), batch)])


# -- latent diffusion -------------------------------------------------------------------------------------------
class ConditionalDiffusion(nn.Module):
    """MONAI DiffusionModelUNet + the condition embedding, trained together (one module for DDP)."""

    def __init__(self, arch: dict, num_conditions: int):
        super().__init__()
        self.unet = build_diffusion(arch["diffusion"])
        self.embedding = ConditionEmbedding(num_conditions, **arch["condition_embedding"])

    def forward(self, x, t, conditions):
        return self.unet(x, t, context=self.embedding(conditions))


def drop_conditions(conditions: torch.Tensor, gens, p_each: float, p_all: float) -> torch.Tensor:
    """Condition dropout with per-sample generators: each condition NaN with ``p_each``, all with ``p_all``."""
    out = conditions.clone()
    for b, g in enumerate(gens):
        u = torch.rand(conditions.shape[1] + 1, generator=g)
        out[b, u[1:] < p_each] = float("nan")
        if u[0] < p_all:
            out[b] = float("nan")
    return out


def train_diffusion(cfg: TrainConfig, ctx: RunContext, cohort: CohortTensors, out, latents: torch.Tensor,
                    resume=False, **kw) -> ConditionalDiffusion:
    scfg = cfg.diffusion
    arch = cfg.architecture
    model = ConditionalDiffusion(arch, cohort.conditions.shape[1])
    scheduler = build_scheduler(arch["scheduler"], "ddpm")
    data = StepData(cohort, scfg.batch_size, ctx, cfg.seed + 1)
    T = scheduler.num_train_timesteps

    def loss_fn(m, step, micro):
        idx = data.indices(step * scfg.accumulate + micro)
        gens = [sample_generator(cfg.seed, step * scfg.accumulate + micro, i) for i in idx]
        z = latents[idx]
        noise = torch.stack([torch.randn(z.shape[1:], generator=g) for g in gens])
        t = torch.stack([torch.randint(0, T, (1,), generator=g)[0] for g in gens])
        cond = drop_conditions(cohort.conditions[idx], gens, scfg.condition_dropout, scfg.unconditional)
        noisy = scheduler.add_noise(z, noise, t)
        target = scheduler.get_velocity(z, noise, t) if scheduler.prediction_type == "v_prediction" else noise
        pred = m(noisy.to(ctx.device), t.to(ctx.device), cond.to(ctx.device))
        loss = F.mse_loss(pred.float(), target.to(ctx.device))
        return loss, {"mse": loss.item()}

    return train("diffusion", model, loss_fn, scfg, ctx, out, resume, **kw)


# -- registration network ---------------------------------------------------------------------------------------
def registration_losses(kernel: int):
    from monai.losses import DiceLoss, DiffusionLoss, LocalNormalizedCrossCorrelationLoss

    return (LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=kernel),
            DiffusionLoss(), DiceLoss(include_background=False, reduction="mean"))


def registration_architecture(cfg: TrainConfig) -> dict:
    """The registration network's arguments, as the bundle records them (``registration.antisymmetric`` is a
    training option that changes what the network computes, so it travels with the architecture)."""
    arch = dict(cfg.architecture["registration"])
    if cfg.registration.antisymmetric:
        arch["antisymmetric"] = True
    return arch


def build_registration(cfg: TrainConfig) -> RegistrationNet:
    return RegistrationNet(**registration_architecture(cfg))


class RegistrationBatch(NamedTuple):
    """One registration batch (working grid, batch first): the label maps are None without cohort labels; ``known``
    is the pull-back displacement (voxels) that made each known-warp pair's fixed image, ``is_known`` marks those
    pairs (``known`` None when ``registration.warp_pairs`` is 0)."""
    moving: torch.Tensor
    moving_labels: torch.Tensor | None
    fixed: torch.Tensor
    fixed_labels: torch.Tensor | None
    known: torch.Tensor | None
    is_known: torch.Tensor | None


def random_displacement(shape, spacing_mm: float, sigma_mm: float, rms_mm: float, gen) -> torch.Tensor:
    """A random smooth diffeomorphic displacement (1, 3, *shape) in voxels: white noise smoothed by a Gaussian of
    ``sigma_mm``, scaled to ``rms_mm`` RMS velocity norm over the grid, integrated by scaling and squaring."""
    from monai.networks.layers import GaussianFilter

    v = GaussianFilter(3, sigma_mm / spacing_mm)(torch.randn((1, 3, *shape), generator=gen))
    v = v * (rms_mm / spacing_mm) / v.pow(2).sum(1).mean().sqrt()
    return fields.integrate_velocity(v)


def registration_pairs(cohort: CohortTensors, scfg, idx, gens) -> RegistrationBatch:
    """One registration batch for training subjects ``idx``. Each pair is template -> subject (probability
    ``scfg.template_moving``), subject -> template (``scfg.template_fixed``) or another subject -> subject, drawn
    with that subject's generator in ``gens``; then, with probability ``scfg.warp_pairs``, its fixed image is
    replaced by its moving image warped by :func:`random_displacement` (labels alike)."""
    def subject(i):
        return cohort.images[i], (cohort.labels[i] if cohort.labels is not None else None)

    template = (cohort.template_t1[0], cohort.template_fractions[0])
    shape, spacing = tuple(cohort.images.shape[2:]), float(cohort.grid.spacing[0])
    pairs, known = [], []
    for i, g in zip(idx, gens):
        pick = float(torch.rand(1, generator=g))
        if pick < scfg.template_moving:
            pair = template, subject(i)
        elif pick < scfg.template_moving + scfg.template_fixed:
            pair = subject(i), template
        else:
            pair = subject(int(torch.randint(0, len(cohort), (1,), generator=g))), subject(i)
        disp = None
        if scfg.warp_pairs > 0 and float(torch.rand(1, generator=g)) < scfg.warp_pairs:
            image, labels = pair[0]
            disp = random_displacement(shape, spacing, scfg.warp_sigma_mm, scfg.warp_rms_mm, g)
            warped_labels = fields.warp_probabilities(labels[None], disp)[0] if labels is not None else None
            pair = pair[0], (fields.warp_image(image[None], disp)[0], warped_labels)
        known.append(disp)
        pairs.append(pair)
    moving_side, fixed_side = zip(*pairs)
    moving, moving_lab = zip(*moving_side)
    fixed, fixed_lab = zip(*fixed_side)
    stack = torch.stack if cohort.labels is not None else (lambda maps: None)
    known_disp = is_known = None
    if scfg.warp_pairs > 0:
        is_known = torch.tensor([d is not None for d in known])
        known_disp = torch.cat([torch.zeros((1, 3, *shape)) if d is None else d for d in known])
    return RegistrationBatch(torch.stack(moving), stack(moving_lab), torch.stack(fixed), stack(fixed_lab), known_disp,
                             is_known)


def train_registration(cfg: TrainConfig, ctx: RunContext, cohort: CohortTensors, out, resume=False, **kw) -> nn.Module:
    scfg = cfg.registration
    net = build_registration(cfg)
    lncc, smooth, dice = registration_losses(scfg.lncc_kernel)
    data = StepData(cohort, scfg.batch_size, ctx, cfg.seed + 2)

    def loss_fn(m, step, micro):
        idx = data.indices(step * scfg.accumulate + micro)
        gens = [sample_generator(cfg.seed + 2, step * scfg.accumulate + micro, i) for i in idx]
        batch = registration_pairs(cohort, scfg, idx, gens)
        mov, fix = batch.moving.to(ctx.device), batch.fixed.to(ctx.device)
        velocity = m(mov, fix)
        disp = fields.integrate_velocity(velocity.float())
        warped = fields.warp_image(mov, disp)
        sim = lncc(warped, fix)
        reg = smooth(velocity.float())
        loss = sim + scfg.smooth_weight * reg
        logs = {"lncc": sim.item(), "smooth": reg.item()}
        if cohort.labels is not None and scfg.dice_weight > 0:
            d = dice(fields.warp_probabilities(batch.moving_labels.to(ctx.device), disp), batch.fixed_labels.to(ctx.device))
            loss = loss + scfg.dice_weight * d
            logs["dice_loss"] = d.item()
        if batch.known is not None:  # the column is logged every step (NaN without a known-warp pair), as the CSV needs
            logs["known_warp_mse_mm2"] = float("nan")
            if bool(batch.is_known.any()):
                error = (disp - batch.known.to(ctx.device)).pow(2).sum(1).mean((1, 2, 3))  # voxel^2 per pair
                known_mse = error[batch.is_known.to(ctx.device)].mean() * float(cohort.grid.spacing[0]) ** 2
                loss = loss + scfg.warp_weight * known_mse
                logs["known_warp_mse_mm2"] = known_mse.item()
        return loss, logs

    return train("registration", net, loss_fn, scfg, ctx, out, resume, **kw)


# -- deformation decoder with the morphology-preservation loss ---------------------------------------------------
def bank_conditions(cfg: TrainConfig, cohort: CohortTensors) -> torch.Tensor:
    """The ``bank_size`` normalised conditions of the latent bank (NaN = dropped): those of random training
    subjects, with condition dropout. The first ``bank_mixing`` fraction takes each condition's value from an
    independently drawn subject: a user may ask for any combination inside the training ranges (small
    ventricles at 65), which the cohort's joint distribution rarely or never shows the decoder. The next
    ``bank_uniform`` fraction is drawn uniformly between the cohort's extremes in :class:`NeighbourhoodSpace`
    coordinates (log-uniform for ``log_conditions``): the cohort's sparse edges get as many items as its middle
    (1 % of the synthetic cohort has ventricles under 10 ml, 5.8 % under 12 ml). For a condition that is a
    volume (``volume_labels``) that range extends by ``bank_volume_margin`` of itself on each side: the volume
    asked is its own target, so the decoder is trained just past the cohort too (65 y / 96 ml)."""
    dcfg = cfg.decoder
    g = torch.Generator().manual_seed(cfg.seed + 3)
    pick = torch.randint(0, len(cohort), (dcfg.bank_size,), generator=g)
    values = cohort.conditions[pick].clone()
    mixed = int(round(dcfg.bank_mixing * dcfg.bank_size)) if values.shape[1] > 1 else 0
    for k in range(values.shape[1] if mixed else 0):
        values[:mixed, k] = cohort.conditions[torch.randint(0, len(cohort), (mixed,), generator=g), k]
    uniform = int(round(dcfg.bank_uniform * dcfg.bank_size))
    if uniform:
        space = NeighbourhoodSpace(cohort.spec, cohort.conditions, dcfg.log_conditions)
        known = ~torch.isnan(space.cohort)
        lo = torch.where(known, space.cohort, torch.inf).min(0).values
        hi = torch.where(known, space.cohort, -torch.inf).max(0).values
        margin = torch.tensor([dcfg.bank_volume_margin if name in dcfg.volume_labels else 0.0 for name in cohort.spec.names])
        lo, hi = lo - margin * (hi - lo), hi + margin * (hi - lo)
        coords = lo + (hi - lo) * torch.rand(uniform, len(lo), generator=g)
        values[mixed : mixed + uniform] = space.normalised(coords)
    gens = [sample_generator(cfg.seed + 3, 0, i) for i in range(dcfg.bank_size)]
    return drop_conditions(values, gens, dcfg.condition_dropout, 0.0)


@torch.no_grad()
def latent_bank(cfg: TrainConfig, cohort: CohortTensors, diffusion: ConditionalDiffusion, latent_shape, device,
                progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``bank_size`` (normalised condition, DDIM latent) pairs: :func:`bank_conditions`, latents sampled once
    with the sampling defaults (deterministic in the seed)."""
    dcfg = cfg.decoder
    conds = bank_conditions(cfg, cohort)
    g = torch.Generator().manual_seed(cfg.seed + 5)
    diffusion.eval().to(device)
    latents = []
    from tqdm import tqdm

    for i in tqdm(range(0, dcfg.bank_size, 32), desc="latent bank", disable=not progress):
        c = conds[i : i + 32].to(device)
        latents.append(sample_latents(diffusion.unet, diffusion.embedding, cfg.architecture["scheduler"], c,
                                      latent_shape, cfg.sampling.steps, cfg.sampling.guidance, generator=g).cpu())
    return conds, torch.cat(latents)


def neighbourhood_weights(condition: torch.Tensor, cohort_conditions: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian weights ``exp(-d^2 / 2 sigma^2)`` over the cohort, ``d`` the normalised distance over the
    conditions present in ``condition`` (a subject's missing value contributes nothing)."""
    present = ~torch.isnan(condition)
    diff = (cohort_conditions[:, present] - condition[present]).nan_to_num(0.0)
    return torch.exp(-diff.pow(2).sum(1) / (2 * sigma**2)) + 1e-12


def local_linear_factors(condition: torch.Tensor, cohort_conditions: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-subject factors ``f`` (N,) that turn the Gaussian neighbourhood ``w`` ((N,), the
    :func:`neighbourhood_weights` of ``condition``) into local-linear regression's equivalent kernel ``w * f``:
    ``f_i = 1 - (d_i - mean_w d)^T S_w^-1 mean_w d``, with ``d_i`` subject i's normalised offset from
    ``condition`` over the conditions it has (missing: 0) and ``S_w`` the weighted covariance of ``d``. Then
    ``sum w f d = 0``: the weighted neighbourhood's mean condition is ``condition`` itself, also at the cohort's
    edges, where the Gaussian mean is pulled inwards (65 y / 10 ml: the law's displacement averaged over the
    Gaussian neighbourhood misses the condition's own by 0.22 mm RMS, by 0.04 mm with these factors).
    Neighbours drawn with probability ``w`` are weighted by ``f`` alone. Written here because no library offers
    the kernel of a weighted linear fit."""
    present = ~torch.isnan(condition)
    d = (cohort_conditions[:, present] - condition[present]).nan_to_num(0.0).double()
    p = w.double() / w.sum()
    mean = (p[:, None] * d).sum(0)
    centred = d - mean
    cov = (p[:, None, None] * centred[:, :, None] * centred[:, None, :]).sum(0)
    cov = cov + 1e-6 * torch.eye(len(mean), dtype=cov.dtype)  # a condition no neighbour varies in
    return (1 - centred @ torch.linalg.solve(cov, mean)).float()


class NeighbourhoodSpace:
    """The coordinates in which the decoder's Gaussian neighbourhood measures distance: the normalised conditions,
    except that each condition of ``decoder.log_conditions`` is replaced by its logarithm, standardised over the
    cohort (NaN stays NaN).

    Why: a volume varies by a factor, not by an amount. On the linear scale ``sigma`` 0.3 spans the same 3.9 ml
    (0.3 of the synthetic cohort's sd of 13.1 ml) around 10 ml as around 60 ml: at 65 y / 10 ml the
    neighbourhood's weighted mean volume is 13.8 ml (the cohort has far more subjects above 10 ml than below),
    and at 65 y / 60 ml it holds 2.5 subjects' worth of weight. On the log scale (sd 0.45) it spans +-13 %:
    11.4 ml and 5.2 subjects (400-subject cohort, seed 0)."""

    def __init__(self, spec, cohort_conditions: torch.Tensor, log_names=()):
        self.columns = []
        for name in log_names:
            c = spec.names.index(name)
            cond = spec.conditions[c]
            raw = cohort_conditions[:, c] * cond.sd + cond.mean
            raw = raw[~torch.isnan(raw)]
            if len(raw) < 2:
                raise ValueError(f"decoder.log_conditions names {name!r}, which fewer than two cohort subjects have; "
                                 "remove it from decoder.log_conditions.")
            if bool((raw <= 0).any()):
                raise ValueError(f"decoder.log_conditions names {name!r}, but {int((raw <= 0).sum())} cohort value(s) "
                                 f"of it are not positive (smallest {float(raw.min()):g}) and have no logarithm; "
                                 "correct them in the manifest or remove the name from decoder.log_conditions.")
            logs = raw.double().log()
            self.columns.append((c, cond.mean, cond.sd, float(logs.mean()), float(logs.std())))
        self.cohort = self(cohort_conditions)

    def __call__(self, normalised: torch.Tensor) -> torch.Tensor:
        """Normalised conditions (..., K) -> neighbourhood coordinates (..., K)."""
        out = normalised.clone()
        for c, mean, sd, log_mean, log_sd in self.columns:
            out[..., c] = ((normalised[..., c] * sd + mean).log() - log_mean) / log_sd
        return out

    def normalised(self, coordinates: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`__call__`: neighbourhood coordinates (..., K) -> normalised conditions (..., K)."""
        out = coordinates.clone()
        for c, mean, sd, log_mean, log_sd in self.columns:
            out[..., c] = ((coordinates[..., c] * log_sd + log_mean).exp() - mean) / sd
        return out

    def weights(self, condition: torch.Tensor, sigma: float) -> torch.Tensor:
        """:func:`neighbourhood_weights` of ``condition`` (normalised, (K,)) over the cohort, in these coordinates."""
        return neighbourhood_weights(self(condition), self.cohort, sigma)


def check_label_maps(cfg: TrainConfig, cohort: CohortTensors) -> None:
    """Refuse the decoder terms that read the cohort's label maps when the cohort has none (the pipeline calls
    this before any stage trains, so a missing column costs no training time)."""
    if cohort.labels is not None:
        return
    for key in ("neighbourhood_volume_labels", "neighbourhood_shape_labels"):
        if getattr(cfg.decoder, key):
            raise ValueError(f"decoder.{key} needs label maps for every cohort subject (a 'labels' column in the "
                             "manifest); remove the key or add the label maps.")


class DecoderObjective:
    """Loss of the deformation decoder for one condition: centrality = mean over brain voxels of
    ||mean_n u_n||^2 (mm^2), with u_n the frozen network's registration of the generated atlas to neighbour n
    (or its symmetrised form, :meth:`mean_displacement`);
    similarity = LNCC loss between the atlas and the neighbours; smoothness = diffusion regulariser of the
    velocity; volume = (log(V_atlas / V_requested))^2 summed over the conditions that are label volumes
    (``decoder.volume_labels``), V_atlas the template label's volume in the warped template (ml,
    :meth:`label_volumes`), plus, for each label (or group of labels counted together) of
    ``decoder.neighbourhood_volume_labels``, (log(r_atlas / r_neighbourhood))^2 with r its volume relative to the
    template's: the atlas's from the warped fractions, the neighbourhood's the Gaussian-weighted mean over the
    cohort's label maps (each divided by the template's volume measured the same way, so the label maps'
    partial-volume bias cancels), or with ``decoder.neighbourhood_volume_local_linear`` the local-linear estimate
    at the condition; its Gaussian width is ``decoder.neighbourhood_volume_sigma`` where that is set; and for each
    label of ``decoder.neighbourhood_shape_labels``, the neighbourhood-shape term sum_x (p(x) - q(x))^2 / sum_x p_T(x):
    p the atlas's warped template fraction, q the Gaussian-weighted (``decoder.sigma``) mean of the cohort's label
    maps, p_T the template's fraction.

    Why the volume term: the Gaussian neighbourhood only pulls the atlas towards its neighbours' *mean*, and
    through a registration network that recovers part of each displacement; at the edges of the cohort (10 or
    60 ml at 65 years) the decoder then answered at about half the requested change. A condition that *is* a
    measured volume says exactly what the atlas must measure, so it is enforced directly. Volumes that are not
    conditions (brain tissue, which shrinks with age) can get the volumetric form of the MP loss instead: the
    atlas keeps its neighbourhood's mean volume. Its targets are only as good as the cohort's working-grid label
    maps: majority-vote labels at 4 mm overstate thin structures' relative volume (GM +2.7 %, WM -2.4 % against
    the soft fractions, mean over 400 synthetic subjects: ``diffdef-train cohort-stats``); the shipped model
    trained with these targets scored GM/WM Dice 0.927/0.924 against 0.933/0.935 without them. Counted together
    (``[[2, 3]]``, brain tissue) the miscounts cancel: at ``neighbourhood_volume_weight`` 100 that term kept the
    worst tissue error at 1.89 % against 2.02 % without it, and with the log-uniform bank (``bank_uniform``) at
    1.77 % against 2.41 %, so the shipped configuration uses it; at weight 300 it also holds the tissue within 2 %
    with the wider neighbourhood (sigma 0.45) that lifts the GM/WM Dice, and at 1000 (the shipped model) with the
    longer, slower schedule (1200 steps at half the learning rate) that lost it at 300 (docs/decoder-sweep.md, fifth
    to ninth, twentieth and twenty-third rounds).

    Why the shape term: projected onto the synthetic law's two directions, the decoder's velocity would score 1 mm
    GM/WM Dice 0.98-1.0 at every in-range condition; what costs it is a field off those directions that the
    network-measured centrality leaves, 1.5-2.4 mm RMS around the ventricles (0.6-0.9 mm elsewhere), and the part
    near the ventricles alone takes their Dice to 0.82-0.90 (80 y, 65 y / 10-60 ml). The squared difference to the
    neighbours' mean label map is smallest where the atlas's edge follows the mean's one-half contour, which for
    the ventricles lies close to the true atlas's (4 mm Dice 0.92-0.98 at the benchmark's in-range conditions,
    0.88 at 65 y / 10 ml where the cohort is sparse): a centrality measured on the labels, where the registration
    network sees about 0.4 of each displacement. Thin structures need the network: the subjects' own variation
    blurs the cortex's mean below one half (GM Dice of the mean's labels 0.94-0.95; docs/decoder-sweep.md,
    eleventh round). The shipped model uses it for the ventricles (``[4]``, weight 5): on the benchmark it lifted
    their worst in-range Dice from 0.774 to 0.831 (65 y / 10 ml) and the atlases meeting 0.90 from 4 to 7 of 8,
    at a WM cost of 0.005 at 65 y / 60 ml (twenty-fourth round)."""

    def __init__(self, cfg: TrainConfig, cohort: CohortTensors, registration: nn.Module, device):
        check_label_maps(cfg, cohort)
        self.cfg, self.cohort, self.device = cfg, cohort, device
        self.registration = channels_last_on_cpu(registration.to(device).eval(), device)
        for p in self.registration.parameters():
            p.requires_grad_(False)
        self.lncc, self.smooth, _ = registration_losses(cfg.registration.lncc_kernel)
        self.mask = template_brain_mask(cohort.template_fractions).to(device)
        self.spacing = float(cohort.grid.spacing[0])
        self.space = NeighbourhoodSpace(cohort.spec, cohort.conditions, cfg.decoder.log_conditions)
        names = cfg.cohort.conditions
        # (condition column, mean, sd) of each volume condition and the fraction maps of their labels (1, V, ...)
        self.volume_columns = [(names.index(n), cohort.spec.conditions[names.index(n)].mean,
                                cohort.spec.conditions[names.index(n)].sd) for n in cfg.decoder.volume_labels]
        self.volume_fractions = cohort.template_fractions[:, list(cfg.decoder.volume_labels.values())].to(device)
        self.voxel_ml = cohort.grid.voxel_volume_ml
        self.fine_volume_labels = [LabelVolume.around(load_template(), [label], BOX_MARGIN_MM)
                                   for label in cfg.decoder.volume_labels.values()] \
            if cfg.decoder.volume_on_template_grid else None
        groups = neighbourhood_volume_groups(cfg.decoder)
        self.has_neighbourhood_volume = bool(groups)
        self.neighbourhood_fractions = held_volumes.grouped(cohort.template_fractions, groups).to(device)  # (1, V, ...)
        if groups:
            self.neighbourhood_ratios = held_volumes.volume_ratios(cohort, groups)  # (N, V)
            self.template_soft = self.neighbourhood_fractions.sum(dim=(0, 2, 3, 4))  # (V,) voxels
        self.has_volume_terms = bool(self.volume_columns or groups)
        shape_labels = list(cfg.decoder.neighbourhood_shape_labels)
        self.has_neighbourhood_shape = bool(shape_labels)
        if shape_labels:
            self.shape_fractions = cohort.template_fractions[:, shape_labels].to(device)  # (1, S, ...)
            self.shape_maps = cohort.labels[:, shape_labels].to(device)  # (N, S, ...) one-hot
            self.shape_norm = self.shape_fractions.sum(dim=(0, 2, 3, 4))  # (S,) template voxels

    def atlas(self, velocity) -> tuple[torch.Tensor, torch.Tensor]:
        """The template warped by the integrated velocity, and the displacement (working-grid voxels)."""
        disp = fields.integrate_velocity(velocity)
        t1 = self.cohort.template_t1.to(self.device).expand(len(velocity), -1, -1, -1, -1)
        return fields.warp_image(t1, disp), disp

    def label_volumes(self, disp, which: list[int]) -> torch.Tensor:
        """Volumes (ml, (len(which),)) in the atlas made by ``disp`` (1, 3, ...) of the ``decoder.volume_labels``
        numbered ``which``: the warped working-grid fractions summed, or with ``volume_on_template_grid`` the 1 mm
        template label warped trilinearly by the displacement resampled to the 1 mm grid, counted around the label
        (the evaluation's measure, differentiable). The fractions are block averages: where the displacement's Jacobian
        changes across a label's edge, as it does when the ventricles grow, their sum reads the change short."""
        if self.fine_volume_labels is None:
            return fields.warp_probabilities(self.volume_fractions[:, which], disp).sum(dim=(0, 2, 3, 4)) * self.voxel_ml
        return torch.stack([self.fine_volume_labels[v].ml(disp, self.cohort.grid) for v in which])

    def volume(self, disp, condition) -> tuple[torch.Tensor, list[float]]:
        """The volume term of one atlas (``disp`` (1, 3, ...), normalised ``condition`` (K,)) and the relative
        volume errors (%) of the conditions present; 0 when none is."""
        present = [(v, c, m, sd) for v, (c, m, sd) in enumerate(self.volume_columns) if not torch.isnan(condition[c])]
        if not present:
            return disp.new_zeros(()), []
        volume = self.label_volumes(disp, [v for v, *_ in present])
        requested = torch.tensor([float(condition[c]) * sd + m for _, c, m, sd in present], device=volume.device)
        log_ratio = torch.log(volume.clamp_min(1e-3) / requested.clamp_min(1e-3))
        return log_ratio.pow(2).sum(), (100 * (volume.detach() / requested - 1)).tolist()

    def neighbourhood_volume(self, disp, condition) -> tuple[torch.Tensor, list[float]]:
        """The neighbourhood-volume term of one atlas and the relative errors (%) per label; 0 without labels."""
        if not self.has_neighbourhood_volume:
            return disp.new_zeros(()), []
        condition = condition.cpu()
        w = self.space.weights(condition, self.cfg.decoder.neighbourhood_volume_sigma or self.cfg.decoder.sigma)
        if self.cfg.decoder.neighbourhood_volume_local_linear:  # sum(w * f) = sum(w): still a weighted mean
            w = w * local_linear_factors(self.space(condition), self.space.cohort, w)
        # a linear fit can extrapolate a ratio below 0 where the cohort ends; keep the log defined
        target = ((w[:, None] * self.neighbourhood_ratios).sum(0) / w.sum()).clamp_min(1e-3).to(disp.device)
        ratio = fields.warp_probabilities(self.neighbourhood_fractions, disp).sum(dim=(0, 2, 3, 4)) / self.template_soft
        log_ratio = torch.log(ratio.clamp_min(1e-6) / target)
        return log_ratio.pow(2).sum(), (100 * (ratio.detach() / target - 1)).tolist()

    def neighbourhood_shape(self, disp, condition) -> torch.Tensor:
        """The neighbourhood-shape term of one atlas (``disp`` (1, 3, ...), normalised ``condition`` (K,)), summed over
        ``decoder.neighbourhood_shape_labels``; 0 without them."""
        if not self.has_neighbourhood_shape:
            return disp.new_zeros(())
        w = self.space.weights(condition.cpu(), self.cfg.decoder.sigma).to(self.shape_maps)
        target = torch.tensordot(w / w.sum(), self.shape_maps, dims=1)  # (S, ...): the cohort's mean label map
        atlas = fields.warp_probabilities(self.shape_fractions, disp)[0]
        return ((atlas - target).pow(2).sum(dim=(1, 2, 3)) / self.shape_norm).sum()

    def neighbours(self, condition, gen) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``decoder.neighbours`` cohort indices drawn from the Gaussian neighbourhood of ``condition``, and
        their weights in the centrality: :func:`local_linear_factors` with ``decoder.local_linear``, else None
        (equal weights)."""
        w = self.space.weights(condition, self.cfg.decoder.sigma)
        idx = torch.multinomial(w, min(self.cfg.decoder.neighbours, len(w)), replacement=False, generator=gen)
        if not self.cfg.decoder.local_linear:
            return idx, None
        return idx, local_linear_factors(self.space(condition), self.space.cohort, w)[idx]

    def mean_displacement(self, atlas, neighbour_images, weights=None) -> torch.Tensor:
        """Mean over the neighbours of the registration network's displacement from the atlas to each (mm,
        (1, 3, ...)), each multiplied by its ``weights`` (N,) entry when given (the local-linear factors, which
        average 1: the sum is still divided by N). With ``decoder.symmetric_centrality`` it is
        (u(atlas->n) - u(n->atlas)) / 2: the network is biased (registering the synthetic law's true atlas to
        200 held-out neighbours leaves a mean error of 0.51 mm RMS against the law's displacements at 50 y,
        0.30 mm symmetrised; docs/centrality-bias.md), and the part of the bias that does not depend on the
        direction cancels."""
        atlases = atlas.expand(len(neighbour_images), -1, -1, -1, -1)
        disp = fields.integrate_velocity(self.registration(atlases, neighbour_images).float())
        if self.cfg.decoder.symmetric_centrality:
            disp = (disp - fields.integrate_velocity(self.registration(neighbour_images, atlases).float())) / 2
        if weights is None:
            return disp.mean(0, keepdim=True) * self.spacing
        # Local-linear factors average 1 over neighbours drawn with the Gaussian weights (sum w f = sum w), so the
        # weighted mean divides by their number, not by their own sum: the factors take both signs at the
        # cohort's edges, and the sum of ten of them can come close to 0 (sigma 0.6: a centrality of 1518
        # instead of about 0.5 at one step, docs/decoder-sweep.md, twelfth round).
        return (weights.to(disp)[:, None, None, None, None] * disp).mean(0, keepdim=True) * self.spacing

    def terms(self, velocity, atlas, neighbour_images, centrality_grad: bool = True, weights=None) -> dict:
        """The three terms; ``weights`` those of :meth:`neighbours`; with ``centrality_grad`` False the centrality
        is only measured (no gradient through the registration network: the ablation without the MP loss logs it
        at a third of the cost)."""
        moving = atlas.expand(len(neighbour_images), -1, -1, -1, -1)
        with torch.set_grad_enabled(centrality_grad and torch.is_grad_enabled()):
            mean_mm = self.mean_displacement(atlas, neighbour_images, weights)
            centrality = (mean_mm.pow(2).sum(1, keepdim=True) * self.mask).sum() / self.mask.sum()
        return {"centrality": centrality, "similarity": self.lncc(moving, neighbour_images),
                "smoothness": self.smooth(velocity)}

    def loss(self, velocity, atlas, disp, condition, neighbour_images, weights=None) -> tuple[torch.Tensor, dict, list, list]:
        """The decoder's weighted loss for one atlas (``velocity``, ``atlas``, ``disp`` (1, ...) each, normalised
        ``condition`` (K,), the neighbours' images and :meth:`neighbours`' weights): (loss, its unweighted terms,
        the requested volumes' errors %, the neighbourhood volumes' errors %). Training and the diagnostics that
        evaluate the objective elsewhere (``centrality_bias --objective``) share it."""
        d = self.cfg.decoder
        t = self.terms(velocity, atlas, neighbour_images, centrality_grad=d.mp_loss, weights=weights)
        loss = d.sim_weight * t["similarity"] + d.smooth_weight * t["smoothness"]
        if d.mp_loss:
            loss = loss + d.mp_weight * t["centrality"]
        volume_errors, neighbourhood_errors = [], []
        if self.has_volume_terms:
            t["volume"], volume_errors = self.volume(disp, condition)
            loss = loss + d.volume_weight * t["volume"]
            if self.has_neighbourhood_volume:
                t["neighbourhood_volume"], neighbourhood_errors = self.neighbourhood_volume(disp, condition)
                loss = loss + d.neighbourhood_volume_weight * t["neighbourhood_volume"]
        if self.has_neighbourhood_shape:
            t["neighbourhood_shape"] = self.neighbourhood_shape(disp, condition)
            loss = loss + d.neighbourhood_shape_weight * t["neighbourhood_shape"]
        return loss, t, volume_errors, neighbourhood_errors


def decoder_architecture(cfg: TrainConfig) -> dict:
    """The decoder's entry in the bundle's architecture; ``decoder.velocity_smoothing_mm`` becomes the output
    filter's sigma in working-grid voxels (the filter is part of what the network computes)."""
    arch = {"uses": "autoencoder", "num_conditions": len(cfg.cohort.conditions)}
    if cfg.decoder.velocity_smoothing_mm > 0:
        arch["velocity_smoothing"] = cfg.decoder.velocity_smoothing_mm / (cfg.cohort.factor * load_template().grid.spacing[0])
    return arch


def build_decoder(cfg: TrainConfig) -> DeformationDecoder:
    arch = decoder_architecture(cfg)
    return DeformationDecoder(cfg.architecture["autoencoder"], arch["num_conditions"], arch.get("velocity_smoothing", 0.0))


def train_decoder(cfg: TrainConfig, ctx: RunContext, cohort: CohortTensors, out, ae: nn.Module,
                  registration: nn.Module, bank: tuple, resume=False, **kw) -> DeformationDecoder:
    dcfg = cfg.decoder
    decoder = build_decoder(cfg)
    decoder.init_from_autoencoder(ae)
    objective = DecoderObjective(cfg, cohort, registration, ctx.device)
    bank_conds, bank_latents = bank
    data = StepData(torch.utils.data.TensorDataset(bank_conds), dcfg.batch_size, ctx, cfg.seed + 4)

    def loss_fn(m, step, micro):
        idx = data.indices(step * dcfg.accumulate + micro)
        cond = bank_conds[idx].to(ctx.device)
        velocity = m(bank_latents[idx].to(ctx.device), cond).float()
        atlas, disp = objective.atlas(velocity)
        total, logs, volume_errors, neighbourhood_errors = 0.0, {}, [], []
        for b, i in enumerate(idx):
            g = sample_generator(cfg.seed + 4, step * dcfg.accumulate + micro, i)
            idx_nb, weights = objective.neighbours(bank_conds[i], g)
            nb = cohort.images[idx_nb].to(ctx.device)
            loss, t, errors, nb_errors = objective.loss(velocity[b : b + 1], atlas[b : b + 1], disp[b : b + 1], cond[b],
                                                        nb, weights)
            volume_errors += errors
            neighbourhood_errors += nb_errors
            total = total + loss / len(idx)
            for k, v in t.items():
                logs[k] = logs.get(k, 0.0) + v.item() / len(idx)
        if objective.volume_columns:  # mean |error| (%) of the requested volumes in this step (NaN: none asked)
            logs["volume_abs_error_pct"] = float(np.mean(np.abs(volume_errors))) if volume_errors else float("nan")
        if neighbourhood_errors:  # mean |error| (%) of the labels' volumes vs their neighbourhoods' means
            logs["neighbourhood_volume_abs_error_pct"] = float(np.mean(np.abs(neighbourhood_errors)))
        return total, logs

    return train("decoder", decoder, loss_fn, dcfg, ctx, out, resume, **kw)
