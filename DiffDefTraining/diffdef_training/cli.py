"""``diffdef-train``: train DiffDef on a cohort and export a model bundle.

Examples:
  diffdef-train pipeline --config DiffDefTraining/configs/shipped.yaml          # all stages, then export
  diffdef-train pipeline --config my.yaml --resume                             # continue after an interruption
  torchrun --nproc_per_node 4 -m diffdef_training.cli pipeline --config my.yaml  # 4 GPUs (DDP)
  diffdef-train plot runs/shipped                                              # loss curves -> PNG
  diffdef-train held-volumes runs/old/bundle --config my.yaml   # add the cohort's tissue fit to an older bundle
  diffdef-train unpack DiffDefSlicer/Resources/Models/default --config DiffDefTraining/configs/shipped.yaml \
      --output runs/mine   # the shipped model's upstream stages, then: pipeline ... --stages decoder
  diffdef-train conditional-template DiffDefSlicer/Resources/Models/default --output models/ct --run runs/ct
      # the evaluation's VoxelMorph-style conditional template network, on the bundle's cohort
  diffdef-train preprocess cohort.csv --conditions age,ventricle_volume --cache cache/
  diffdef-train synthesize synth/ --subjects 100 --factor 2 --random-affine  # synthetic cohort -> NIfTI + manifest
  diffdef-train cohort-stats --subjects 500                                    # check the synthetic law
  diffdef-train cohort-figure docs/synthetic_cohort.png                        # subjects across the age range
"""
from __future__ import annotations

import argparse
import os
import sys


def _pipeline(a):
    from .config import load_config, parse_setting
    from .pipeline import STAGES, run_pipeline

    cfg = load_config(a.config, {"output": a.output} if a.output else {}, [parse_setting(s) for s in a.set])
    only = tuple(s.strip() for s in a.stages.split(",") if s.strip()) if a.stages else STAGES
    bad = [s for s in only if s not in STAGES]
    if bad or not only:
        raise SystemExit(f"Unknown stage {(bad or [a.stages])[0]!r}; stages: {', '.join(STAGES)}.")
    import torch.distributed as dist

    try:
        path = run_pipeline(cfg, resume=a.resume, progress=not a.no_progress, only=only)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if path:
        print(f"bundle written to {path}")
    elif "decoder" not in only and int(os.environ.get("RANK", "0")) == 0:
        print(f"stages {', '.join(only)} done in {cfg.output} (no bundle: the decoder was not among them)")


def _unpack(a):
    from .config import load_config, parse_setting
    from .pipeline import UNPACKABLE, unpack_bundle

    cfg = load_config(a.config, {"output": a.output} if a.output else {}, [parse_setting(s) for s in a.set])
    names = tuple(s.strip() for s in a.stages.split(",") if s.strip()) if a.stages else UNPACKABLE
    for d in unpack_bundle(a.bundle, cfg, names):
        print(f"{d.name}: written to {d} (current for this config)")
    print(f"next: diffdef-train pipeline --config {a.config or '<config>'} --output {cfg.output} --stages decoder")


def _held_volumes(a):
    from .config import load_config
    from .held_volumes import write_into_bundle

    model = write_into_bundle(a.bundle, load_config(a.config), progress=not a.no_progress)
    print(f"held_volumes ({len(model['fits'])} fits of labels {model['labels']}) written into {a.bundle}/model.json")


def _share_weights(a):
    from diffdef.bundle import share_weights

    names = share_weights(a.bundle, a.base)
    print(f"{a.bundle} now reads {', '.join(names) if names else 'no network'} from {a.base}")


def _conditional_template(a):
    from .conditional_template import run

    path = run(a.base, a.output, a.run, steps=a.steps, batch_size=a.batch_size, resume=a.resume,
               progress=not a.no_progress, device=a.device, threads=a.threads)
    print(f"conditional template bundle written to {path}")


def _plot(a):
    from .plots import plot_run

    for f in plot_run(a.run, a.output):
        print(f)


def _evaluate(a):
    from .evaluate import run_from_args

    run_from_args(a, "diffdef-train evaluate " + " ".join(sys.argv[2:]))


def _preprocess(a, rest):
    from .cohort import preprocess_main

    return preprocess_main(rest)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="diffdef-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("pipeline", help="run the training stages in order and export a bundle")
    s.add_argument("--config", help="YAML or JSON config (defaults when omitted)")
    s.add_argument("--output", help="run folder (overrides the config's output)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value (dotted key, YAML value; repeatable), e.g. --set decoder.mp_weight=3 "
                        "--set device=cuda")
    s.add_argument("--resume", action="store_true", help="continue interrupted stages from their checkpoints")
    s.add_argument("--stages", help="comma-separated subset of stages to train (others must be current)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    s.set_defaults(fn=_pipeline)
    s = sub.add_parser("unpack", help="write a bundle's autoencoder, diffusion and registration networks into a run "
                       "folder as finished stages, to train a decoder on them (--stages decoder)")
    s.add_argument("bundle", help="model bundle folder (holds model.json), e.g. DiffDefSlicer/Resources/Models/default")
    s.add_argument("--config", help="the config the run will use; the bundle's recorded settings must agree with it "
                   "for every unpacked stage (defaults when omitted)")
    s.add_argument("--output", help="run folder (overrides the config's output); existing stage folders are refused")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, as for pipeline")
    s.add_argument("--stages", help="comma-separated subset of autoencoder,diffusion,registration (default: all three)")
    s.set_defaults(fn=_unpack)
    s = sub.add_parser("held-volumes", help="fit the training cohort's held volumes (brain tissue) by condition and "
                       "write the fit into a bundle exported without one (model.json's held_volumes)")
    s.add_argument("bundle", help="model bundle folder (holds model.json)")
    s.add_argument("--config", required=True, help="the config the bundle was trained with (its cohort is rebuilt)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(fn=_held_volumes)
    s = sub.add_parser("share-weights", help="make a bundle read the weight files it has in common with another "
                       "bundle from there (relative paths in model.json, SHA-256 checked) and delete its copies",
                       epilog="example: diffdef-train share-weights DiffDefTraining/models/default-no-mp "
                       "--base DiffDefSlicer/Resources/Models/default")
    s.add_argument("bundle", help="the bundle folder whose copies are replaced (e.g. a decoder retrained on --base's "
                   "upstream stages)")
    s.add_argument("--base", required=True, help="the bundle folder that keeps its files")
    s.set_defaults(fn=_share_weights)
    s = sub.add_parser("conditional-template", help="train the evaluation's conditional template network "
                       "(VoxelMorph-style: conditions alone -> deformation of the template, no diffusion) on a "
                       "bundle's cohort and write it as a bundle that shares the base's other networks",
                       epilog="example: diffdef-train conditional-template DiffDefSlicer/Resources/Models/default "
                       "--output DiffDefTraining/models/conditional-template --run runs/conditional-template")
    s.add_argument("base", help="the DiffDef bundle folder whose cohort (rebuilt from its recorded configuration), "
                   "registration network and autoencoder are used")
    s.add_argument("--output", required=True, help="new bundle folder (must not exist or be empty); keep it beside "
                   "or below a fixed path relative to BASE, which it reads the shared networks from")
    s.add_argument("--run", required=True, help="folder for checkpoints and log.csv (resumable)")
    s.add_argument("--steps", type=int, default=1200, help="training steps (default 1200)")
    s.add_argument("--batch-size", type=int, default=2, help="subjects per step (default 2)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint in --run")
    s.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to train (default auto)")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the base's configuration)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    s.set_defaults(fn=_conditional_template)
    s = sub.add_parser("plot", help="plot a run's loss curves (log.csv of each stage) to PNG")
    s.add_argument("run", help="run folder (the config's output)")
    s.add_argument("--output", help="PNG folder (default: the run folder)")
    s.set_defaults(fn=_plot)
    s = sub.add_parser("evaluate", help="benchmark a bundle against the synthetic ground truth and baselines "
                       "(Markdown table, JSON, figures; see --help)", add_help=argv[:1] == ["evaluate"])
    if argv[:1] == ["evaluate"]:  # torch is imported only when evaluating
        from .evaluate import add_arguments

        add_arguments(s)
    s.set_defaults(fn=_evaluate)
    sub.add_parser("preprocess", help="validate and preprocess a real cohort manifest (see --help)", add_help=False)
    synthetic = {"synthesize": "export", "cohort-stats": "stats", "cohort-figure": "figure"}
    sub.add_parser("synthesize", help="export a synthetic cohort: NIfTI images, label maps, manifest (see --help)",
                   add_help=False)
    sub.add_parser("cohort-stats", help="check the synthetic law on N subjects (see --help)", add_help=False)
    sub.add_parser("cohort-figure", help="PNG of synthetic subjects across the age range (see --help)", add_help=False)
    if argv and argv[0] == "preprocess":
        return _preprocess(None, argv[1:])
    if argv and argv[0] in synthetic:
        from .synthetic import main as synthetic_main

        return synthetic_main([synthetic[argv[0]]] + list(argv[1:]))
    a = p.parse_args(argv)
    try:
        return a.fn(a)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    sys.exit(main())
