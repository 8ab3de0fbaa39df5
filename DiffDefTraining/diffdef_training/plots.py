"""Loss curves of a training run (each stage's log.csv) as PNG figures."""
from __future__ import annotations

import csv
from pathlib import Path


def plot_run(run, output=None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run)
    output = Path(output) if output else run
    written = []
    for log in sorted(run.glob("*/log.csv")):
        rows = list(csv.DictReader(open(log)))
        if not rows:
            continue
        keys = [k for k in rows[0] if k not in ("step", "lr", "seconds_per_step")]
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
        steps = [int(r["step"]) for r in rows]
        for ax, k in zip(axes[0], keys):
            ax.plot(steps, [float(r[k]) for r in rows])
            ax.set_title(f"{log.parent.name}: {k}")
            ax.set_xlabel("step")
        fig.tight_layout()
        out = output / f"{log.parent.name}_curves.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=80)
        plt.close(fig)
        written.append(out)
    if not written:
        raise FileNotFoundError(f"No stage log (*/log.csv) under {run}.")
    return written
