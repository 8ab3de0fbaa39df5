"""Run the stages in order on a cohort (synthetic by default) and export a model bundle.

A stage whose ``done.json`` records the same configuration hash as now is skipped and its weights are
reloaded; ``resume`` continues an interrupted stage from its latest checkpoint.
"""
from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from diffdef.bundle import save_bundle
from diffdef.conditions import Condition, ConditionSpec
from diffdef.io import atomic_path
from diffdef.template import NUM_LABELS, load_template

from . import stages
from .config import TrainConfig
from .engine import RunContext, init_distributed

STAGES = ("autoencoder", "diffusion", "registration", "decoder")
UNITS = {"age": "years", "ventricle_volume": "ml"}
# which config sections each stage's result depends on
_DEPENDS = {"autoencoder": ("cohort", "seed", "autoencoder"), "diffusion": ("cohort", "seed", "autoencoder", "diffusion"),
            "registration": ("cohort", "seed", "registration"),
            "decoder": ("cohort", "seed", "autoencoder", "diffusion", "registration", "decoder", "sampling")}


def load_cohort(cfg: TrainConfig, split: str = "train", progress: bool = True) -> tuple[stages.CohortTensors, np.ndarray]:
    """The cohort on the working grid as tensors, plus the raw conditions (N, K) (NaN = missing)."""
    template = load_template()
    t1, frac = template.on_working_grid(cfg.cohort.factor)
    grid = template.working_grid(cfg.cohort.factor).grid
    if cfg.cohort.source == "synthetic":
        from .synthetic import SyntheticCohort

        size, offset = (cfg.cohort.size, 0) if split == "train" else (cfg.cohort.held_out, cfg.cohort.size)
        ds = SyntheticCohort(size, cfg.cohort.seed, cfg.cohort.factor, offset=offset)
        from tqdm import tqdm

        items = [ds[i] for i in tqdm(range(len(ds)), desc=f"synthesising {split} cohort", disable=not progress)]
    else:
        from .cohort import PreprocessOptions, preprocess_cohort

        cache = cfg.cohort.cache or str(Path(cfg.output) / "cohort_cache")
        ds, _ = preprocess_cohort(cfg.cohort.source, cache, options=PreprocessOptions(factor=cfg.cohort.factor),
                                  conditions=cfg.cohort.conditions, progress=progress)
        items = [ds[i] for i in range(len(ds))]
        if not items:
            raise ValueError(f"No subject of {cfg.cohort.source} could be preprocessed; see the report in {cache}.")
    images = torch.stack([it["image"] for it in items]).float()
    have_labels = all(it.get("labels") is not None for it in items)
    labels = None
    if have_labels:
        lab = torch.stack([it["labels"] for it in items]).long()
        labels = torch.nn.functional.one_hot(lab[:, 0], NUM_LABELS).permute(0, 4, 1, 2, 3).float()
    raw = torch.stack([it["conditions"] for it in items]).float()
    return stages.CohortTensors(images, labels, raw, None, t1, frac, grid), raw.numpy()


def condition_spec(cfg: TrainConfig, raw: np.ndarray) -> ConditionSpec:
    conds = []
    for k, name in enumerate(cfg.cohort.conditions):
        col = raw[:, k][np.isfinite(raw[:, k])]
        if len(col) < 2:
            raise ValueError(f"Condition {name!r} has fewer than two known values in the cohort.")
        conds.append(Condition(name, UNITS.get(name, ""), float(col.mean()), float(col.std() or 1.0),
                               float(col.min()), float(col.max())))
    return ConditionSpec(conds)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip()
    except Exception:
        return "unknown"


def _save_state(path: Path, net: torch.nn.Module):
    from safetensors.torch import save_file

    with atomic_path(path, overwrite=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp))


def _load_state(path: Path, net: torch.nn.Module) -> torch.nn.Module:
    from safetensors.torch import load_file

    net.load_state_dict(load_file(str(path)))
    return net.eval()


def _last_losses(stage_dir: Path) -> dict:
    log = stage_dir / "log.csv"
    if not log.exists():
        return {}
    import csv

    rows = list(csv.DictReader(open(log)))
    return {k: float(v) for k, v in rows[-1].items()} if rows else {}


def run_pipeline(cfg: TrainConfig, resume: bool = False, progress: bool = True, only: tuple = STAGES,
                 ctx: RunContext | None = None) -> Path | None:
    """Train every stage (skipping current ones) and export ``<output>/bundle``. Returns the bundle path
    (rank 0) or None (other ranks)."""
    ctx = ctx or init_distributed(cfg.device)
    ctx.seed = cfg.seed
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    cohort, raw = load_cohort(cfg, progress=progress and ctx.is_main)
    spec = condition_spec(cfg, raw)
    cohort.conditions = spec.normalise_tensor(cohort.conditions)
    cohort.spec = spec
    arch = cfg.architecture
    timings = {}

    def stage(name, build, train_fn):
        d = out / name
        marker, weights = d / "done.json", d / f"{name}.safetensors"
        key = cfg.hash("architecture", *_DEPENDS[name])
        if marker.exists() and json.loads(marker.read_text()).get("hash") == key and weights.exists():
            return _load_state(weights, build())
        if name not in only:
            raise RuntimeError(f"Stage {name} is not current in {out}; run it first.")
        t = time.time()
        net = train_fn(d)
        timings[name] = time.time() - t
        if ctx.is_main:
            _save_state(weights, net)
            with atomic_path(marker, overwrite=True) as tmp:
                tmp.write_text(json.dumps({"hash": key, "seconds": timings[name], "losses": _last_losses(d)}))
        return net

    ae = stage("autoencoder", lambda: stages.build_autoencoder(arch["autoencoder"]),
               lambda d: stages.train_autoencoder(cfg, ctx, cohort, d, resume, progress=progress))
    latents = stages.encode_latents(ae, cohort.images, ctx.device)
    scale = float(1.0 / latents.std())
    diffusion = stage("diffusion", lambda: stages.ConditionalDiffusion(arch, len(spec)),
                      lambda d: stages.train_diffusion(cfg, ctx, cohort, d, latents * scale, resume, progress=progress))
    registration = stage("registration", lambda: stages.RegistrationNet(**arch["registration"]),
                         lambda d: stages.train_registration(cfg, ctx, cohort, d, resume, progress=progress))

    def train_dec(d):
        bank = stages.latent_bank(cfg, cohort, diffusion, tuple(latents.shape[1:]), ctx.device, progress and ctx.is_main)
        return stages.train_decoder(cfg, ctx, cohort, d, ae, registration, bank, resume, progress=progress)

    decoder = stage("decoder", lambda: stages.DeformationDecoder(arch["autoencoder"], len(spec)), train_dec)
    if not ctx.is_main:
        return None
    template = load_template()
    working = template.working_grid(cfg.cohort.factor)
    meta = {
        "template": {},
        "working_grid": {**working.grid.to_dict(), **working.to_dict()},
        "conditions": spec.to_list(),
        "architecture": {**arch, "decoder": {"uses": "autoencoder", "num_conditions": len(spec)}},
        "latent": {"shape": list(latents.shape[1:]), "scale_factor": scale},
        "sampling": {"steps": cfg.sampling.steps, "guidance": cfg.sampling.guidance,
                     "integration_steps": cfg.sampling.integration_steps},
        "provenance": {
            "cohort": cfg.cohort.source, "cohort_size": len(cohort), "cohort_seed": cfg.cohort.seed,
            "steps": {s: cfg.stage(s).steps for s in STAGES},
            "final_losses": {s: _last_losses(out / s) for s in STAGES},
            "stage_seconds": {s: json.loads((out / s / "done.json").read_text()).get("seconds") for s in STAGES},
            "morphology_preservation_loss": cfg.decoder.mp_loss,
            "neighbours": cfg.decoder.neighbours, "sigma": cfg.decoder.sigma,
            "config": cfg.to_dict(), "git_commit": _git_commit(), "processes": ctx.world,
            "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads, "
                       f"{'GPU ' + torch.cuda.get_device_name() if ctx.device.type == 'cuda' else 'CPU'}",
            "torch": torch.__version__, "wall_seconds_this_run": time.time() - t_start,
        },
    }
    image_decoder = ae  # the full autoencoder: its decoder is the "direct intensity generation" baseline
    return save_bundle(out / "bundle", meta, {"diffusion": diffusion.unet, "condition_embedding": diffusion.embedding,
                                             "decoder": decoder, "registration": registration,
                                             "image_decoder": image_decoder}, overwrite=True)
