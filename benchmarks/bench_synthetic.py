"""Benchmark: one synthetic subject on the working grid and at 1 mm, and whether on-the-fly synthesis keeps up with
a training step of the shipped config (autoencoder: batch 4; diffusion: batch 16, on the working grid).

    OMP_NUM_THREADS=1 python benchmarks/bench_synthetic.py [--repeats 7] [--fine-repeats 3] [--threads 1]

Prints the median seconds per subject, the time to synthesise one batch of each stage's size, the median time of
one training step (forward + backward + optimiser step of the shipped architecture, on this machine), and their
ratio (< 1: synthesis keeps up even without worker processes). The shipped pipeline synthesises its cohort once and
keeps it in memory, so its per-step loading is a tensor index (also printed).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "DiffDefTraining" / "configs" / "shipped.yaml"


def _median(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn(-1)
    times = []
    for r in range(repeats):
        t = time.perf_counter()
        fn(r)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=7, help="timed subjects / steps on the working grid")
    p.add_argument("--fine-repeats", type=int, default=3, help="timed subjects at 1 mm")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--config", default=str(SHIPPED))
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    from diffdef_training import stages
    from diffdef_training.config import load_config
    from diffdef_training.synthetic import LAW_FACTOR, SyntheticLaw

    cfg = load_config(a.config)
    factor = cfg.cohort.factor
    t = time.perf_counter()
    law = SyntheticLaw()
    t_law = time.perf_counter() - t
    t_work = _median(lambda r: law.subject(99, 1000 + r, factor), a.repeats)
    t_fine = _median(lambda r: law.subject(99, 2000 + r, None), a.fine_repeats, warmup=0)
    t_law_grid = t_work if factor == LAW_FACTOR else _median(lambda r: law.subject(99, 3000 + r), a.repeats)

    # one training step of the shipped config's autoencoder (batch 4) and diffusion model (batch 16)
    b_ae, b_diff = cfg.autoencoder.batch_size, cfg.diffusion.batch_size
    images = torch.stack([law.subject(99, i, factor).image for i in range(b_ae)])
    ae = stages.build_autoencoder(cfg.architecture["autoencoder"])
    opt = torch.optim.AdamW(ae.parameters(), lr=1e-3)

    def ae_step(_):
        recon, mu, sigma = ae(images)
        loss = F.l1_loss(recon.float(), images) + 1e-6 * (mu.pow(2) + sigma.pow(2)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()

    t_ae = _median(ae_step, max(a.repeats // 2, 3))
    with torch.no_grad():
        z = ae.encode(images)[0]
    latents = z.repeat(b_diff // b_ae + 1, 1, 1, 1, 1)[:b_diff]
    diff = stages.ConditionalDiffusion(cfg.architecture, 2)
    dopt = torch.optim.AdamW(diff.parameters(), lr=1e-3)
    cond = torch.randn(b_diff, 2)

    def diff_step(_):
        t_idx = torch.randint(0, 1000, (b_diff,))
        loss = F.mse_loss(diff(latents + torch.randn_like(latents), t_idx, cond), torch.randn_like(latents))
        dopt.zero_grad()
        loss.backward()
        dopt.step()

    t_diff = _median(diff_step, max(a.repeats // 2, 3))
    pool = torch.randn(400, 1, *images.shape[2:])
    t_index = _median(lambda r: pool[torch.randint(0, 400, (b_diff,))].contiguous(), 20)

    grid = law.template.working_grid(factor).grid
    print(f"threads {torch.get_num_threads()}; law set-up {t_law:.2f} s (calibration tables cached)")
    print(f"one synthetic subject, median: working grid {grid.shape} ({factor} mm) {t_work:.3f} s; "
          f"1 mm {law.template.grid.shape} {t_fine:.2f} s ({t_fine / t_work:.0f}x)")
    if factor != LAW_FACTOR:
        print(f"  (law grid {LAW_FACTOR} mm: {t_law_grid:.3f} s)")
    print(f"{'stage':12s} {'batch':>5s} {'synthesis s':>12s} {'train step s':>13s} {'synthesis/step':>15s} "
          f"{'in-memory load s':>17s}")
    for name, b, step in (("autoencoder", b_ae, t_ae), ("diffusion", b_diff, t_diff)):
        load = b * t_work
        print(f"{name:12s} {b:5d} {load:12.3f} {step:13.3f} {load / step:15.2f} {t_index:17.5f}")
    print("synthesis/step < 1: one process synthesising on the fly keeps up with training; the shipped pipeline "
          "synthesises the cohort once (cohort.size x subject time) and then only indexes tensors.")
    n = cfg.cohort.size + cfg.cohort.held_out
    print(f"shipped cohort ({n} subjects) synthesised once: {n * t_work:.0f} s")


if __name__ == "__main__":
    main()
