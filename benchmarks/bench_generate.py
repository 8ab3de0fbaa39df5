"""Cold-start benchmark of ``diffdef generate``: median of N runs, each a fresh process (imports, model load,
sampling, decoding, integration, warping, writing), with the split per stage.

  python benchmarks/bench_generate.py                       # the shipped model, 5 cold runs
  python benchmarks/bench_generate.py --model runs/tiny/bundle --runs 3 --threads 2

The split comes from each run's sidecar (``atlas.json`` ``timings_s``): load = model bundle + template;
sampling + decoding = DDIM steps and the deformation decoder (timed together by the core); calibration = meeting
the requested ventricle volume (:mod:`diffdef.calibration`; 0 when no volume is asked); integration =
scaling and squaring + resampling the displacement to 1 mm; warping = template T1 and labels + Jacobian;
writing = all output files. "startup" is the rest of the wall time (Python and torch imports, argument parsing).
CPU seconds (user + system of the child) are printed too: on a shared machine they are the stable figure.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = [("load", "load_s"), ("sampling+decoding", "sampling_and_decoding_s"), ("calibration", "volume_calibration_s"),
          ("integration", "integration_s"), ("warping", "warping_s"), ("writing", "writing_s")]


def one_run(cmd: list[str], env: dict) -> dict:
    out = Path(tempfile.mkdtemp(prefix="diffdef_bench_"))
    try:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        proc = subprocess.run(cmd + ["-o", str(out)], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise SystemExit(f"run failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        timings = json.loads((out / "atlas.json").read_text())["timings_s"]
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        row = {name: timings.get(key, 0.0) for name, key in STAGES}
        row["startup"] = wall - sum(row.values())
        row["total (wall)"] = wall
        row["cpu (user+sys)"] = cpu
        return row
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="bundle folder (default: the shipped model)")
    p.add_argument("--runs", type=int, default=5, help="number of cold runs (default 5)")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for the runs (default: unset)")
    p.add_argument("--age", default="70")
    p.add_argument("--ventricle-volume", default="40")
    p.add_argument("--extra", default="", help="more diffdef generate flags, e.g. '--jacobian --steps 10'")
    a = p.parse_args(argv)
    cmd = [sys.executable, "-m", "diffdef.cli", "generate", "--age", a.age, "--ventricle-volume", a.ventricle_volume,
           "--device", "cpu", "--no-progress"]
    if a.model:
        cmd += ["--model", a.model]
    cmd += a.extra.split()
    env = dict(os.environ)
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    print("command: " + " ".join(cmd) + " -o <fresh folder>")
    print(f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at start")
    rows = []
    for n in range(a.runs):
        rows.append(one_run(cmd, env))
        print(f"  run {n + 1}/{a.runs}: {rows[-1]['total (wall)']:.2f} s wall, {rows[-1]['cpu (user+sys)']:.2f} s CPU",
              flush=True)
    keys = list(rows[0])
    print(f"\n| stage | median (s) | min (s) | max (s) |\n|---|---:|---:|---:|")
    for k in keys:
        vals = [r[k] for r in rows]
        print(f"| {k} | {statistics.median(vals):.2f} | {min(vals):.2f} | {max(vals):.2f} |")
    print(f"\nmedian of {a.runs} cold runs: {statistics.median(r['total (wall)'] for r in rows):.2f} s wall "
          f"(target < 10 s); load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
