"""Registration report (issue 5): the bundle's registration network against classical registration.

``python -m diffdef_training.eval_registration --model DIR --pairs 8 --out docs/registration.md``

Held-out synthetic pairs on the bundle's working grid (subjects ``SyntheticCohort(..., offset=400)``, never used
in training): the first half template -> subject, the second half subject -> subject (distinct subjects). Each pair
is registered with

* ``network`` -- the bundle's frozen registration network (stationary velocity, scaling and squaring),
* ``SimpleITK demons`` -- SimpleITK's diffeomorphic demons after histogram matching
  (:func:`diffdef_training.baselines._demons`, the same call the conventional-template baseline uses),
* ``SimpleITK BSpline`` -- a SimpleITK B-spline free-form deformation (mean squares after histogram matching,
  LBFGSB, two levels) unless ``--no-bspline``.

ANTs is not installed (``antspyx`` is not a dependency), so SyN is not run: SimpleITK's diffeomorphic demons is the
classical diffeomorphic reference.

Reported per method: Dice per label of the warped moving labels against the fixed labels (the moving labels as
one-hot maps / template label fractions warped trilinearly, then argmax) with the same Dice before registration,
the folding ratio (% voxels with det J <= 0 of the pull-back displacement, over the whole working grid), and
the wall time per pair (network: forward pass + integration on CPU; all single-threaded as configured).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from diffdef import fields, metrics
from diffdef.bundle import load_bundle
from diffdef.geometry import Grid, displacement_from_mm, from_sitk, to_sitk
from diffdef.io import atomic_path
from diffdef.template import LABEL_NAMES, NUM_LABELS, load_template

from .baselines import _demons
from .synthetic import SyntheticCohort

HELD_OUT_OFFSET = 400
LABELS = list(range(1, NUM_LABELS))


# ------------------------------------------------------------------------------------------------- methods
@torch.no_grad()
def register_network(net: torch.nn.Module, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Pull-back displacement ``(1, 3, ...)`` (working-grid voxels) of the network's velocity."""
    return fields.integrate_velocity(net(moving, fixed).float())


def register_demons(moving: torch.Tensor, fixed: torch.Tensor, grid: Grid, iterations: int = 50,
                    sigma_vox: float = 1.0) -> torch.Tensor:
    """Diffeomorphic demons, field smoothing ``sigma_vox`` voxels (ITK's default 1.0; ITK's ``StandardDeviations``
    are in voxels)."""
    return _demons(fixed[0, 0], moving[0, 0], grid, iterations, sigma_vox)


def register_bspline(moving: torch.Tensor, fixed: torch.Tensor, grid: Grid, mesh: int = 5,
                     iterations: int = 30) -> torch.Tensor:
    """SimpleITK B-spline FFD (``mesh`` control-point intervals per axis), mean squares after histogram matching,
    LBFGSB, shrink 2 -> 1; the transform maps fixed points to moving points, i.e. a pull-back displacement."""
    import SimpleITK as sitk

    f = to_sitk(fixed[0, 0].numpy().astype(np.float32), grid)
    m = to_sitk(moving[0, 0].numpy().astype(np.float32), grid)
    m = sitk.HistogramMatching(m, f, numberOfHistogramLevels=256, numberOfMatchPoints=15, thresholdAtMeanIntensity=True)
    tx = sitk.BSplineTransformInitializer(f, [mesh] * 3, order=3)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMeanSquares()
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=int(iterations),
                             maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=4 * int(iterations))
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([1, 0])
    reg.SetInitialTransform(tx, inPlace=True)
    reg.Execute(f, m)
    field = sitk.TransformToDisplacementField(tx, sitk.sitkVectorFloat64, f.GetSize(), f.GetOrigin(),
                                              f.GetSpacing(), f.GetDirection())
    disp_mm, _ = from_sitk(field)
    return displacement_from_mm(torch.from_numpy(np.ascontiguousarray(disp_mm)).permute(3, 0, 1, 2)[None].float(), grid)


# ------------------------------------------------------------------------------------------------ evaluation
def warped_label_map(moving_probs: torch.Tensor, disp: torch.Tensor | None) -> np.ndarray:
    """Moving label fractions ``(1, L, ...)`` warped linearly (or not, ``disp`` None) -> argmax label map."""
    probs = moving_probs if disp is None else fields.warp_probabilities(moving_probs, disp)
    return probs.argmax(1)[0].numpy().astype(np.uint8)


def make_pairs(n_pairs: int, factor: int, seed: int = 0) -> list[dict]:
    """Half template -> subject (subjects 0..h-1), half subject -> subject (subjects h, h+1, ...; distinct)."""
    h = (n_pairs + 1) // 2
    s = n_pairs - h
    cohort = SyntheticCohort(h + 2 * s, seed=seed, factor=factor, offset=HELD_OUT_OFFSET)
    t1, frac = load_template().on_working_grid(factor)
    pairs = []
    for i in range(h):
        fx = cohort[i]
        pairs.append({"kind": "template->subject", "name": f"template->{fx['index']}", "moving": t1.float(),
                      "moving_probs": frac.float(), "fixed": fx["image"][None].float(), "fixed_labels": fx["labels"][0]})
    for k in range(s):
        mv, fx = cohort[h + 2 * k], cohort[h + 2 * k + 1]
        pairs.append({"kind": "subject->subject", "name": f"{mv['index']}->{fx['index']}", "moving": mv["image"][None].float(),
                      "moving_probs": fields.one_hot(mv["labels"][None], NUM_LABELS),
                      "fixed": fx["image"][None].float(), "fixed_labels": fx["labels"][0]})
    return pairs


def evaluate(model=None, pairs: int = 8, demons_iterations: int = 50, bspline: bool = True,
             bspline_iterations: int = 30, seed: int = 0, threads: int = 1, log=print) -> dict:
    """Register ``pairs`` held-out pairs with every method; returns ``{"rows": [...], "per_pair": [...], ...}``."""
    import SimpleITK as sitk

    saved = torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    try:
        return _evaluate(model, pairs, demons_iterations, bspline, bspline_iterations, seed, threads, log)
    finally:  # leave the caller's (e.g. the test session's) thread settings as they were
        torch.set_num_threads(saved[0])
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(saved[1])


def _evaluate(model, pairs, demons_iterations, bspline, bspline_iterations, seed, threads, log) -> dict:
    bundle = load_bundle(model, networks_wanted=("registration",))
    net = bundle.nets["registration"].eval()
    factor = int(bundle.meta["working_grid"]["factor"])
    grid = bundle.working_grid
    load_template().working_grid(factor).grid.require_same(grid, "bundle working grid")
    data = make_pairs(pairs, factor, seed)

    methods = {"network": lambda mv, fx: register_network(net, mv, fx),
               "SimpleITK demons": lambda mv, fx: register_demons(mv, fx, grid, demons_iterations)}
    if bspline:
        methods["SimpleITK BSpline"] = lambda mv, fx: register_bspline(mv, fx, grid, iterations=bspline_iterations)

    per_pair = []
    for p in data:
        ref = p["fixed_labels"].numpy()
        rec = {"pair": p["name"], "kind": p["kind"], "method": "before registration", "seconds": 0.0, "folding": 0.0,
               "dice": metrics.dice(warped_label_map(p["moving_probs"], None), ref, LABELS)}
        per_pair.append(rec)
        for name, fn in methods.items():
            t = time.perf_counter()
            disp = fn(p["moving"], p["fixed"])
            sec = time.perf_counter() - t
            per_pair.append({"pair": p["name"], "kind": p["kind"], "method": name, "seconds": sec,
                             "folding": metrics.folding_ratio(disp),
                             "dice": metrics.dice(warped_label_map(p["moving_probs"], disp), ref, LABELS)})
        if log:
            log(f"  {p['name']:>22s}: " + ", ".join(
                f"{r['method']} Dice {np.nanmean(list(r['dice'].values())):.3f}" for r in per_pair[-1 - len(methods):]))

    rows = []
    for kind in ("all", "template->subject", "subject->subject"):
        for method in ["before registration", *methods]:
            sel = [r for r in per_pair if r["method"] == method and kind in ("all", r["kind"])]
            if not sel:
                continue
            dice = {v: float(np.nanmean([r["dice"][v] for r in sel])) for v in LABELS}
            rows.append({"pairs": kind, "method": method, "n": len(sel), "dice": dice,
                         "mean_dice": float(np.mean(list(dice.values()))),
                         "folding": float(np.mean([r["folding"] for r in sel])),
                         "max_folding": float(np.max([r["folding"] for r in sel])),
                         "seconds": float(np.mean([r["seconds"] for r in sel]))})
    return {"rows": rows, "per_pair": per_pair, "grid": grid, "factor": factor, "bundle": str(bundle.path),
            "demons_iterations": demons_iterations, "bspline": bspline, "bspline_iterations": bspline_iterations,
            "threads": threads, "pairs": len(data)}


def table(result: dict) -> str:
    head = ["pairs", "method", "n", *[f"Dice {LABEL_NAMES[v]}" for v in LABELS], "mean Dice",
            "folding % (mean / max)", "s / pair"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["--:"] * (len(head) - 2)) + "|"]
    for r in result["rows"]:
        cells = [r["pairs"], r["method"], str(r["n"]), *[f"{r['dice'][v]:.3f}" for v in LABELS], f"**{r['mean_dice']:.3f}**",
                 "—" if r["method"] == "before registration" else f"{r['folding']:.3f} / {r['max_folding']:.3f}",
                 "—" if r["method"] == "before registration" else f"{r['seconds']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(result: dict, command: str, total_seconds: float) -> str:
    g = result["grid"]
    spacing = float(np.asarray(g.spacing)[0])
    bs = (f"SimpleITK BSpline: B-spline FFD, 5 control-point intervals per axis, mean squares after histogram "
          f"matching, LBFGSB {result['bspline_iterations']} iterations, shrink 2 -> 1." if result["bspline"] else "")
    return f"""# Registration network vs classical registration (held-out pairs)

Issue 5 asks for the registration network's Dice and folding on held-out pairs against SimpleITK/ANTs SyN on the
same pairs. **ANTs is not installed here** (`antspyx` is not a dependency of DiffDef), so SyN was not run; the
classical diffeomorphic reference is **SimpleITK's diffeomorphic demons** (the registration the conventional
groupwise-template baseline uses).

Command ({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} when the report was written, {result['threads']}
thread(s) for torch and SimpleITK, total {total_seconds:.0f} s):

```
{command}
```

* Bundle: `{result['bundle']}`; working grid {tuple(g.shape)} at {spacing:g} mm (factor {result['factor']}).
* Pairs: {result['pairs']} held-out synthetic pairs (`SyntheticCohort(seed=0, factor={result['factor']},
  offset={HELD_OUT_OFFSET})`, subjects never seen in training): the first half template -> subject (moving = MNI
  template T1 and label fractions block-averaged to the working grid), the second half subject -> subject (distinct
  subjects).
* Dice: per label (background excluded) of the **moving labels warped linearly as one-hot maps (template: its
  label fractions), then argmax**, against the fixed subject's label map; "before registration" is the same
  argmax without warping. The mean Dice is the mean over the {len(LABELS)} labels.
* Folding: % of working-grid voxels with det J <= 0 of the pull-back displacement (central differences,
  `diffdef.metrics.folding_ratio`), mean and max over pairs.
* Time: wall seconds per pair for the registration itself (network: forward pass + scaling and squaring on CPU).
* Methods: network = `bundle.nets["registration"]` (stationary velocity, 7 scaling-and-squaring steps);
  SimpleITK demons = `DiffeomorphicDemonsRegistrationFilter`, {result['demons_iterations']} iterations, field
  smoothing sigma 1 voxel (ITK's default; ITK's `StandardDeviations` are in voxels), after histogram matching. {bs}

{table(result)}

Per pair (mean Dice over labels):

| pair | {' | '.join(dict.fromkeys(r['method'] for r in result['per_pair']))} |
|---|{'|'.join(['--:'] * len(dict.fromkeys(r['method'] for r in result['per_pair'])))}|
""" + "\n".join(
        f"| {name} | " + " | ".join(f"{np.nanmean(list(r['dice'].values())):.3f}" for r in result["per_pair"] if r["pair"] == name) + " |"
        for name in dict.fromkeys(r["pair"] for r in result["per_pair"])) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffdef_training.eval_registration", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="bundle folder (default: the shipped model)")
    ap.add_argument("--pairs", type=int, default=8, help="number of held-out pairs (half template->subject)")
    ap.add_argument("--demons-iterations", type=int, default=50)
    ap.add_argument("--bspline-iterations", type=int, default=30)
    ap.add_argument("--no-bspline", action="store_true", help="skip the SimpleITK B-spline registration")
    ap.add_argument("--threads", type=int, default=1, help="torch and SimpleITK threads")
    ap.add_argument("--seed", type=int, default=0, help="synthetic cohort seed")
    ap.add_argument("--out", default=None, help="Markdown report to write")
    args = ap.parse_args(argv)
    if args.pairs < 1:
        ap.error("--pairs must be at least 1")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    t = time.perf_counter()
    result = evaluate(args.model, args.pairs, args.demons_iterations, not args.no_bspline, args.bspline_iterations,
                      args.seed, args.threads)
    total = time.perf_counter() - t
    command = "python -m diffdef_training.eval_registration " + " ".join(
        ([f"--model {args.model}"] if args.model else []) + [f"--pairs {args.pairs}"]
        + ([f"--demons-iterations {args.demons_iterations}"] if args.demons_iterations != 50 else [])
        + (["--no-bspline"] if args.no_bspline else []) + ([f"--out {args.out}"] if args.out else []))
    print(table(result))
    print(f"total {total:.0f} s")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out, overwrite=True) as tmp:
            tmp.write_text(report(result, command, total))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
