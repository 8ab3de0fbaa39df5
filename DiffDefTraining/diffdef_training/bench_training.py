"""Benchmark: median step time and peak memory of each training stage at a config's working grid, and the
projected time of that config's full budget.  ``python -m diffdef_training.bench_training [--config F] [--steps 5]``
"""
from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from . import stages
from .config import load_config
from .engine import RunContext
from .pipeline import prepared_cohort


def _timed(fn, steps: int) -> tuple[float, float]:
    times = []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for s in range(steps + 1):
        t = time.perf_counter()
        fn(s)
        times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    return statistics.median(times[1:]), peak  # the first step warms up


#: the shipped model's training config (a source checkout or editable install holds it beside the package)
SHIPPED_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "shipped.yaml"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default=str(SHIPPED_CONFIG),
                   help=f"training config (YAML/JSON); default: the shipped model's, {SHIPPED_CONFIG.name}")
    p.add_argument("--steps", type=int, default=5, help="timed steps per stage (after one warm-up)")
    p.add_argument("--subjects", type=int, default=32, help="cohort size used for the benchmark")
    a = p.parse_args(argv)
    cfg = load_config(a.config, {"cohort": {"size": a.subjects}})
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
    ctx = RunContext(0, 1, device, cfg.seed, cfg.amp)
    cohort = prepared_cohort(cfg, progress=False)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        def run(name, fn):
            scfg = cfg.stage(name)
            keep = (scfg.steps, scfg.checkpoint_every)
            t_step, peak = _timed(lambda s: fn(tmp, s), a.steps)
            results[name] = (t_step, peak, keep[0])

        ae = stages.build_autoencoder(cfg.architecture["autoencoder"])
        lat = stages.encode_latents(ae, cohort.images[:4], device)
        from dataclasses import replace

        def stage_once(name, train_fn):
            def fn(tmp, s):
                saved = cfg.stage(name)
                setattr(cfg, name, replace(saved, steps=1, checkpoint_every=10**9, warmup=1))
                try:
                    return train_fn(f"{tmp}/{name}{s}")
                finally:
                    setattr(cfg, name, saved)
            return fn

        from pathlib import Path

        run("autoencoder", stage_once("autoencoder", lambda d: stages.train_autoencoder(cfg, ctx, cohort, Path(d), progress=False)))
        latents = lat.repeat(len(cohort) // 4 + 1, 1, 1, 1, 1)[: len(cohort)]
        diff = stages.ConditionalDiffusion(cfg.architecture, len(cohort.spec))
        run("diffusion", stage_once("diffusion", lambda d: stages.train_diffusion(cfg, ctx, cohort, Path(d), latents, progress=False)))
        reg = stages.build_registration(cfg)
        run("registration", stage_once("registration", lambda d: stages.train_registration(cfg, ctx, cohort, Path(d), progress=False)))
        bank = (cohort.conditions[:8].repeat(cfg.decoder.bank_size // 8 + 1, 1)[: cfg.decoder.bank_size],
                latents[:1].repeat(cfg.decoder.bank_size, 1, 1, 1, 1))
        run("decoder", stage_once("decoder", lambda d: stages.train_decoder(cfg, ctx, cohort, Path(d), ae, reg, bank, progress=False)))
        t = time.perf_counter()
        stages.latent_bank(replace_bank(cfg, 8), cohort, diff, tuple(lat.shape[1:]), device, progress=False)
        bank_per_item = (time.perf_counter() - t) / 8
    total = 0.0
    print(f"device: {device}, threads: {torch.get_num_threads()}, working grid: {cohort.grid.shape} "
          f"({cohort.grid.spacing[0]:g} mm), latent {tuple(lat.shape[1:])}")
    print(f"{'stage':14s} {'median s/step':>14s} {'peak MiB':>9s} {'steps':>6s} {'projected min':>14s}")
    for name, (t_step, peak, steps) in results.items():
        total += t_step * steps
        print(f"{name:14s} {t_step:14.3f} {peak:9.0f} {steps:6d} {t_step * steps / 60:14.1f}")
    bank_min = bank_per_item * cfg.decoder.bank_size / 60
    print(f"{'latent bank':14s} {bank_per_item:14.3f} {'':9s} {cfg.decoder.bank_size:6d} {bank_min:14.1f}")
    print(f"projected total for this config: {(total / 60 + bank_min):.1f} min (plus cohort synthesis)")


def replace_bank(cfg, n):
    import copy

    c = copy.deepcopy(cfg)
    c.decoder.bank_size = n
    return c


if __name__ == "__main__":
    main()
