"""Evaluation benchmark: DiffDef against baselines and the synthetic law's ground truth.

    python -m diffdef_training.evaluate --model DiffDefSlicer/Resources/Models/default \\
        --ablation DiffDefTraining/models/default-no-mp \\
        --conditional-template DiffDefTraining/models/conditional-template --out docs/
    diffdef-train evaluate --model DIR --out docs/            # the same through the training CLI

For each condition of a grid (an age sweep with the ventricle volume at the law's median m(a), and a ventricle
sweep at one age; ages and volumes beyond the training range included), every method makes an atlas on the
1 mm template grid, compared with the law's true atlas (``SyntheticLaw.true_atlas``):

* methods: ``DiffDef`` (the model bundle, as ``diffdef generate`` runs it), ``DiffDef, no volume calibration``
  (the same atlases with the decoder's own volumes, :mod:`diffdef.calibration` off), ``DiffDef, no MP loss``
  (``--ablation``), ``MNI template``
  (identity), ``conventional`` (Gaussian-weighted neighbourhood of training subjects averaged by groupwise
  SimpleITK demons registration on the model's working grid, see :mod:`diffdef_training.baselines`),
  ``conventional, 1 mm`` (the same neighbourhood and settings on the 1 mm grid DiffDef's atlases are on, on
  ``--conventional-1mm-conditions`` conditions: the cost of a conventional atlas at DiffDef's resolution),
  ``intensity generation`` (the
  autoencoder's image decoder on the same diffusion latents), ``conditional template network``
  (``--conditional-template``: a VoxelMorph-style network from the conditions alone, trained per subject, see
  :mod:`diffdef_training.conditional_template`; generated as DiffDef's atlases are, with the volume calibration;
  deterministic, so the first seed only), plus the ``true atlas`` as a reference row;
* metrics: Dice and HD95 (mm) per label (nearest-neighbour labels, 1 mm, the template's crop around the brain);
  ventricle volume against the one requested and tissue (GM + WM) volume against the law's B(a), in ml and %;
  centrality (mm): the norm of the mean displacement from the atlas to the N held-out synthetic subjects (indices
  after the training cohort) nearest to the condition in the bundle's normalised condition space (the Gaussian
  neighbourhood's N heaviest members), registered by the bundle's registration network on the working grid,
  averaged over the template's brain; folding ratio (% voxels with det J <= 0, whole 1 mm grid) and smoothness
  (mean |grad det J|, 1/mm, brain) of the atlas' deformation where the method has one; NCC and SSIM against the
  true atlas image, both multiplied by the true brain mask (so that skull-stripped baselines are not judged on
  the scalp), 1 mm, on the true brain's bounding box (+3 voxels); wall time per atlas (DiffDef: the
  ``AtlasGenerator.generate`` call as the CLI makes it, without the Jacobian map the metrics need).

Writes ``evaluation.md`` (summary per method, the issue's targets for the main model, the MP-loss ablation and
per-condition detail), ``evaluation.json`` (every number) and figures ``evaluation_atlases.png`` and
``evaluation_volumes.png`` into ``--out``; prints the ablation comparison and the run time.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffdef import fields, metrics
from diffdef.geometry import displacement_from_mm
from diffdef.io import atomic_path
from diffdef.template import CROP_SIZE, CROP_START, GM, LABEL_NAMES, VENTRICLES, WM, bounding_box

from . import baselines

CONVENTIONAL_1MM = "conventional, 1 mm"
CONDITIONAL_TEMPLATE = "conditional template network"
UNCALIBRATED = "DiffDef, no volume calibration"
METHODS = ("DiffDef", UNCALIBRATED, "DiffDef, no MP loss", "MNI template", "conventional", CONVENTIONAL_1MM,
           "intensity generation", CONDITIONAL_TEMPLATE)
REFERENCE = "true atlas"
LABEL_KEYS = {1: "CSF", 2: "GM", 3: "WM", 4: "LV"}
DEFAULT_AGES = (40.0, 50.0, 60.0, 70.0, 80.0, 90.0)
DEFAULT_VOLUMES = (10.0, 20.0, 40.0, 60.0)
VOLUME_SWEEP_AGE = 65.0


# ------------------------------------------------------------------------------------------------- settings
@dataclass
class EvalSettings:
    model: str | None = None  # bundle folder (None: the shipped default)
    ablation: str | None = None  # bundle folder of the decoder trained without the MP loss
    conditional_template: str | None = None  # bundle folder of diffdef-train conditional-template
    out: str = "docs"
    ages: tuple = DEFAULT_AGES
    volumes: tuple = DEFAULT_VOLUMES
    extrapolated_volume: float | None = None  # None: 1.15 x the training maximum (capped by the law), 0: none
    volume_sweep_age: float = VOLUME_SWEEP_AGE
    conditions: list | None = None  # explicit [(age, volume), ...] instead of the two sweeps
    seeds: tuple = (0, 1)
    intensity_seeds: int = 1  # seeds of the intensity baseline (the first ones of ``seeds``)
    methods: tuple = METHODS
    conventional_conditions: int = 4  # evenly spaced conditions on which the (slow) conventional template runs
    conventional_iterations: int = 2
    conventional_demons_iterations: int = 25
    conventional_neighbours: int = 0  # 0: the bundle's N
    conventional_factor: int = 0  # 0: the bundle's working-grid factor
    conventional_1mm_conditions: int = 1  # of those, the first in-range ones on which it is also built at 1 mm
    neighbours: int = 0  # held-out neighbourhood size for centrality, 0: the bundle's N
    threads: int = 2
    figures: bool = True
    progress: bool = True
    command: str = ""


# ------------------------------------------------------------------------------------------- small helpers
_CROP = tuple(slice(s, s + n) for s, n in zip(CROP_START, CROP_SIZE))


def _finite(x):
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def _mean(values):
    v = [x for x in values if _finite(x)]
    return float(np.mean(v)) if v else None


def _in_range(spec, values: dict) -> bool:
    return all(c.low <= values[c.name] <= c.high for c in spec.conditions if values.get(c.name) is not None)


# ------------------------------------------------------------------------------------------------- context
class Context:
    """Everything shared by the methods: template, law, main bundle, held-out subjects, training pool."""

    def __init__(self, s: EvalSettings):
        from diffdef.bundle import load_bundle
        from diffdef.generate import AtlasGenerator

        from .synthetic import SyntheticCohort, default_law

        self.settings = s
        self.bundle = load_bundle(s.model)
        prov = self.bundle.meta["provenance"]
        if prov.get("cohort") != "synthetic":
            raise ValueError(f"The evaluation needs a model trained on the synthetic cohort (its law is the ground "
                             f"truth); {self.bundle.path} was trained on {prov.get('cohort')!r}.")
        self.generator = AtlasGenerator(self.bundle, device="cpu")
        self.template = self.generator.template
        self.spec = self.bundle.spec
        self.law = default_law()
        cfg = prov.get("config", {})
        self.cohort_seed = int(prov.get("cohort_seed", 0))
        self.cohort_size = int(prov["cohort_size"])
        self.held_out = int(cfg.get("cohort", {}).get("held_out", 60))
        self.factor = int(self.bundle.meta["working_grid"]["factor"])
        self.work_grid = self.bundle.working_grid
        self.sigma = float(prov.get("sigma", 0.3))
        self.n_neighbours = int(s.neighbours or prov.get("neighbours", 10))
        _, frac = self.template.on_working_grid(self.factor)
        self.brain_work = frac[:, 1:].sum(1, keepdim=True) > 0.5  # as the decoder's objective
        # smoothness is averaged over the template's brain: its bounding box (+2 voxels) gives the same gradients
        self.brain_box, lo, size = _box(self.template.labels > 0, 2)
        self.brain_box_mask = self.template.labels[self.brain_box] > 0
        self.brain_box_grid = self.template.grid.crop(lo, size)
        self.figure_slice = int(np.round(np.argwhere(self.template.labels == VENTRICLES)[:, 2].mean()))
        held = SyntheticCohort(self.held_out, self.cohort_seed, self.factor, offset=self.cohort_size, law=self.law)
        items = [held[i] for i in range(len(held))]
        self.held_images = torch.stack([it["image"] for it in items]).float()
        self.held_raw = torch.stack([it["conditions"] for it in items]).float()
        self.held_norm = self.spec.normalise_tensor(self.held_raw)
        self.held_indices = [it["index"] for it in items]
        self._pools = {}

    # -- neighbourhoods ----------------------------------------------------------------------------------------
    def normalised(self, values: dict) -> torch.Tensor:
        return self.spec.normalise(values)[0]

    def heldout_neighbours(self, values: dict) -> torch.Tensor:
        """Indices (into the held-out set) of the N members with the largest Gaussian weights."""
        from .stages import neighbourhood_weights

        w = neighbourhood_weights(self.normalised(values), self.held_norm, self.sigma)
        return torch.argsort(w, descending=True, stable=True)[: min(self.n_neighbours, len(w))]

    def pool(self, factor: int) -> "TrainingPool":
        if factor not in self._pools:
            self._pools[factor] = TrainingPool(self.law, self.cohort_seed, self.cohort_size, factor)
        return self._pools[factor]

    # -- metrics -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def centrality(self, t1: np.ndarray, values: dict) -> float:
        """Norm of the mean displacement (mm) from the atlas to its held-out neighbourhood, brain average."""
        reg = self.bundle.nets["registration"]
        atlas = baselines.block_average(torch.from_numpy(np.ascontiguousarray(t1))[None, None], self.template, self.factor)
        nb = self.held_images[self.heldout_neighbours(values)]
        velocity = reg(atlas.expand(len(nb), -1, -1, -1, -1), nb)
        disp = fields.integrate_velocity(velocity, int(self.bundle.meta["sampling"].get("integration_steps", 7)))
        return metrics.centrality(disp, grid=self.work_grid, mask=self.brain_work[0, 0])

    def score(self, t1: np.ndarray, labels: np.ndarray, values: dict, truth: dict, det: torch.Tensor | None,
              with_overlap: bool = True) -> dict:
        """All metrics of one atlas (1 mm arrays) against the condition's true atlas."""
        out = {}
        vol = self.template.label_volumes_ml(labels)
        out["ventricle_ml"] = vol["lateral ventricles"]
        out["ventricle_err_pct"] = 100.0 * (vol["lateral ventricles"] - values["ventricle_volume"]) / values["ventricle_volume"]
        tissue = vol["gray matter"] + vol["white matter"]
        out["tissue_ml"] = tissue
        out["tissue_err_pct"] = 100.0 * (tissue - truth["B"]) / truth["B"]
        out["centrality_mm"] = self.centrality(t1, values)
        if isinstance(det, str) and det == "identity":  # det J = 1 everywhere
            out["folding_pct"], out["smoothness_per_mm"] = 0.0, 0.0
        elif det is not None:
            out["folding_pct"] = metrics.folding_ratio(det)
            out["smoothness_per_mm"] = metrics.smoothness(det[(..., *self.brain_box)], mask=self.brain_box_mask,
                                                          grid=self.brain_box_grid)
        else:
            out["folding_pct"] = out["smoothness_per_mm"] = None
        if with_overlap:
            lab, ref = labels[_CROP], truth["labels"]
            present = [v for v in LABEL_KEYS if (lab == v).any() or (ref == v).any()]
            d = metrics.dice(lab, ref, labels=list(LABEL_KEYS))
            out["dice"] = {LABEL_KEYS[v]: d[v] for v in LABEL_KEYS}
            out["hd95_mm"] = {LABEL_KEYS[v]: _hd95_boxed(lab, ref, v) if v in present else None for v in LABEL_KEYS}
            box = truth["box"]
            img = torch.from_numpy(np.ascontiguousarray(t1[box])) * truth["mask"]
            out["ncc"] = metrics.ncc(img, truth["image_masked"], mask=truth["mask"])
            out["ssim"] = metrics.ssim(img, truth["image_masked"], data_range=1.0)
        return out


def _box(mask: np.ndarray, margin: int) -> tuple[tuple, np.ndarray, np.ndarray]:
    """(slices, start, size) of ``mask``'s bounding box grown by ``margin`` voxels, clipped to the array."""
    lo, hi = bounding_box(mask, margin)
    return tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi)), lo, hi + 1 - lo


def _hd95_boxed(pred: np.ndarray, ref: np.ndarray, value: int) -> float:
    """metrics.hd95 of one label on the bounding box of both masks (+2 voxels): the same distances, faster."""
    sl = _box((pred == value) | (ref == value), 2)[0]
    return metrics.hd95(pred[sl] == value, ref[sl] == value, spacing=1.0, labels=[1])[1]


class TrainingPool:
    """Subjects of the synthetic training cohort (indices 0..size-1) on one working grid, generated on demand.

    Neighbourhoods are ranked by the *measured* conditions the model was trained on; to avoid synthesising the
    whole cohort, candidates are the 4N subjects nearest by the conditions the law drew (cheap), which the
    measured ones differ from only by the individual variation."""

    def __init__(self, law, seed: int, size: int, factor: int):
        self.law, self.seed, self.size, self.factor = law, seed, size, factor
        drawn = []
        for i in range(size):
            rng = np.random.default_rng([seed, i])
            rng.integers(2**62)  # as SyntheticLaw.subject: the torch seed is drawn first
            drawn.append(law.draw_conditions(rng))
        self.drawn = torch.tensor(drawn, dtype=torch.float32)
        self._subjects = {}

    def subject(self, i: int):
        if i not in self._subjects:
            s = self.law.subject(self.seed, i, self.factor)
            if abs(s.conditions["age"] - float(self.drawn[i, 0])) > 1e-3:
                raise RuntimeError("The synthetic law no longer draws conditions as TrainingPool assumes; update it.")
            self._subjects[i] = s
        return self._subjects[i]

    def neighbourhood(self, spec, values: dict, n: int, sigma: float) -> tuple[list[int], torch.Tensor]:
        from .stages import neighbourhood_weights

        cond = spec.normalise(values)[0]
        w_drawn = neighbourhood_weights(cond, spec.normalise_tensor(self.drawn), sigma)
        candidates = torch.argsort(w_drawn, descending=True, stable=True)[: min(4 * n, self.size)].tolist()
        measured = torch.tensor([[self.subject(i).conditions["age"], self.subject(i).conditions["ventricle_volume"]]
                                 for i in candidates], dtype=torch.float32)
        w = neighbourhood_weights(cond, spec.normalise_tensor(measured), sigma)
        order = torch.argsort(w, descending=True, stable=True)[:n]
        return [candidates[int(k)] for k in order], w[order]


# ------------------------------------------------------------------------------------------------- the grid
def condition_grid(s: EvalSettings, spec, law) -> list[dict]:
    """[{age, ventricle_volume, sweep, in_range}] for the settings."""
    from .synthetic import VENTRICLE_RANGE, median_ventricle_volume

    if s.conditions:
        items = [(float(a), float(v), "given") for a, v in s.conditions]
    else:
        items = [(float(a), round(float(median_ventricle_volume(a)), 1), "age") for a in s.ages]
        volumes = list(s.volumes)
        high = next((c.high for c in spec.conditions if c.name == "ventricle_volume"), None)
        extra = s.extrapolated_volume
        if extra is None and high is not None:
            extra = round(min(1.15 * high, float(law._vent_table.max()) * 0.98, VENTRICLE_RANGE[1]), 0)
            extra = extra if extra > high else 0
        if extra:
            volumes.append(float(extra))
        items += [(float(s.volume_sweep_age), float(v), "ventricle") for v in volumes]
    out = []
    for a, v, sweep in items:
        values = {"age": a, "ventricle_volume": v}
        out.append({"age": a, "ventricle_volume": v, "sweep": sweep, "in_range": _in_range(spec, values)})
    return out


def _truth(ctx: Context, values: dict) -> dict:
    t = ctx.law.true_atlas(values["age"], values["ventricle_volume"])
    labels = t["labels"][0, 0].numpy().astype(np.uint8)
    image = t["image"][0, 0]
    box = _box(labels > 0, 3)[0]  # NCC / SSIM: the true brain's bounding box
    mask = torch.from_numpy(labels[box] > 0)
    det = fields.jacobian_determinant(t["displacement"])
    return {"labels": labels[_CROP], "labels_full": labels, "t1": image.numpy(), "mask": mask, "box": box,
            "image_masked": image[box] * mask, "det": det, "B": float(ctx.law.tissue_volume(values["age"]))}


def _pick_evenly(n_total: int, k: int) -> list[int]:
    if k <= 0:
        return []
    if k >= n_total:
        return list(range(n_total))
    return sorted({int(round(x)) for x in np.linspace(0, n_total - 1, k)})


# ----------------------------------------------------------------------------------------------- evaluation
def run_evaluation(s: EvalSettings) -> dict:
    """Run the benchmark; returns the result dictionary (also what evaluation.json holds)."""
    import SimpleITK as sitk
    from tqdm import tqdm

    t_start = time.perf_counter()
    if s.threads:
        torch.set_num_threads(int(s.threads))
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(s.threads))
    unknown = [m for m in s.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"Unknown method {unknown[0]!r}; methods: {', '.join(METHODS)}.")
    methods = [m for m in s.methods if (m != "DiffDef, no MP loss" or s.ablation)
               and (m != CONDITIONAL_TEMPLATE or s.conditional_template)]
    ctx = Context(s)
    from diffdef.bundle import load_bundle
    from diffdef.generate import AtlasGenerator

    ablation = conditional = None
    if "DiffDef, no MP loss" in methods:
        ab = load_bundle(s.ablation)
        if ab.meta["provenance"].get("morphology_preservation_loss", False):
            print(f"warning: the ablation bundle {s.ablation} says it was trained WITH the MP loss.", file=sys.stderr)
        ablation = AtlasGenerator(ab, device="cpu")
    if CONDITIONAL_TEMPLATE in methods:
        ct = load_bundle(s.conditional_template)
        if ct.uses_latents:
            raise ValueError(f"{s.conditional_template} decodes diffusion latents: it is not a conditional template "
                             "network. Give the bundle written by diffdef-train conditional-template.")
        conditional = AtlasGenerator(ct, device="cpu")
    grid = condition_grid(s, ctx.spec, ctx.law)
    conv_idx = set(_pick_evenly(len(grid), s.conventional_conditions)) if "conventional" in methods else set()
    conv_factor = int(s.conventional_factor or ctx.factor)
    # the 1 mm template (minutes each) on the first in-range conditions of the coarse one's, so both can be compared
    shared = sorted(i for i in (conv_idx or range(len(grid))) if grid[i]["in_range"]) or sorted(conv_idx)
    conv1_idx = set(shared[: max(s.conventional_1mm_conditions, 0)]) if CONVENTIONAL_1MM in methods else set()
    conv_n = int(s.conventional_neighbours or ctx.n_neighbours)
    seeds = [int(x) for x in s.seeds]
    rows, examples = [], {}
    total = sum(1 + len(seeds) * (("DiffDef" in methods) + (UNCALIBRATED in methods) + (ablation is not None))
                + (conditional is not None)
                + ("MNI template" in methods) + (n in conv_idx) + (n in conv1_idx)
                + ("intensity generation" in methods) * min(s.intensity_seeds, len(seeds)) for n in range(len(grid)))
    bar = tqdm(total=total, desc="evaluation", disable=not s.progress, file=sys.stderr)

    def add(method, cond, seed, score, seconds, details=None, t1=None, labels=None):
        row = {"method": method, "age": cond["age"], "ventricle_volume": cond["ventricle_volume"],
               "sweep": cond["sweep"], "in_range": cond["in_range"], "seed": seed, "seconds": seconds, **score}
        if details:
            row["details"] = details
        rows.append(row)
        if t1 is not None and (seed in (None, seeds[0])):  # the figure's slice only (memory)
            examples[(method, cond["age"], cond["ventricle_volume"])] = (np.array(t1[:, :, ctx.figure_slice]),
                                                                         np.array(labels[:, :, ctx.figure_slice]))
        bar.update(1)

    for n, cond in enumerate(grid):
        values = {"age": cond["age"], "ventricle_volume": cond["ventricle_volume"]}
        bar.set_postfix_str(f"age {cond['age']:g}, V {cond['ventricle_volume']:g} ml")
        truth = _truth(ctx, values)
        add(REFERENCE, cond, None, ctx.score(truth["t1"], truth["labels_full"], values, truth, truth["det"],
                                             with_overlap=False), 0.0, t1=truth["t1"], labels=truth["labels_full"])
        for method, gen, calibrate, its_seeds in (
                ("DiffDef", ctx.generator if "DiffDef" in methods else None, True, seeds),
                (UNCALIBRATED, ctx.generator if UNCALIBRATED in methods else None, False, seeds),
                ("DiffDef, no MP loss", ablation, True, seeds),
                (CONDITIONAL_TEMPLATE, conditional, True, seeds[:1])):  # deterministic: one atlas per condition
            if gen is None:
                continue
            for seed in its_seeds:
                t = time.perf_counter()
                # timed as a user runs it: no Jacobian map
                atlas = gen.generate(values, seed=seed, calibrate_volumes=calibrate)
                seconds = time.perf_counter() - t
                disp_mm = torch.from_numpy(atlas.displacement_mm).permute(3, 0, 1, 2)[None]
                det = fields.jacobian_determinant(displacement_from_mm(disp_mm, atlas.grid))
                add(method, cond, seed, ctx.score(atlas.t1, atlas.labels, values, truth, det), seconds,
                    t1=atlas.t1, labels=atlas.labels)
        if "MNI template" in methods:
            a = baselines.identity_atlas(ctx.template)
            add("MNI template", cond, None, ctx.score(a.t1, a.labels, values, truth, "identity"), a.seconds,
                t1=a.t1, labels=a.labels)
        for method, factor, chosen in (("conventional", conv_factor, conv_idx), (CONVENTIONAL_1MM, 1, conv1_idx)):
            if n not in chosen:
                continue
            # the neighbourhood is ranked on the model's working grid (the conditions it was trained on); the
            # 1 mm template is built from the same subjects synthesised at 1 mm
            idx, w = ctx.pool(ctx.factor).neighbourhood(ctx.spec, values, conv_n, ctx.sigma)
            pool = ctx.pool(factor)
            images = torch.stack([pool.subject(i).image for i in idx]).float()
            fracs = torch.stack([pool.subject(i).fractions for i in idx]).float()
            a = baselines.conventional_atlas(ctx.template, images, fracs, w, ctx.template.working_grid(factor).grid,
                                             s.conventional_iterations, s.conventional_demons_iterations)
            del images, fracs
            a.details["subjects"] = idx
            add(method, cond, None, ctx.score(a.t1, a.labels, values, truth, None), a.seconds, a.details,
                t1=a.t1, labels=a.labels)
        if "intensity generation" in methods:
            for seed in seeds[: s.intensity_seeds]:
                a = baselines.intensity_atlas(ctx.bundle, ctx.template, ctx.normalised(values)[None], seed)
                add("intensity generation", cond, seed, ctx.score(a.t1, a.labels, values, truth, None), a.seconds,
                    a.details, t1=a.t1, labels=a.labels)
    bar.close()
    result = {
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()},
        "model": {"path": str(ctx.bundle.path), "working_grid_mm": float(ctx.work_grid.spacing[0]),
                  "conditions": ctx.spec.to_list(), "provenance": {k: v for k, v in ctx.bundle.meta["provenance"].items()
                                                                   if k not in ("config", "final_losses")}},
        "ablation_model": str(s.ablation) if ablation is not None else None,
        "conditional_template_model": str(s.conditional_template) if conditional is not None else None,
        "neighbourhood": {"held_out_subjects": ctx.held_indices[:1] + ctx.held_indices[-1:], "n": ctx.n_neighbours,
                          "sigma": ctx.sigma, "conventional_n": conv_n, "conventional_grid_mm": float(ctx.template.working_grid(conv_factor).grid.spacing[0])},
        "conditions": grid,
        "rows": rows,
    }
    result["summary"] = summarise(rows)
    result["targets"] = targets(rows)
    result["ablation"] = ablation_comparison(rows) if ablation is not None else None
    import os

    from .pipeline import cpu_name

    result["machine"] = f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    result["seconds_total"] = time.perf_counter() - t_start
    result["figure_slice"] = ctx.figure_slice
    result["_examples"] = examples
    return result


# ------------------------------------------------------------------------------------------------ summaries
SCALARS = ("ventricle_err_pct", "tissue_err_pct", "centrality_mm", "folding_pct", "smoothness_per_mm", "ncc", "ssim",
           "seconds")


def _flat(row: dict) -> dict:
    out = {k: row.get(k) for k in SCALARS}
    for k in ("dice", "hd95_mm"):
        for lab, v in (row.get(k) or {}).items():
            out[f"{k}_{lab}"] = v
    out["abs_ventricle_err_pct"] = abs(row["ventricle_err_pct"])
    out["abs_tissue_err_pct"] = abs(row["tissue_err_pct"])
    return out


def summarise(rows: list[dict]) -> dict:
    """Per method: means over its rows (conditions x seeds), all and within the training range."""
    out = {}
    for method in (*METHODS, REFERENCE):
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        entry = {}
        for subset, sel in (("all", mine), ("in_range", [r for r in mine if r["in_range"]])):
            flats = [_flat(r) for r in sel]
            keys = sorted({k for f in flats for k in f})
            entry[subset] = {k: _mean([f.get(k) for f in flats]) for k in keys}
            entry[subset]["n"] = len(sel)
        entry["conditions"] = len({(r["age"], r["ventricle_volume"]) for r in mine})
        out[method] = entry
    return out


def _by_condition(rows, method, key):
    d = {}
    for r in rows:
        if r["method"] == method and _finite(r.get(key)):
            d.setdefault((r["age"], r["ventricle_volume"]), []).append(r[key])
    return {c: float(np.mean(v)) for c, v in d.items()}


def targets(rows: list[dict], method: str = "DiffDef") -> list[dict]:
    """The issue's must-show numbers for ``method``: value, target, pass/fail."""
    mine = [r for r in rows if r["method"] == method]
    if not mine:
        return []
    out = []

    def add(name, value, target, ok, note=""):
        out.append({"target": name, "value": value, "goal": target, "met": bool(ok) if ok is not None else None, "note": note})

    fold = max(r["folding_pct"] for r in mine)
    add("folding ratio, every condition", fold, "0 %", fold == 0.0, f"max over {len(mine)} atlases")
    vent = [r for r in mine if 10 <= r["ventricle_volume"] <= 60]
    if vent:
        worst = max(abs(r["ventricle_err_pct"]) for r in vent)
        own = [abs(r["ventricle_err_pct"]) for r in rows if r["method"] == UNCALIBRATED and 10 <= r["ventricle_volume"] <= 60]
        add("ventricle volume vs requested, 10-60 ml", worst, "within 10 %", worst <= 10,
            f"max |error| over {len(vent)} atlases, mean {np.mean([abs(r['ventricle_err_pct']) for r in vent]):.1f} %"
            + (f"; the decoder alone (no volume calibration): max {max(own):.1f} %, mean {np.mean(own):.1f} %"
               if own and method == "DiffDef" else ""))
    tis = [r for r in mine if 50 <= r["age"] <= 80]
    if tis:
        worst = max(abs(r["tissue_err_pct"]) for r in tis)
        add("tissue volume vs B(a), ages 50-80", worst, "within 2 %", worst <= 2,
            f"max |error| over {len(tis)} atlases, mean {np.mean([abs(r['tissue_err_pct']) for r in tis]):.2f} %")
    inr = [r for r in mine if r["in_range"]] or mine
    for lab, goal in (("LV", 0.90), ("GM", 0.95), ("WM", 0.95)):
        vals = [r["dice"][lab] for r in inr]
        add(f"Dice {lab} vs true atlas", float(min(vals)), f">= {goal}", min(vals) >= goal,
            f"min over {len(inr)} in-range atlases, mean {np.mean(vals):.3f}")
    cen = _by_condition(rows, method, "centrality_mm")
    for other in ("MNI template", "conventional", CONVENTIONAL_1MM):
        oc = _by_condition(rows, other, "centrality_mm")
        common = sorted(set(cen) & set(oc))
        if common:
            a, b = float(np.mean([cen[c] for c in common])), float(np.mean([oc[c] for c in common]))
            wins = sum(cen[c] < oc[c] for c in common)
            add(f"centrality better than {other}", a, f"< {b:.3f} mm", a < b,
                f"mean over {len(common)} shared conditions; better on {wins}/{len(common)}")
    for other in ("conventional", CONVENTIONAL_1MM):
        conv_t = [r["seconds"] for r in rows if r["method"] == other]
        if conv_t:
            mine_t = float(np.median([r["seconds"] for r in mine]))
            speed = float(np.median(conv_t)) / mine_t
            add(f"speed-up per atlas vs {other}", speed, ">= 100x", speed >= 100,
                f"median {np.median(conv_t):.1f} s vs {mine_t:.2f} s per atlas")
    return out


def ablation_comparison(rows: list[dict]) -> dict:
    """Centrality (mm) on held-out neighbourhoods of DiffDef with vs without the MP loss, per condition."""
    a = _by_condition(rows, "DiffDef", "centrality_mm")
    b = _by_condition(rows, "DiffDef, no MP loss", "centrality_mm")
    common = sorted(set(a) & set(b))
    inr = {(r["age"], r["ventricle_volume"]) for r in rows if r["in_range"]}
    per = [{"age": c[0], "ventricle_volume": c[1], "with_mp": a[c], "without_mp": b[c], "in_range": c in inr} for c in common]
    res = {"per_condition": per}
    for subset, sel in (("all", per), ("in_range", [p for p in per if p["in_range"]])):
        if sel:
            res[subset] = {"with_mp": float(np.mean([p["with_mp"] for p in sel])),
                           "without_mp": float(np.mean([p["without_mp"] for p in sel])),
                           "mp_better": int(sum(p["with_mp"] < p["without_mp"] for p in sel)), "n": len(sel)}
    return res


def format_ablation(ab: dict) -> str:
    lines = ["MP-loss ablation: centrality (mm) on held-out neighbourhoods (lower is better)",
             f"{'age':>5} {'V (ml)':>7} {'with MP':>9} {'without':>9}"]
    for p in ab["per_condition"]:
        flag = "" if p["in_range"] else "  (extrapolated)"
        lines.append(f"{p['age']:5.0f} {p['ventricle_volume']:7.1f} {p['with_mp']:9.3f} {p['without_mp']:9.3f}{flag}")
    for subset in ("in_range", "all"):
        if subset in ab:
            s = ab[subset]
            lines.append(f"mean ({subset.replace('_', ' ')}, {s['n']} conditions): with MP {s['with_mp']:.3f} mm, "
                         f"without {s['without_mp']:.3f} mm; MP better on {s['mp_better']}/{s['n']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- report
def _f(x, fmt="{:.3f}"):
    return fmt.format(x) if _finite(x) else "n/a"


def markdown(result: dict) -> str:
    s = result["settings"]
    m = result["model"]
    prov = m["provenance"]
    L = ["# Evaluation against ground truth and baselines", "",
         f"Made by `{s['command'] or 'python -m diffdef_training.evaluate'}` in {result['seconds_total'] / 60:.1f} min "
         f"({result.get('machine', '')}, {s['threads']} threads).", "",
         f"Model: `{m['path']}` (working grid {m['working_grid_mm']:g} mm, trained on {prov.get('cohort_size')} synthetic "
         f"subjects, cohort seed {prov.get('cohort_seed')}, MP loss {prov.get('morphology_preservation_loss')}). "
         f"Ablation: `{result['ablation_model'] or 'not given'}`. Conditional template network: "
         f"`{result.get('conditional_template_model') or 'not given'}`.", "",
         "Ground truth: the synthetic law's true atlas at 1 mm (`SyntheticLaw.true_atlas`). Conditions: an age sweep "
         "(ventricle volume at the law's median m(a)) and a ventricle sweep at one age; *extrapolated* = outside the "
         "model's training range. Generative methods are run with seeds "
         f"{', '.join(map(str, s['seeds']))} (intensity generation with the first {s['intensity_seeds']}, the "
         "deterministic conditional template network with the first); the "
         f"conventional template on {s['conventional_conditions']} evenly spaced conditions only (it is slow), built "
         f"on the {result['neighbourhood']['conventional_grid_mm']:g} mm grid, and on "
         f"{s.get('conventional_1mm_conditions', 0)} of them also at 1 mm, the grid DiffDef's atlases are on "
         "(*conventional, 1 mm*; same subjects, same settings).", "",
         "Metrics: Dice / HD95 (mm) per label against the true labels (1 mm, nearest-neighbour labels); ventricle "
         "volume error vs requested and tissue (GM+WM) error vs the law's B(a), in %; centrality = norm of the mean "
         f"displacement (mm) from the atlas to its {result['neighbourhood']['n']} nearest held-out subjects "
         f"(Gaussian neighbourhood, sigma {result['neighbourhood']['sigma']:g} in normalised units), registered by the "
         "bundle's network; folding (% voxels det J <= 0) and smoothness (mean |grad det J|, 1/mm) of the deformation "
         "that makes the atlas from the template (n/a for methods without one); NCC / SSIM of the atlas image vs the "
         "true one, both masked by the true brain mask, at 1 mm on the brain's bounding box; wall time per atlas (s).", ""]
    if result["targets"]:
        L += ["## Targets of the shipped model (issue 6)", "", "| target | value | goal | met | note |", "|---|---|---|---|---|"]
        for t in result["targets"]:
            L.append(f"| {t['target']} | {_f(t['value'])} | {t['goal']} | {'yes' if t['met'] else 'NO'} | {t['note']} |")
        L.append("")
    cols = [("dice_CSF", "Dice CSF"), ("dice_GM", "Dice GM"), ("dice_WM", "Dice WM"), ("dice_LV", "Dice LV"),
            ("hd95_mm_GM", "HD95 GM"), ("hd95_mm_WM", "HD95 WM"), ("hd95_mm_LV", "HD95 LV"),
            ("abs_ventricle_err_pct", "|LV err| %"), ("abs_tissue_err_pct", "|tissue err| %"),
            ("centrality_mm", "centrality mm"), ("folding_pct", "folding %"), ("smoothness_per_mm", "smoothness"),
            ("ncc", "NCC"), ("ssim", "SSIM"), ("seconds", "s / atlas")]
    for subset, title in (("in_range", "Summary within the training range"), ("all", "Summary over all conditions")):
        L += [f"## {title}", "", "| method | atlases | " + " | ".join(c[1] for c in cols) + " |",
              "|---|---|" + "---|" * len(cols)]
        for method, e in result["summary"].items():
            row = e[subset]
            if not row.get("n"):
                continue
            L.append(f"| {method} | {row['n']} | " + " | ".join(
                _f(row.get(k), "{:.2f}" if k in ("seconds", "abs_ventricle_err_pct", "abs_tissue_err_pct", "hd95_mm_GM",
                                                 "hd95_mm_WM", "hd95_mm_LV") else "{:.3f}") for k, _ in cols) + " |")
        L.append("")
    if result.get("ablation"):
        L += ["## MP-loss ablation", "", "```", format_ablation(result["ablation"]), "```", ""]
    L += ["## Per condition (mean over seeds)", "",
          "| age | V req. ml | range | method | Dice GM | Dice WM | Dice LV | HD95 LV | V ml (err %) | tissue err % | "
          "centrality mm | folding % | NCC | SSIM | s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for cond in result["conditions"]:
        for method in (REFERENCE, *METHODS):
            sel = [r for r in result["rows"] if r["method"] == method and r["age"] == cond["age"]
                   and r["ventricle_volume"] == cond["ventricle_volume"]]
            if not sel:
                continue
            g = lambda k: _mean([_flat(r).get(k) for r in sel])
            L.append(f"| {cond['age']:g} | {cond['ventricle_volume']:g} | {'in' if cond['in_range'] else 'extrap.'} | "
                     f"{method} | {_f(g('dice_GM'))} | {_f(g('dice_WM'))} | {_f(g('dice_LV'))} | {_f(g('hd95_mm_LV'), '{:.2f}')} | "
                     f"{_f(_mean([r['ventricle_ml'] for r in sel]), '{:.1f}')} ({_f(g('ventricle_err_pct'), '{:+.1f}')}) | "
                     f"{_f(g('tissue_err_pct'), '{:+.2f}')} | {_f(g('centrality_mm'))} | {_f(g('folding_pct'), '{:.4f}')} | "
                     f"{_f(g('ncc'))} | {_f(g('ssim'))} | {_f(g('seconds'), '{:.2f}')} |")
    L.append("")
    figs = result.get("figures") or []
    if figs:
        L += ["## Figures", ""] + [f"![{Path(f).stem}]({Path(f).name})" for f in figs] + [""]
    return "\n".join(L)


def figures(result: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffdef.template import load_template

    template = load_template()
    ex = result["_examples"]  # axial slices at result["figure_slice"]
    files = []
    age_conds = [c for c in result["conditions"] if c["sweep"] in ("age", "given")]
    methods = [m for m in (REFERENCE, *METHODS) if any(k[0] == m for k in ex)]
    if age_conds and methods:
        k = result["figure_slice"]  # axial slice through the ventricles
        brain = np.argwhere(template.labels[:, :, k] > 0)
        (i0, j0), (i1, j1) = brain.min(0) - 3, brain.max(0) + 4
        fig, axes = plt.subplots(len(methods), len(age_conds), figsize=(1.6 * len(age_conds) + 0.8, 1.9 * len(methods)),
                                 squeeze=False)
        for r, method in enumerate(methods):
            for c, cond in enumerate(age_conds):
                ax = axes[r, c]
                ax.set_xticks([]), ax.set_yticks([])
                item = ex.get((method, cond["age"], cond["ventricle_volume"]))
                if item is None:
                    ax.set_facecolor("0.85")
                    ax.text(0.5, 0.5, "not run", ha="center", va="center", fontsize=7, transform=ax.transAxes)
                else:
                    t1, labels = item
                    ax.imshow(t1[i0:i1, j0:j1].T, cmap="gray", origin="lower", vmin=0, vmax=1)
                    ax.contour((labels[i0:i1, j0:j1] == VENTRICLES).T.astype(float), levels=[0.5], colors="c",
                               linewidths=0.6, origin="lower")
                if r == 0:
                    ax.set_title(f"age {cond['age']:g}\nV {cond['ventricle_volume']:g} ml"
                                 + ("" if cond["in_range"] else "*"), fontsize=7)
                if c == 0:
                    ax.set_ylabel(method.replace(", ", ",\n").replace(" generation", "\ngeneration").replace(" network", "\nnetwork"), fontsize=7)
        fig.suptitle("Axial slice through the ventricles (cyan: ventricle labels); * extrapolated; seed "
                     f"{result['settings']['seeds'][0]}", fontsize=8)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))  # 0.3 inch for the title
        path = out / "evaluation_atlases.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))
    rows = result["rows"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    markers = dict(zip((REFERENCE, *METHODS), ("*", "o", "x", "^", "s", "D", "P", "v", "h")))
    for method in (REFERENCE, *METHODS):
        sel = [r for r in rows if r["method"] == method]
        if not sel:
            continue
        a1.scatter([r["ventricle_volume"] for r in sel], [r["ventricle_ml"] for r in sel], label=method,
                   marker=markers[method], s=22, alpha=0.8)
        a2.scatter([r["age"] for r in sel], [r["tissue_err_pct"] for r in sel], label=method, marker=markers[method],
                   s=22, alpha=0.8)
    req = sorted({r["ventricle_volume"] for r in rows})
    a1.plot(req, req, "k--", lw=0.8)
    a1.fill_between(req, [0.9 * v for v in req], [1.1 * v for v in req], color="0.9", label="+-10 %")
    a1.set_xlabel("requested ventricle volume (ml)"), a1.set_ylabel("ventricle volume of the atlas (ml)")
    a1.set_title("Ventricle volume: requested vs obtained", fontsize=9)
    a2.axhspan(-2, 2, color="0.9", label="+-2 %")
    a2.axhline(0, color="k", lw=0.8, ls="--")
    a2.set_xlabel("age (years)"), a2.set_ylabel("tissue volume error vs B(a) (%)")
    a2.set_title("Brain tissue (GM+WM) vs the law's B(a)", fontsize=9)
    a1.legend(fontsize=7)
    fig.tight_layout()
    path = out / "evaluation_volumes.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(str(path))
    return files


def write_outputs(result: dict, out) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result["figures"] = figures(result, out) if result["settings"]["figures"] else []
    clean = {k: v for k, v in result.items() if not k.startswith("_")}
    for name, text in (("evaluation.json", json.dumps(clean, indent=1, default=float)), ("evaluation.md", markdown(result))):
        with atomic_path(out / name, overwrite=True) as tmp:
            tmp.write_text(text)
    return [out / "evaluation.md", out / "evaluation.json", *map(Path, result["figures"])]


# ------------------------------------------------------------------------------------------------------ CLI
def _floats(text: str) -> tuple:
    return tuple(float(x) for x in text.split(",") if x.strip()) if text else ()


def _methods(text: str) -> tuple:
    """Comma-separated method names; a name that holds a comma itself ("DiffDef, no MP loss") is matched whole, the
    longest known name first. An unknown name is kept as written, for :func:`run_evaluation` to refuse."""
    parts, names = [p.strip() for p in text.split(",")], []
    while parts:
        n = next((n for n in range(len(parts), 0, -1) if ", ".join(parts[:n]) in METHODS), 1)
        names.append(", ".join(parts[:n]))
        parts = parts[n:]
    names = tuple(name for name in names if name)
    if not names:
        raise argparse.ArgumentTypeError(f"name at least one method: {'; '.join(METHODS)}")
    return names


def _pairs(text: str) -> list:
    try:
        return [tuple(float(v) for v in p.split(":")) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("conditions are AGE:VOLUME pairs, e.g. 60:20,75:35") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = EvalSettings()
    p.add_argument("--model", help="model bundle folder (default: the shipped model)")
    p.add_argument("--ablation", help="bundle whose decoder was trained without the MP loss (adds that method)")
    p.add_argument("--conditional-template", help="bundle written by diffdef-train conditional-template (adds the "
                   "conditional template network baseline)")
    p.add_argument("--out", default="docs", help="output folder for evaluation.md/.json and the figures (default docs)")
    p.add_argument("--ages", type=_floats, default=d.ages, help="ages of the age sweep, years (default 40,50,...,90)")
    p.add_argument("--ventricle-volumes", type=_floats, default=d.volumes,
                   help="volumes of the ventricle sweep, ml (default 10,20,40,60; an extrapolated one is added)")
    p.add_argument("--extrapolated-volume", type=float, default=None,
                   help="extra ventricle volume beyond the training range, ml (default 1.15 x the maximum; 0: none)")
    p.add_argument("--volume-sweep-age", type=float, default=d.volume_sweep_age, help="age of the ventricle sweep (years)")
    p.add_argument("--conditions", type=_pairs, help="explicit AGE:VOLUME pairs instead of the sweeps, e.g. 60:20,75:35")
    p.add_argument("--seeds", type=lambda t: tuple(int(x) for x in t.split(",")), default=d.seeds,
                   help="sampling seeds of the generative methods (default 0,1)")
    p.add_argument("--intensity-seeds", type=int, default=d.intensity_seeds,
                   help="how many of the seeds the intensity baseline uses (default 1)")
    p.add_argument("--methods", type=_methods, default=d.methods,
                   help=f"comma-separated subset of: {'; '.join(METHODS)} (e.g. 'DiffDef,DiffDef, no MP loss,MNI "
                        "template')")
    p.add_argument("--conventional-conditions", type=int, default=d.conventional_conditions,
                   help="number of evenly spaced conditions for the conventional template (default 4; it is slow)")
    p.add_argument("--conventional-iterations", type=int, default=d.conventional_iterations,
                   help="groupwise iterations (default 2)")
    p.add_argument("--conventional-demons-iterations", type=int, default=d.conventional_demons_iterations,
                   help="demons iterations per registration (default 25)")
    p.add_argument("--conventional-neighbours", type=int, default=0, help="training subjects averaged (default: the model's N)")
    p.add_argument("--conventional-factor", type=int, default=0,
                   help="grid of the conventional template as a downsampling of 1 mm (default: the model's working grid)")
    p.add_argument("--conventional-1mm-conditions", type=int, default=d.conventional_1mm_conditions,
                   help="of the conventional template's conditions, how many (the first in-range ones) it is also "
                        "built on at 1 mm, the grid DiffDef's atlases are on (default 1; minutes each; 0: none)")
    p.add_argument("--neighbours", type=int, default=0, help="held-out neighbourhood size for centrality (default: the model's N)")
    p.add_argument("--threads", type=int, default=d.threads, help="CPU threads (torch and SimpleITK, default 2)")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def settings_from_args(a, command: str = "") -> EvalSettings:
    return EvalSettings(model=a.model, ablation=a.ablation, conditional_template=a.conditional_template, out=a.out, ages=a.ages, volumes=a.ventricle_volumes,
                        extrapolated_volume=a.extrapolated_volume, volume_sweep_age=a.volume_sweep_age,
                        conditions=a.conditions, seeds=a.seeds, intensity_seeds=a.intensity_seeds, methods=a.methods,
                        conventional_conditions=a.conventional_conditions,
                        conventional_iterations=a.conventional_iterations,
                        conventional_demons_iterations=a.conventional_demons_iterations,
                        conventional_neighbours=a.conventional_neighbours, conventional_factor=a.conventional_factor,
                        conventional_1mm_conditions=a.conventional_1mm_conditions,
                        neighbours=a.neighbours, threads=a.threads, figures=not a.no_figures,
                        progress=not a.no_progress, command=command)


def run_from_args(a, command: str = "") -> dict:
    s = settings_from_args(a, command)
    result = run_evaluation(s)
    files = write_outputs(result, s.out)
    if result.get("ablation"):
        print(format_ablation(result["ablation"]))
    for t in result["targets"]:
        print(f"{'ok ' if t['met'] else 'MISS'} {t['target']}: {_f(t['value'])} (goal {t['goal']}; {t['note']})")
    for f in files:
        print(f"wrote {f}")
    print(f"evaluation run time: {result['seconds_total']:.1f} s ({result['seconds_total'] / 60:.1f} min)")
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m diffdef_training.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    a = p.parse_args(argv)
    try:
        run_from_args(a, "python -m diffdef_training.evaluate " + " ".join(argv))
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
