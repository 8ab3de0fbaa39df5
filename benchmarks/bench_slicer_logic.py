"""Speed of the Slicer Logic on real MRML (slicer-core): Generate (sampling, warping and the MRML nodes: volume,
segmentation, grid transform) and Compare subject (affine + learned registration, metrics, nodes), as medians.

    OMP_NUM_THREADS=2 python benchmarks/bench_slicer_logic.py --bundle runs/tiny/bundle --repeats 3

Default bundle: the shipped model; ``--tiny`` trains the tiny bundle first (about 10 s) into a temporary folder.
The subject is a synthetic-cohort subject on the 2 mm grid with its labels (Dice / HD95 included).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "DiffDefSlicer"))
sys.path.insert(0, str(ROOT / "DiffDefSlicer" / "scripts"))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=None)
    parser.add_argument("--tiny", action="store_true", help="train and use the tiny bundle")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    import slicer
    import torch

    from DiffDefLib import mrml
    from DiffDefLib.logic import DiffDefSceneLogic
    from demo_scene import synthetic_subject
    from diffdef.template import LABELS

    bundle = args.bundle
    if args.tiny:
        from diffdef_training.config import load_config
        from diffdef_training.pipeline import run_pipeline

        out = Path(tempfile.mkdtemp(prefix="diffdef_tiny_"))
        run_pipeline(load_config(ROOT / "DiffDefTraining" / "configs" / "tiny.yaml", {"output": str(out)}), progress=False)
        bundle = out / "bundle"
    t1, labels, grid, conditions = synthetic_subject()
    scene = slicer.vtkMRMLScene()
    logic = DiffDefSceneLogic(scene)
    spec = logic.condition_spec(bundle, args.device)  # model loading is not timed
    conditions = {k: v for k, v in conditions.items() if k in spec.names}
    subject = mrml.add_volume(scene, t1, grid, "subject")
    seg = mrml.add_segmentation(scene, labels, grid, LABELS, "subject labels")
    gen_times, cmp_times, gen_cpu, cmp_cpu = [], [], [], []
    for r in range(args.repeats):
        t, c = time.perf_counter(), time.process_time()
        generated = logic.generate(conditions, bundle_path=bundle, device=args.device, seed=r)
        gen_times.append(time.perf_counter() - t)
        gen_cpu.append(time.process_time() - c)
        t, c = time.perf_counter(), time.process_time()
        logic.compare(subject, conditions, subject_segmentation=seg, bundle_path=bundle, device=args.device, seed=r,
                      atlas=generated)
        cmp_times.append(time.perf_counter() - t)
        cmp_cpu.append(time.process_time() - c)
    result = {"generate_median_s": statistics.median(gen_times), "compare_median_s": statistics.median(cmp_times),
              "generate_s": gen_times, "compare_s": cmp_times,
              "generate_cpu_median_s": statistics.median(gen_cpu), "compare_cpu_median_s": statistics.median(cmp_cpu)}
    print(f"bundle {bundle or 'shipped'}, device {args.device}, torch threads {torch.get_num_threads()}, "
          f"{args.repeats} repeats")
    print(f"Generate through the Logic (nodes included): median {result['generate_median_s']:.2f} s  "
          f"{[round(x, 2) for x in gen_times]}")
    print(f"Compare subject (affine + learned registration, Dice/HD95, nodes; atlas reused): median "
          f"{result['compare_median_s']:.2f} s  {[round(x, 2) for x in cmp_times]}")
    print(f"CPU time of this process (wall >> CPU means the machine is shared): generate median "
          f"{result['generate_cpu_median_s']:.2f} s, compare median {result['compare_cpu_median_s']:.2f} s")
    return result


if __name__ == "__main__":
    main()
