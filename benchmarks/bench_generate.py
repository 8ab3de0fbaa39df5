"""Cold-start benchmark of ``diffdef generate``: median of N runs, each a fresh process (imports, model load,
sampling, decoding, integration, warping, writing), with the split per stage.

  python benchmarks/bench_generate.py                       # the shipped model, 5 cold runs
  python benchmarks/bench_generate.py --model runs/tiny/bundle --runs 3 --threads 2
  git worktree add /tmp/old <rev> && python benchmarks/bench_generate.py --compare-to /tmp/old
                                                            # this code against <rev>'s, runs alternating
  python benchmarks/bench_generate.py --compare-python /tmp/user-venv/bin/python
                                                            # this venv against another install, alternating

The split comes from each run's sidecar (``atlas.json`` ``timings_s``): load = model bundle + template;
sampling + decoding = DDIM steps and the deformation decoder (timed together by the core); calibration = meeting
the requested ventricle volume (:mod:`diffdef.calibration`; 0 when no volume is asked); integration =
scaling and squaring + resampling the displacement to 1 mm; warping = template T1 and labels + Jacobian;
writing = all output files. "startup" is the rest of the wall time (Python and torch imports, argument parsing, exit).
CPU seconds (user + system of the child) are printed too: on a shared machine they are the stable figure.
With ``--compare-to`` the runs alternate between this checkout's ``diffdef`` and another checkout's (put first on
``PYTHONPATH``), and the medians of both and their ratio are printed: the one way to compare code on a machine whose
speed drifts from hour to hour. ``--compare-python`` does the same for another interpreter running this checkout,
e.g. a virtual environment with only README's user install (no test or training extras: MONAI's import, which
loads every optional package it finds, is then shorter).
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
    p.add_argument("--compare-to", help="another checkout of this repository (e.g. a git worktree of an older "
                                        "revision): its diffdef runs alternating with this one's")
    p.add_argument("--compare-python", help="another Python interpreter (e.g. another virtual environment's "
                                            "bin/python with this checkout installed): runs alternating with this one")
    a = p.parse_args(argv)
    args = ["-m", "diffdef.cli", "generate", "--age", a.age, "--ventricle-volume", a.ventricle_volume,
            "--device", "cpu", "--no-progress"]
    if a.model:
        args += ["--model", a.model]
    args += a.extra.split()
    env = dict(os.environ)
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    variants = {"this checkout": ([sys.executable] + args, env)}
    if a.compare_to:
        other = Path(a.compare_to).resolve() / "DiffDefSlicer"
        if not (other / "diffdef" / "cli.py").is_file():
            raise SystemExit(f"--compare-to {a.compare_to}: no DiffDefSlicer/diffdef/cli.py there; give the root of "
                             "another checkout of this repository (git worktree add <folder> <revision>).")
        variants[a.compare_to] = ([sys.executable] + args,
                                  {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(other), env.get("PYTHONPATH")]))})
    if a.compare_python:
        python = shutil.which(a.compare_python) or a.compare_python
        try:
            imports = subprocess.run([python, "-c", "import diffdef"], capture_output=True).returncode == 0
        except OSError:  # missing, or not executable
            imports = False
        if not imports:
            raise SystemExit(f"--compare-python {a.compare_python}: not a Python interpreter that imports diffdef; give "
                             "another environment's bin/python after `pip install -e <this checkout>` there.")
        variants[a.compare_python] = ([python] + args, env)
    print("command: python " + " ".join(args) + " -o <fresh folder>")
    print(f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at start")
    rows = {name: [] for name in variants}
    for n in range(a.runs):
        for name, (cmd, variant_env) in variants.items():
            rows[name].append(one_run(cmd, variant_env))
            print(f"  run {n + 1}/{a.runs} ({name}): {rows[name][-1]['total (wall)']:.2f} s wall, "
                  f"{rows[name][-1]['cpu (user+sys)']:.2f} s CPU", flush=True)
    keys = list(rows["this checkout"][0])
    for name, runs in rows.items():
        print(f"\n{name}:\n| stage | median (s) | min (s) | max (s) |\n|---|---:|---:|---:|")
        for k in keys:
            vals = [r[k] for r in runs]
            print(f"| {k} | {statistics.median(vals):.2f} | {min(vals):.2f} | {max(vals):.2f} |")
    for other_name in list(variants)[1:]:
        print(f"\nmedians, this checkout / {other_name}:")
        for k in keys:
            this, other = (statistics.median(r[k] for r in rows[n]) for n in ("this checkout", other_name))
            print(f"  {k}: {this:.2f} / {other:.2f} s" + (f" = {this / other:.2f}" if other > 0 else ""))
    print(f"\nmedian of {a.runs} cold runs: {statistics.median(r['total (wall)'] for r in rows['this checkout']):.2f} s "
          f"wall (target < 10 s); load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
