"""Build a Slicer scene with DiffDef, outside the application (``slicer-core`` wheel), and save it to a folder.

    python DiffDefSlicer/scripts/demo_scene.py -o out/demo_scene                  # shipped model, synthetic subject
    python DiffDefSlicer/scripts/demo_scene.py -o out/demo_scene --bundle runs/tiny/bundle
    python DiffDefSlicer/scripts/demo_scene.py -o out/demo_scene --subject t1.nii.gz --segmentation labels.nii.gz \
        --age 70 --ventricle-volume 35

Runs Generate (atlas volume, segmentation, grid transform) and Compare subject (transform, log-Jacobian map,
metrics table, subject in atlas space) through the module's Logic, then writes ``DiffDef.mrml`` and the data
(.nrrd, .seg.nrrd, .h5, .tsv) into the output folder: open ``DiffDef.mrml`` in 3D Slicer (File > Add Data or
drag and drop). Without ``--subject``, the subject is drawn from the project's synthetic cohort (2 mm grid) with
its labels as the segmentation, and compared at its own measured conditions.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # DiffDefLib and diffdef, as inside Slicer's module folder


def synthetic_subject(index: int = 3, seed: int = 0, factor: int = 2):
    """(T1 (i, j, k), labels, Grid, measured conditions) of a synthetic-cohort subject (needs diffdef_training)."""
    from diffdef_training.synthetic import _grid_of, default_law

    law = default_law()
    s = law.subject(seed, index, factor)
    return (s.image[0].numpy(), s.labels[0].numpy().astype("uint8"), _grid_of(law, factor),
            {k: float(v) for k, v in s.conditions.items()})


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", required=True, help="folder for DiffDef.mrml and its data")
    parser.add_argument("--bundle", default=None, help="model bundle folder (default: the shipped model)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--subject", help="subject T1 (NIfTI / NRRD); default: a synthetic-cohort subject")
    parser.add_argument("--segmentation", help="subject label map on the subject's grid (template label values)")
    parser.add_argument("--age", type=float)
    parser.add_argument("--ventricle-volume", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the bundle's)")
    args = parser.parse_args(argv)

    import slicer

    from DiffDefLib import mrml
    from DiffDefLib.logic import DiffDefSceneLogic
    from diffdef.template import LABELS

    def progress(fraction, message):
        print(f"\r  {100 * fraction:5.1f}%  {message[:60]:60s}", end="", flush=True)

    if args.subject:
        from diffdef.io import read_image

        t1, grid = read_image(args.subject)
        labels = None
        if args.segmentation:
            labels, label_grid = read_image(args.segmentation)
            grid.require_same(label_grid, "segmentation")
        conditions = {}
    else:
        t1, labels, grid, conditions = synthetic_subject(seed=args.seed)
        print(f"Synthetic subject, measured conditions {conditions}")
    for name, value in (("age", args.age), ("ventricle_volume", args.ventricle_volume)):
        if value is not None:
            conditions[name] = value

    scene = slicer.vtkMRMLScene()
    logic = DiffDefSceneLogic(scene)
    spec = logic.condition_spec(args.bundle, args.device)
    conditions = {k: v for k, v in conditions.items() if k in spec.names}
    subject = mrml.add_volume(scene, t1, grid, "subject T1")
    segmentation = (mrml.add_segmentation(scene, labels, grid, LABELS, "subject labels", reference_volume=subject)
                    if labels is not None else None)

    t = time.perf_counter()
    print(f"Generate {conditions}")
    generated = logic.generate(conditions, bundle_path=args.bundle, device=args.device, seed=args.seed,
                               steps=args.steps, progress=progress)
    print(f"\n  -> {generated.atlas_volume.GetName()}, {generated.segmentation.GetName()}, "
          f"{generated.transform.GetName()} ({time.perf_counter() - t:.1f} s)")
    for w in generated.warnings:
        print(f"  warning: {w}")
    t = time.perf_counter()
    print("Compare subject")
    compared = logic.compare(subject, conditions, subject_segmentation=segmentation, bundle_path=args.bundle,
                             device=args.device, seed=args.seed, atlas=generated, progress=progress)
    print(f"\n  -> {compared.transform.GetName()}, {compared.log_jacobian_volume.GetName()}, "
          f"{compared.table.GetName()} ({time.perf_counter() - t:.1f} s)")
    for row in mrml.table_rows(compared.table):
        print(f"     {row['Metric']:40s} {row['Segment']:20s} {row['Value']:10.4g} {row['Unit']}")
    path = mrml.save_scene(scene, args.output)
    print(f"Saved {path} with {len(list(Path(args.output).iterdir())) - 1} data files; open it in 3D Slicer.")
    return Path(path)


if __name__ == "__main__":
    main()
