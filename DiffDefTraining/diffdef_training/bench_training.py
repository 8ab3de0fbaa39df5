"""Benchmark: median step time and peak memory of each training stage at a config's working grid, and the
projected time of that config's full budget.  ``python -m diffdef_training.bench_training [--config F] [--steps 5]``

Each stage runs ``steps + 1`` steps of its real training loop; the times are those the loop itself logs
(``seconds_per_step`` in log.csv: optimizer step included, stage setup and checkpoint writing not), the first
step dropped as warm-up.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from . import stages
from .config import TrainConfig, load_config
from .engine import RunContext
from .pipeline import prepared_cohort

#: the shipped model's training config (a source checkout or editable install holds it beside the package)
SHIPPED_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "shipped.yaml"


def stage_step_times(cfg: TrainConfig, name: str, train_fn: Callable[[TrainConfig, Path], object], steps: int,
                     out: Path) -> tuple[list[float], float]:
    """Run stage ``name`` for ``steps + 1`` steps through ``train_fn(stage_cfg, stage_dir)``, ``stage_cfg`` a copy
    of ``cfg`` (no checkpoints, one warm-up step of the learning rate); returns the logged seconds of the
    ``steps`` steps after the first and the peak memory (MiB: GPU allocations, else the process's maximum
    resident set)."""
    short = dataclasses.replace(cfg.stage(name), steps=steps + 1, warmup=1, log_every=1, checkpoint_every=10**9)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train_fn(dataclasses.replace(cfg, **{name: short}), out / name)
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    with open(out / name / "log.csv", newline="") as f:
        times = [float(row["seconds_per_step"]) for row in csv.DictReader(f)]
    return times[1:], peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(SHIPPED_CONFIG),
                   help=f"training config (YAML/JSON); default: the shipped model's, {SHIPPED_CONFIG.name}")
    p.add_argument("--steps", type=int, default=5, help="timed steps per stage (after one warm-up step)")
    p.add_argument("--subjects", type=int, default=32, help="cohort size used for the benchmark")
    a = p.parse_args(argv)
    cfg = load_config(a.config, {"cohort": {"size": a.subjects}})
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
    ctx = RunContext(0, 1, device, cfg.seed, cfg.amp)
    cohort = prepared_cohort(cfg, progress=False)
    # untrained upstream networks stand in for trained ones: a step costs the same
    ae = stages.build_autoencoder(cfg.architecture["autoencoder"])
    latents = stages.encode_latents(ae, cohort.images, device)
    bank = (cohort.conditions.repeat(cfg.decoder.bank_size // len(cohort) + 1, 1)[: cfg.decoder.bank_size],
            latents[:1].repeat(cfg.decoder.bank_size, 1, 1, 1, 1))
    reg = stages.build_registration(cfg)
    runs = {
        "autoencoder": lambda c, d: stages.train_autoencoder(c, ctx, cohort, d, progress=False),
        "diffusion": lambda c, d: stages.train_diffusion(c, ctx, cohort, d, latents, progress=False),
        "registration": lambda c, d: stages.train_registration(c, ctx, cohort, d, progress=False),
        "decoder": lambda c, d: stages.train_decoder(c, ctx, cohort, d, ae, reg, bank, progress=False),
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, train_fn in runs.items():
            times, peak = stage_step_times(cfg, name, train_fn, a.steps, Path(tmp))
            results[name] = (statistics.median(times), peak, cfg.stage(name).steps)
    n_bank = min(8, cfg.decoder.bank_size)
    diffusion = stages.ConditionalDiffusion(cfg.architecture, len(cohort.spec))
    t = time.perf_counter()
    stages.latent_bank(dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, bank_size=n_bank)), cohort,
                       diffusion, tuple(latents.shape[1:]), device, progress=False)
    bank_per_item = (time.perf_counter() - t) / n_bank

    print(f"device: {device}, threads: {torch.get_num_threads()}, working grid: {cohort.grid.shape} "
          f"({cohort.grid.spacing[0]:g} mm), latent {tuple(latents.shape[1:])}; median of {a.steps} logged steps")
    print(f"{'stage':14s} {'median s/step':>14s} {'peak MiB':>9s} {'steps':>6s} {'projected min':>14s}")
    total = 0.0
    for name, (t_step, peak, steps) in results.items():
        total += t_step * steps
        print(f"{name:14s} {t_step:14.3f} {peak:9.0f} {steps:6d} {t_step * steps / 60:14.1f}")
    bank_min = bank_per_item * cfg.decoder.bank_size / 60
    print(f"{'latent bank':14s} {bank_per_item:14.3f} {'':9s} {cfg.decoder.bank_size:6d} {bank_min:14.1f}")
    print(f"projected total for this config: {(total / 60 + bank_min):.1f} min (plus cohort synthesis and stage setup)")


if __name__ == "__main__":
    main()
