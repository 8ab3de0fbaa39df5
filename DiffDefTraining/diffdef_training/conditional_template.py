"""The evaluation's conditional deformable template network, in the style of VoxelMorph's conditional templates
(Dalca et al., "Learning Conditional Deformable Templates with Convolutional Networks", NeurIPS 2019).

There a network maps the attributes alone to a template, trained so that the template registers well onto each
training subject *with that subject's own attributes*: similarity after registration, a smooth deformation and a
small one (the template stays central to the subjects that share its attributes). Conditioning lives in the
network's weights; nothing averages an explicit neighbourhood, and nothing is sampled.

Here the template is the MNI template warped by the network's output, so that it carries labels like DiffDef's
atlases: DiffDef's deformation decoder (same architecture, initialised from the same autoencoder) is fed a zero
latent instead of a diffusion latent, so its conditions are all it sees, and is trained per subject with the
three terms of :class:`diffdef_training.stages.DecoderObjective` that Dalca's loss has (LNCC similarity,
diffusion regulariser of the velocity, and the squared displacement to the subject, brain-averaged in mm^2, with
the subject as its own one-member "neighbourhood"), registered by the base bundle's frozen registration network
as DiffDef's MP loss is. DiffDef's volume and neighbourhood terms are not used: they are what the comparison
isolates, with the diffusion latents and the Gaussian neighbourhood. The result is a bundle whose decoder takes no
latent (``architecture.decoder.latent_input`` false), sharing every other network with its base, so
``diffdef generate --model`` and the evaluation run it through the same generation (calibration, smoothing).

    diffdef-train conditional-template DiffDefSlicer/Resources/Models/default \\
        --output DiffDefTraining/models/conditional-template --run runs/conditional-template
"""
from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from pathlib import Path

import torch

from diffdef.bundle import BundleError, load_bundle, save_bundle, share_weights

from .config import TrainConfig
from .engine import StepData, init_distributed, sample_generator, train
from .pipeline import _checkpoint_seconds, _machine, prepared_cohort, recorded_config
from .stages import CohortTensors, DecoderObjective, build_decoder, drop_conditions

STEPS = 1200
BATCH_SIZE = 2


def objective_config(cfg: TrainConfig, steps: int, batch_size: int) -> TrainConfig:
    """``cfg`` with the decoder stage's schedule set to ``steps`` x ``batch_size`` subjects and DiffDef's own
    terms off: no requested-volume, neighbourhood-volume or neighbourhood-shape term (similarity, smoothness
    and the per-subject displacement remain, with the decoder's weights)."""
    decoder = dataclasses.replace(cfg.decoder, steps=int(steps), batch_size=int(batch_size), mp_loss=True,
                                  volume_labels={}, neighbourhood_volume_labels=[], neighbourhood_shape_labels=[])
    return dataclasses.replace(cfg, decoder=decoder)


def train_conditional_template(cfg: TrainConfig, ctx, cohort: CohortTensors, out: Path, autoencoder, registration,
                               latent_shape: tuple, resume: bool = False, **kw):
    """Train the conditional template network on ``cohort`` (a :func:`objective_config` config); returns the
    decoder (EMA weights when ``decoder.ema`` > 0). Each step draws ``decoder.batch_size`` subjects; each
    subject's conditions lose each value with ``decoder.condition_dropout`` (so the network also answers with a
    condition omitted, as the command line allows), and its template is registered to that subject alone."""
    dcfg = cfg.decoder
    network = build_decoder(cfg)
    network.init_from_autoencoder(autoencoder)
    objective = DecoderObjective(cfg, cohort, registration, ctx.device)
    data = StepData(cohort, dcfg.batch_size, ctx, cfg.seed + 6)
    zero = torch.zeros((1, *latent_shape), device=ctx.device)

    def loss_fn(m, step, micro):
        idx = data.indices(step * dcfg.accumulate + micro)
        gens = [sample_generator(cfg.seed + 6, step * dcfg.accumulate + micro, i) for i in idx]
        cond = drop_conditions(cohort.conditions[idx], gens, dcfg.condition_dropout, 0.0).to(ctx.device)
        velocity = m(zero.expand(len(idx), -1, -1, -1, -1), cond).float()
        atlas, disp = objective.atlas(velocity)
        total, logs = 0.0, {}
        for b, i in enumerate(idx):
            loss, terms, _, _ = objective.loss(velocity[b : b + 1], atlas[b : b + 1], disp[b : b + 1], cond[b],
                                               cohort.images[i : i + 1].to(ctx.device))
            total = total + loss / len(idx)
            for k, v in terms.items():
                logs[k] = logs.get(k, 0.0) + v.item() / len(idx)
        return total, logs

    return train("conditional_template", network, loss_fn, dcfg, ctx, out, resume, **kw)


def run(base, output, run_dir, steps: int = STEPS, batch_size: int = BATCH_SIZE, resume: bool = False,
        progress: bool = True, device: str = "auto", threads: int | None = None, stop_after: int | None = None) -> Path | None:
    """Train on the cohort bundle ``base`` was trained on (rebuilt from its recorded configuration) with its
    registration network and autoencoder, checkpoints in ``run_dir``, and write the bundle ``output`` (sharing
    ``base``'s other networks by relative path). Refuses an existing ``output`` before any training. Returns
    ``output``, or None when ``stop_after`` ended the run early (resume it with ``resume``)."""
    base, output, run_dir = Path(base), Path(output), Path(run_dir)
    if (output / "model.json").exists() or (output.exists() and any(output.iterdir())):
        raise FileExistsError(f"{output} already exists and is not empty; nothing was written. Choose a new folder "
                              "or remove it.")
    bundle = load_bundle(base)
    if not bundle.uses_latents:
        raise ValueError(f"{base} is itself a conditional template bundle; give the DiffDef bundle it was made from.")
    if "image_decoder" not in bundle.nets:
        raise BundleError(f"{base} has no autoencoder weights (image_decoder.safetensors), from which the network "
                          "is initialised; use a bundle exported by diffdef-train pipeline.")
    cfg = objective_config(recorded_config(bundle, "the conditional template is trained on the base bundle's own "
                                                   "cohort, which it names"), steps, batch_size)
    cfg = dataclasses.replace(cfg, output=str(run_dir), device=device, threads=threads or cfg.threads)
    latest = run_dir / "checkpoints" / "latest.pt"
    if latest.exists() and not resume:
        raise FileExistsError(f"{latest} holds an earlier run, which a start from step 0 would overwrite: add "
                              f"--resume to continue it, or delete {run_dir}.")
    ctx = init_distributed(cfg.device)
    ctx.seed, ctx.amp = cfg.seed, cfg.amp
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed * 1009 + 7)
    cohort = prepared_cohort(cfg, progress=progress)
    t = time.time() - (_checkpoint_seconds(run_dir) if resume else 0.0)  # a resumed run counts its earlier steps
    network = train_conditional_template(cfg, ctx, cohort, run_dir, bundle.nets["image_decoder"],
                                         bundle.nets["registration"], bundle.latent_shape, resume,
                                         progress=progress, stop_after=stop_after)
    if stop_after is not None and stop_after < cfg.decoder.steps:
        return None
    meta = copy.deepcopy(bundle.meta)
    meta.pop("weights", None)
    meta["architecture"]["decoder"]["latent_input"] = False
    meta["sampling"]["samples"] = 1  # one deterministic velocity per condition: nothing to average
    meta["provenance"] = {
        # the base's config stays: generation reads the volume conditions' labels from it (calibration)
        **{k: v for k, v in meta["provenance"].items() if k not in ("final_losses", "wall_seconds_this_run")},
        "method": "conditional template network (VoxelMorph-style, no diffusion latents)",
        "base_bundle": str(base), "morphology_preservation_loss": False,
        "conditional_template": {"steps": cfg.decoder.steps, "batch_size": cfg.decoder.batch_size,
                                 "lr": cfg.decoder.lr, "sim_weight": cfg.decoder.sim_weight,
                                 "mp_weight": cfg.decoder.mp_weight, "smooth_weight": cfg.decoder.smooth_weight,
                                 "condition_dropout": cfg.decoder.condition_dropout,
                                 "symmetric_centrality": cfg.decoder.symmetric_centrality,
                                 "seconds": time.time() - t, "machine": _machine(ctx), "torch": torch.__version__},
    }
    nets = {name: bundle.nets[name] for name in ("diffusion", "condition_embedding", "registration")}
    staging = output.with_name(output.name + ".partial")  # a sibling: the relative paths to base stay valid
    if staging.exists():
        shutil.rmtree(staging)
    save_bundle(staging, meta, {**nets, "decoder": network})
    share_weights(staging, base)
    if output.exists():
        output.rmdir()  # empty (checked above)
    staging.rename(output)
    return output
