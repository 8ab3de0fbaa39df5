"""diffdef: conditional brain atlases from the command line.

Examples:
  diffdef generate --age 70 --ventricle-volume 40 -o out/
  diffdef trajectory --age 50:80:5 --ventricle-volume 30 -o traj/
  diffdef compare subject.nii.gz --age 72 --labels seg.nii.gz -o cmp/
  diffdef generate --model my_bundle/ --age 65 --seed 3 --jacobian -o out/

Condition flags (--age, --ventricle-volume, ...) come from the model's condition spec; each may be omitted.
A value outside the training range still generates, with a printed extrapolation warning.
Exit status: 0 done, 2 invalid input (condition, model folder, existing output, unreadable file), 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
MAX_FRAMES = 200


class UsageError(Exception):
    """A user error: printed without a traceback, exit status 2."""


# ------------------------------------------------------------------------------------------------------------------
# Model spec (for the condition flags) without loading any weights


def _default_model() -> Path:
    from .bundle import DEFAULT_BUNDLE

    return DEFAULT_BUNDLE


def read_spec(model: str | None):
    """The condition spec of a bundle folder (reads model.json only). Raises BundleError."""
    from .bundle import BundleError
    from .conditions import ConditionSpec

    path = Path(model) if model else _default_model()
    meta_file = path / "model.json"
    if not meta_file.is_file():
        hint = (" The shipped model is missing from this installation: pass --model <bundle folder>."
                if not model else "")
        raise BundleError(f"{path} is not a DiffDef model bundle: it has no model.json. Choose the folder that holds "
                          f"model.json and the .safetensors files (made by diffdef-train export).{hint}")
    try:
        meta = json.loads(meta_file.read_text())
        return ConditionSpec.from_list(meta["conditions"])
    except Exception as exc:
        raise BundleError(f"{meta_file} has no valid condition spec ({exc}).") from exc


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ------------------------------------------------------------------------------------------------------------------
# Parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def _non_negative_mm(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of mm, 0 or more, got {text!r}")
    return value


def _common(spec, range_ok: bool) -> argparse.ArgumentParser:
    """Options shared by every subcommand (accepted before or after the subcommand)."""
    p = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    g = p.add_argument_group("model and sampling")
    g.add_argument("--model", metavar="DIR", help="model bundle folder (model.json + *.safetensors); "
                   "default: the shipped model")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to run (default auto: CUDA when available)")
    g.add_argument("--seed", type=int, metavar="N", help="random seed; same seed, same machine, same atlas (default 0)")
    g.add_argument("--steps", type=_positive_int, metavar="K", help="DDIM sampling steps (default: the model's)")
    g.add_argument("--samples", type=_positive_int, metavar="K",
                   help="diffusion draws averaged into the atlas (their velocities' mean): more is closer to the "
                        "condition's expected atlas, each costs one more sampling batch item (default: the model's; "
                        "1 = a single draw)")
    g.add_argument("--smoothing", type=_non_negative_mm, metavar="MM",
                   help="Gaussian sigma (mm) applied to the averaged velocity before integration: removes the "
                        "decoder's fine-scale field; the volume calibration then sets the brain tissue's volume "
                        "(default: the model's, 0 with --no-volume-calibration; 0 = none)")
    g.add_argument("--guidance", type=float, metavar="W",
                   help="classifier-free guidance weight (default: the model's; 1 = none)")
    g.add_argument("--no-volume-calibration", action="store_true",
                   help="keep the decoder's own label volumes (and leave out the model's default --smoothing, which "
                        "the calibration pairs with); by default a requested volume (e.g. "
                        "--ventricle-volume) is met within 0.3 %% on the 1 mm grid by a small correction of the "
                        "deformation, and brain tissue gets the volume the training cohort has at the conditions "
                        "(models that carry that fit; else the decoder's), within 0.1 %% (the sidecar records "
                        "every volume before and after)")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files (default: refuse)")
    g.add_argument("--jacobian", action="store_true", help="also write the Jacobian determinant map")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _add_conditions(p: argparse.ArgumentParser, spec, range_ok: bool) -> None:
    g = p.add_argument_group("conditions (from the model; each may be omitted)")
    if spec is None:
        g.description = "(the model could not be read, so its condition flags are unknown; see --model)"
        return
    for c in spec.conditions:
        extra = " or a range START:STOP:STEP (inclusive), e.g. 50:80:5" if range_ok else ""
        g.add_argument(flag(c.name), dest=f"cond_{c.name}", metavar="VALUE" if not range_ok else "VALUE|RANGE",
                       help=f"{c.name.replace('_', ' ')} in {c.unit} (trained on {c.low:.4g}-{c.high:.4g} {c.unit}; "
                            f"outside: extrapolation with a warning){extra}")
    g.add_argument("--condition", action="append", metavar="NAME=VALUE", dest="cond_extra",
                   help="a condition by its model name (repeatable), e.g. --condition age=70")


GEN_EPILOG = """outputs (in -o DIR, file names start with --prefix, default atlas):
  atlas_t1.nii.gz            atlas T1 on the 1 mm MNI template grid (197 x 233 x 189)
  atlas_labels.nii.gz        atlas label map (1 CSF, 2 GM, 3 WM, 4 lateral ventricles)
  atlas_displacement.nii.gz  displacement, ITK/ANTs form (LPS mm); atlas(x) = template(x + u(x))
  atlas_displacement.nrrd    the same displacement as a Slicer grid transform
  atlas_jacobian.nii.gz      Jacobian determinant (with --jacobian)
  atlas_preview.png          three orthogonal slices with label contours
  atlas.json                 conditions, model, seed, volume per label (ml), folding ratio, warnings, timings

examples:
  diffdef generate --age 70 --ventricle-volume 40 -o out/
  diffdef generate --age 85 -o old/          # outside the training range: generates with a warning
  diffdef generate --model my_bundle/ --device cpu --seed 1 --steps 10 --jacobian -o out/
"""

TRAJ_EPILOG = """one condition is a range START:STOP:STEP (inclusive of STOP), the others fixed or omitted.
outputs (in -o DIR, file names start with --prefix, default trajectory):
  trajectory_t1_4d.nii.gz      atlas T1 series, 4-D (i, j, k, t), one frame per value
  trajectory_labels_4d.nii.gz  atlas label series, 4-D
  trajectory.gif               animation of one fixed slice (--plane, --slice) with label contours
  trajectory_montage.png       the same frames side by side
  trajectory.csv               conditions, volume per label (ml), folding ratio per frame
  trajectory.json              the same with the model, seed and timings

examples:
  diffdef trajectory --age 50:80:5 --ventricle-volume 30 -o traj/
  diffdef trajectory --ventricle-volume 10:60:10 --age 70 --plane axial -o vent/
"""

CMP_EPILOG = """outputs (in -o DIR, file names start with --prefix, default compare):
  compare_subject_in_atlas.nii.gz   the subject in atlas space (affine, then deformable)
  compare_subject_affine.nii.gz     the subject after the affine only (1 mm template grid)
  compare_log_jacobian.nii.gz       log det J of atlas -> subject: > 0 subject larger, < 0 smaller
  compare_warped_atlas_labels.nii.gz  atlas labels carried onto the (aligned) subject
  compare_displacement.nii.gz       deformable displacement (ITK/ANTs form), .nrrd for Slicer
  compare_atlas_t1.nii.gz           the condition-matched atlas
  compare.csv                       per label: volumes (ml), differences, Dice and HD95 (mm) with --labels
  compare.json                      everything above plus affine, folding ratio, conditions, timings

examples:
  diffdef compare subject.nii.gz --age 72 -o cmp/
  diffdef compare subject.nii.gz --age 72 --ventricle-volume 35 --labels seg.nii.gz -o cmp/
"""


def build_parser(spec, spec_error: str | None = None) -> argparse.ArgumentParser:
    desc = __doc__
    if spec_error:
        desc += f"\nNote: {spec_error}\n"
    parser = argparse.ArgumentParser(prog="diffdef", description=desc, parents=[_common(spec, False)],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"diffdef {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,trajectory,compare}")

    def add(name, help_, epilog, range_ok):
        s = sub.add_parser(name, help=help_, description=help_, epilog=epilog, parents=[_common(spec, range_ok)],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_conditions(s, spec, range_ok)
        s.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder (created when missing)")
        return s

    s = add("generate", "generate one conditional atlas", GEN_EPILOG, False)
    s.add_argument("--prefix", default="atlas", help="output file name prefix (default atlas)")
    s.add_argument("--no-preview", action="store_true", help="skip the PNG preview")
    s = add("trajectory", "generate atlases across a range of one condition", TRAJ_EPILOG, True)
    s.add_argument("--prefix", default="trajectory", help="output file name prefix (default trajectory)")
    s.add_argument("--plane", choices=("axial", "coronal", "sagittal"), default="coronal",
                   help="plane of the animated slice (default coronal)")
    s.add_argument("--slice", type=int, metavar="N", dest="slice_index",
                   help="slice index in that plane (RAS display order; default: through the ventricles)")
    s.add_argument("--frame-ms", type=int, default=400, help="GIF frame duration in ms (default 400)")
    s = add("compare", "register a subject to its condition-matched atlas and report differences", CMP_EPILOG, False)
    s.add_argument("subject", help="subject T1 (NIfTI or NRRD, skull-stripped, any grid)")
    s.add_argument("--labels", metavar="SEG", help="subject label map on the subject's grid (values 1-4 as the "
                   "template: CSF, GM, WM, lateral ventricles) for Dice and HD95")
    s.add_argument("--prefix", default="compare", help="output file name prefix (default compare)")
    return parser


# ------------------------------------------------------------------------------------------------------------------
# Conditions


def _number(text: str) -> float | str:
    try:
        return float(text)
    except (TypeError, ValueError):
        return text  # spec.validate reports non-numbers with the valid names and ranges


def parse_range(text: str, name: str, spec) -> list:
    """``START:STOP:STEP`` (inclusive of STOP) -> values; raises ConditionError."""
    from .conditions import ConditionError

    parts = text.split(":")
    bad = f"{name} range {text!r} must be START:STOP:STEP with numbers, e.g. 50:80:5. Valid: {spec.valid_names()}."
    if len(parts) not in (2, 3):
        raise ConditionError(bad)
    try:
        nums = [float(p) for p in parts]
    except ValueError:
        raise ConditionError(bad) from None
    if not all(math.isfinite(x) for x in nums):
        raise ConditionError(f"{name} range {text!r} holds NaN or inf. Valid: {spec.valid_names()}.")
    start, stop = nums[0], nums[1]
    step = nums[2] if len(nums) == 3 else (stop - start if stop != start else 1.0)
    if step == 0 or (stop - start) * step < 0:
        raise ConditionError(f"{name} range {text!r}: STEP must be non-zero and go from START towards STOP.")
    count = int(math.floor((stop - start) / step + 1e-9)) + 1
    if count > MAX_FRAMES:
        raise ConditionError(f"{name} range {text!r} has {count} values; at most {MAX_FRAMES} frames.")
    return [round(start + n * step, 10) for n in range(count)]


def collect_conditions(args, spec, range_ok: bool) -> tuple[dict, str | None, list]:
    """(fixed conditions {name: value}, the ranged name or None, its values). Raises ConditionError."""
    from .conditions import ConditionError

    raw = {}
    for c in spec.conditions:
        v = getattr(args, f"cond_{c.name}", None)
        if v is not None:
            raw[c.name] = v
    for item in getattr(args, "cond_extra", None) or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConditionError(f"--condition {item!r} must be NAME=VALUE. Valid: {spec.valid_names()}.")
        raw[name.strip().replace("-", "_")] = value.strip()
    for name in getattr(args, "unknown_conditions", []):
        raw.setdefault(name, None)
    ranged = {k: v for k, v in raw.items() if isinstance(v, str) and ":" in v}
    if ranged and not range_ok:
        k = next(iter(ranged))
        raise ConditionError(f"{flag(k)} {ranged[k]}: ranges are for `diffdef trajectory`; give one value. "
                             f"Valid: {spec.valid_names()}.")
    if len(ranged) > 1:
        raise ConditionError(f"Only one condition may be a range, got {', '.join(flag(k) for k in ranged)}.")
    fixed = {k: (_number(v) if isinstance(v, str) else v) for k, v in raw.items() if k not in ranged}
    unknown = [k for k in fixed if k not in spec.names]
    if unknown:
        spec.validate({k: 0.0 for k in unknown})  # raises, listing the valid names and ranges
    for k, v in fixed.items():
        if v is None:  # an unknown flag that had no value: validate raised above
            raise ConditionError(f"{flag(k)} needs a value. Valid: {spec.valid_names()}.")
    spec.validate(fixed)  # NaN, negative, non-number: refuse before loading anything heavy
    if not ranged:
        return fixed, None, []
    name, text = next(iter(ranged.items()))
    values = parse_range(text, name, spec)
    for v in values:
        spec.validate({**fixed, name: v})
    return fixed, name, values


def _unknown_flags(rest: list[str]) -> tuple[list[str], list[str]]:
    """Split leftover argv into unknown ``--name [value]`` conditions (names) and anything else."""
    names, other = [], []
    i = 0
    while i < len(rest):
        tok = rest[i]
        if tok.startswith("--") and len(tok) > 2:
            key = tok[2:].split("=", 1)[0]
            names.append(key.replace("-", "_"))
            if "=" not in tok and i + 1 < len(rest) and not rest[i + 1].startswith("--"):
                i += 1
        else:
            other.append(tok)
        i += 1
    return names, other


# ------------------------------------------------------------------------------------------------------------------
# Progress


class Progress:
    """tqdm bar fed by ``progress(fraction, message)`` callbacks; stage offsets for multi-atlas runs."""

    def __init__(self, enabled: bool, desc: str = "diffdef"):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=1000, desc=desc, unit="‰", file=sys.stderr, dynamic_ncols=True,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}] {postfix}")
        self.pos = 0

    def callback(self, start: float = 0.0, span: float = 1.0):
        def cb(fraction: float, message: str = "") -> None:
            if self.bar is None:
                return
            target = int(1000 * min(1.0, max(0.0, start + span * fraction)))
            if target > self.pos:
                self.bar.update(target - self.pos)
                self.pos = target
            if message:
                self.bar.set_postfix_str(message[:40], refresh=True)
        return cb

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------------------------------
# Commands


def _opt(args, name, default=None):
    return getattr(args, name, default)


def _sampling(args) -> dict:
    """The sampling options given on the command line (the model's defaults for the others), and whether the
    requested volumes are calibrated."""
    return {**{k: _opt(args, k) for k in ("steps", "guidance", "samples")},
            "smoothing_mm": _opt(args, "smoothing"), "calibrate_volumes": not _opt(args, "no_volume_calibration", False)}


def _generator(args, timings: dict, conditions: dict | None = None, progress=None):
    """The model loaded (its time in ``timings["load_s"]``); with ``conditions``, their extrapolation warnings
    are printed through ``progress``."""
    t = time.perf_counter()
    from .generate import AtlasGenerator

    gen = AtlasGenerator(_opt(args, "model"), device=_opt(args, "device", "auto"))
    timings["load_s"] = time.perf_counter() - t
    for w in gen.spec.validate(conditions)[1] if conditions is not None else []:
        progress.write(f"warning: {w}")
    return gen


def cmd_generate(args, spec) -> int:
    from .outputs import atlas_paths, check_targets, write_atlas

    conditions, _, _ = collect_conditions(args, spec, range_ok=False)
    out = Path(args.output)
    paths = atlas_paths(out, args.prefix, jacobian=_opt(args, "jacobian", False))
    if args.no_preview:
        paths.pop("preview")
    check_targets(paths.values(), _opt(args, "overwrite", False))  # refuse before any work
    timings = {}
    progress = Progress(not _opt(args, "no_progress", False), "generate")
    try:
        gen = _generator(args, timings, conditions, progress)
        atlas = gen.generate(conditions, seed=_opt(args, "seed", 0), **_sampling(args),
                             jacobian=_opt(args, "jacobian", False), progress=progress.callback(0.0, 0.8))
        printed = set(gen.spec.validate(conditions)[1])  # by _generator
        for w in atlas.warnings:
            if w not in printed:  # the calibration's, the model's
                progress.write(f"warning: {w}")
        atlas.timings = {**timings, **atlas.timings}
        written = write_atlas(atlas, out, bundle=gen.bundle, requested=conditions, prefix=args.prefix,
                              overwrite=_opt(args, "overwrite", False), preview=not args.no_preview,
                              progress=progress.callback(0.8, 0.2))
    finally:
        progress.close()
    vols = ", ".join(f"{k} {v:.1f} ml" for k, v in atlas.label_volumes_ml.items())
    print(f"atlas written to {out}/ ({len(written)} files): folding ratio {atlas.folding_ratio:g} %; {vols}")
    print("timings: " + ", ".join(f"{k[:-2] if k.endswith('_s') else k} {v:.2f} s" for k, v in atlas.timings.items()))
    return 0


def cmd_trajectory(args, spec) -> int:
    from .conditions import ConditionError
    from .outputs import check_slice_index, check_targets, trajectory_paths, write_trajectory
    from .template import load_template

    fixed, name, values = collect_conditions(args, spec, range_ok=True)
    if name is None:
        raise ConditionError("A trajectory needs one condition given as a range START:STOP:STEP, e.g. "
                             f"--age 50:80:5. Valid: {spec.valid_names()}.")
    out = Path(args.output)
    paths = trajectory_paths(out, args.prefix)
    check_targets(paths.values(), _opt(args, "overwrite", False))
    if args.slice_index is not None:  # before minutes of generation, not after
        try:
            check_slice_index(load_template().grid, args.plane, args.slice_index)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    timings = {}
    progress = Progress(not _opt(args, "no_progress", False), f"trajectory ({len(values)} atlases)")
    try:
        gen = _generator(args, timings)
        warned = set()
        frames = []
        n = len(values)
        for idx, v in enumerate(values):
            atlas = gen.generate({**fixed, name: v}, seed=_opt(args, "seed", 0), **_sampling(args), jacobian=False,
                                 progress=progress.callback(0.85 * idx / n, 0.85 / n))
            for w in atlas.warnings:
                if w not in warned:
                    warned.add(w)
                    progress.write(f"warning: {w}")
            atlas.displacement_mm = None  # keep memory flat: only T1 and labels go into the series
            atlas.velocity = None
            frames.append(atlas)
        write_trajectory(frames, out, name, bundle=gen.bundle, requested={**fixed, name: values},
                         prefix=args.prefix, overwrite=_opt(args, "overwrite", False), plane=args.plane,
                         slice_index=args.slice_index, frame_ms=args.frame_ms,
                         progress=progress.callback(0.85, 0.15))
    finally:
        progress.close()
    print(f"trajectory of {len(frames)} atlases ({name} {values[0]:g} to {values[-1]:g}) written to {out}/")
    return 0


def cmd_compare(args, spec) -> int:
    from .io import read_image
    from .outputs import check_targets, comparison_paths, write_comparison

    try:
        from .compare import compare_subject
    except ImportError as exc:  # pragma: no cover - the module ships with the package
        raise UsageError(f"Subject comparison is not available in this installation ({exc}).") from None
    conditions, _, _ = collect_conditions(args, spec, range_ok=False)
    out = Path(args.output)
    paths = comparison_paths(out, args.prefix, with_labels=bool(args.labels))
    check_targets(paths.values(), _opt(args, "overwrite", False))
    try:
        subject, subject_grid = read_image(args.subject)
        labels = labels_grid = None
        if args.labels:
            labels, labels_grid = read_image(args.labels)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    timings = {}
    progress = Progress(not _opt(args, "no_progress", False), "compare")
    try:
        gen = _generator(args, timings, conditions, progress)
        try:
            result = compare_subject(gen, subject, subject_grid, conditions, subject_labels=labels,
                                     seed=_opt(args, "seed", 0), progress=progress.callback(0.0, 0.85),
                                     labels_grid=labels_grid, sampling=_sampling(args))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        result.timings = {**timings, **result.timings}
        write_comparison(result, out, bundle=gen.bundle, requested=conditions, prefix=args.prefix,
                         overwrite=_opt(args, "overwrite", False),
                         progress=progress.callback(0.85, 0.15))
    finally:
        progress.close()
    print(f"comparison written to {out}/: folding ratio {result.folding_ratio:g} %, "
          f"mean displacement {result.mean_displacement_mm:.2f} mm")
    for row in result.rows():
        extra = f", Dice {row['dice']:.3f}, HD95 {row['hd95_mm']:.2f} mm" if "dice" in row else ""
        print(f"  {row['name']:20s} atlas {row['atlas_ml']:8.1f} ml, subject {row['subject_ml']:8.1f} ml "
              f"({row['difference_percent']:+.1f} %){extra}")
    return 0


COMMANDS = {"generate": cmd_generate, "trajectory": cmd_trajectory, "compare": cmd_compare}


def _error(message: str) -> int:
    print(f"diffdef: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .bundle import BundleError
    from .conditions import ConditionError
    from .sampling import Cancelled

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model")
    model = pre.parse_known_args(argv)[0].model
    try:
        spec, spec_error = read_spec(model), None
    except BundleError as exc:
        spec, spec_error = None, str(exc)
    parser = build_parser(spec, spec_error)
    args, rest = parser.parse_known_args(argv)
    try:
        if spec is None:  # anything but --help needs the model
            return _error(spec_error)
        unknown, other = _unknown_flags(rest)
        if other:
            parser.error(f"unrecognized arguments: {' '.join(other)}")
        args.unknown_conditions = unknown
        return COMMANDS[args.command](args, spec)
    except (ConditionError, BundleError, FileExistsError, UsageError) as exc:
        return _error(str(exc))
    except (KeyboardInterrupt, Cancelled):
        print("\ndiffdef: interrupted; no output files were written.", file=sys.stderr)
        return EXIT_INTERRUPTED


def run() -> None:
    """Console entry point (``diffdef``, ``python -m diffdef.cli``): :func:`main`, then exit at once. Every output
    was closed and renamed into place before ``main`` returned; what the interpreter's own teardown would add is
    freeing torch's modules, 0.8-1.0 s of a 10 s ``diffdef generate`` on a 2-core CPU (``import torch`` alone: 0.9 s
    after its last ``atexit`` handler, 2026-11-29). An exception still ends the ordinary way, with its traceback."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
