"""How biased is the centrality that the decoder minimises? Measured against the synthetic law.

``python -m diffdef_training.centrality_bias --model DIR --conditions 50,80,65:60 --neighbours 200``

For each condition (age, ventricle volume; the law's median volume when omitted), the law's *true* atlas on the
bundle's working grid is registered by the bundle's network to ``--neighbours`` subjects drawn, with replacement
and Gaussian weights (the decoder's ``sigma`` and ``log_conditions``), from ``--pool`` held-out synthetic subjects.
With u_n the network's displacement atlas -> n, w_n the one n -> atlas and t_n - t_a the law's displacement of n
relative to the atlas (template -> subject minus template -> atlas, first order), all in mm, it prints the RMS
over the template's brain of these means over n:

* ``forward`` mean u_n and ``symmetric`` mean (u_n - w_n) / 2: the two centrality estimates
  (``decoder.symmetric_centrality``) at the true atlas;
* ``law`` mean (t_n - t_a): what a perfect registration would give (neighbourhood skew and sampling noise);
* ``bias forward`` mean (u_n - (t_n - t_a)) and ``bias symmetric`` mean ((u_n - w_n) / 2 - (t_n - t_a)): the
  network's systematic error, which the decoder learns to cancel by moving the atlas away from the truth;
* ``recovered``: <u, t - t_a> / |t - t_a|^2 over all neighbours and brain voxels, the fraction of the law's
  displacement the network recovers (displacement inside uniform tissue is invisible to any image registration);
* the two biases and ``recovered`` again in two parts of the brain: ``near LV``, within 2 working-grid voxels
  of the true atlas' lateral ventricles, and ``elsewhere``. The atlas error the decoder learns is about bias /
  recovered in each part, so a network can move GM/WM closer to the truth and the ventricles away from it;
* ``recovered symmetric`` in the two parts: <(u - w) / 2, t - t_a> / |t - t_a|^2, the fraction the symmetric
  estimate recovers (less than ``recovered`` where the network registers a subject to an atlas less well than an
  atlas to a subject).

``--sigmas 0.3,0.45,0.6`` measures instead, without the network, the other half of the error: where a *perfect*
registration would put the centrality's zero, for each ``sigma`` given (:func:`target_error`). That is the mean
of the **training** subjects' law displacements, each weighted by how often the decoder draws it
(``decoder.neighbours`` without replacement, with the Gaussian weights), whose RMS distance from the true atlas's
(mm, over the brain) mixes the neighbourhood's skew and the sampling noise of its few subjects. It prints that,
the neighbourhood's effective size (sum w)^2 / sum w^2, and the drawn neighbours' mean offset in age (y),
ventricle volume (ml) and the law's tissue volume B(a) (%) from the condition's. It also turns that zero into
the benchmark's metric: the 1 mm Dice (GM, WM, LV) against the true atlas of the template warped by the mean
displacement (``Dice``: the best atlas the centrality term alone could reach on this cohort), and by the true
atlas's displacement plus the mean of the neighbours' individual parts (``Dice, skew removed``: their law
displacement minus the one their conditions alone give; what is left when a term such as the volume term
corrects the neighbourhood's skew, so the sampling noise of the cohort's own variation).

``--objective 0,0.5,1`` asks instead whether the decoder reached its own objective's minimum
(:func:`objective_along`): the bundle's decoder loss (its recorded config and weights, its network, its training
cohort, ``--draws`` draws of its neighbours) along the straight line of velocities from the model's atlas (0) to
the true one (1), with each unweighted term, the volume errors as training measures them, the atlas's RMS
distance from the truth (mm) and its 1 mm Dice. A lower loss between the two than at 0 means the decoder stopped
short of a better atlas by its own measure; a higher one at 1, in a given term, names the term that pulls the
atlas off the truth.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from diffdef import fields, metrics
from diffdef.bundle import BundleError, load_bundle, load_weights
from diffdef.io import atomic_path
from diffdef.template import GM, VENTRICLES, WM, load_template

from .stages import NeighbourhoodSpace, template_brain_mask
from .synthetic import SyntheticCohort, default_law, drawn_conditions, median_ventricle_volume

POOL_OFFSET = 400  # the held-out subjects of the shipped cohort (training uses indices 0..399)
COLUMNS = ("forward", "symmetric", "law", "bias forward", "bias symmetric", "recovered",
           "bias forward, near LV", "bias forward, elsewhere", "bias symmetric, near LV", "bias symmetric, elsewhere",
           "recovered, near LV", "recovered, elsewhere", "recovered symmetric, near LV", "recovered symmetric, elsewhere")
DICE_LABELS = (GM, WM, VENTRICLES)
NEAR_LV_VOXELS = 2  # dilation of the true ventricles (working-grid voxels) that defines "near LV"


def _parse_conditions(text: str) -> list[tuple[float, float]]:
    out = []
    for item in text.split(","):
        age, _, volume = item.partition(":")
        a = float(age)
        v = float(volume) if volume else float(median_ventricle_volume(a))
        if not (np.isfinite(a) and np.isfinite(v) and v > 0):
            raise ValueError(f"Bad condition {item!r}: give AGE or AGE:VOLUME (years, ml > 0).")
        out.append((a, v))
    return out


def _rms(d: torch.Tensor, region: torch.Tensor) -> float:
    """(1, 3, ...) displacement (mm) -> RMS of its norm over ``region`` ((1, 1, ...) weights)."""
    return float(((d.pow(2).sum(1, keepdim=True) * region).sum() / region.sum()).sqrt())


class _Dice1mm:
    """1 mm Dice (GM, WM, LV) against a true atlas's labels of the template warped by a displacement on the working
    ``grid`` (mm); the template's label map is converted to a tensor once, not per atlas."""

    def __init__(self, law, grid):
        self.grid, self.spacing = grid, float(grid.spacing[0])
        self.template_labels, self.template_grid = law.template.labels_tensor(), law.template.grid

    def __call__(self, displacement_mm: torch.Tensor, truth_labels: np.ndarray) -> list[float]:
        d = fields.resample_displacement(displacement_mm / self.spacing, self.grid, self.template_grid)
        labels = fields.warp_labels(self.template_labels, d)[0, 0].numpy()
        scores = metrics.dice(labels, truth_labels, labels=DICE_LABELS)
        return [scores[v] for v in DICE_LABELS]


def _synthetic_bundle(model, networks_wanted):
    """The bundle, refused unless its conditions are the synthetic cohort's (age, ventricle_volume)."""
    bundle = load_bundle(model, networks_wanted=networks_wanted)
    names = [c.name for c in bundle.spec.conditions]
    if names != ["age", "ventricle_volume"]:
        raise ValueError(f"The bundle's conditions are {names}; this measurement needs the synthetic cohort's "
                         "(age, ventricle_volume).")
    return bundle


def _decoder_space(bundle, raw_conditions: torch.Tensor) -> NeighbourhoodSpace:
    """The decoder's neighbourhood coordinates (its ``log_conditions``) over subjects with these raw conditions."""
    log_names = bundle.meta["provenance"].get("config", {}).get("decoder", {}).get("log_conditions", [])
    return NeighbourhoodSpace(bundle.spec, bundle.spec.normalise_tensor(raw_conditions), log_names)


@torch.no_grad()
def measure(model=None, conditions=((50.0, None),), neighbours: int = 200, pool: int = 400, seed: int = 0,
            progress: bool = True, registration=None) -> list[dict]:
    """One row per condition (keys: age, ventricle_volume, :data:`COLUMNS` in mm except the ``recovered`` ones,
    and ``near LV fraction``, the part of the brain's voxels near the ventricles). ``registration``: a training
    run's registration stage folder (or its ``registration.safetensors``) to measure instead of the bundle's
    network, with the bundle's architecture and neighbourhood: a network screened before any decoder is trained."""
    bundle = _synthetic_bundle(model, ("registration",))
    net = bundle.nets["registration"]
    if registration is not None:
        registration = Path(registration)
        if not registration.exists():
            raise BundleError(f"{registration} does not exist: give a training run's registration stage folder "
                              "(RUN/registration, holding registration.safetensors) or that file.")
        load_weights(net, registration / "registration.safetensors" if registration.is_dir() else registration,
                     "registration")
    net.eval()
    spec, grid = bundle.spec, bundle.working_grid
    factor = int(bundle.meta["working_grid"]["factor"])
    sigma = float(bundle.meta["provenance"]["sigma"])
    law = default_law()
    t1, frac = load_template().on_working_grid(factor)
    mask = template_brain_mask(frac)
    spacing = float(grid.spacing[0])
    subjects = SyntheticCohort(pool, seed, factor, offset=POOL_OFFSET)
    items = [subjects[i] for i in tqdm(range(pool), desc="synthesising the pool", disable=not progress)]
    images = torch.stack([it["image"] for it in items]).float()
    space = _decoder_space(bundle, torch.stack([it["conditions"] for it in items]))

    rows = []
    for age, volume in conditions:
        volume = float(median_ventricle_volume(age)) if volume is None else float(volume)
        w = space.weights(spec.normalise({"age": age, "ventricle_volume": volume}).reshape(-1), sigma)
        idx = torch.multinomial(w, neighbours, replacement=True, generator=torch.Generator().manual_seed(seed))
        true_atlas = law.true_atlas(age, volume, factor=factor)
        truth = true_atlas["displacement"]
        atlas = fields.warp_image(t1, truth)
        k = 2 * NEAR_LV_VOXELS + 1
        near = torch.nn.functional.max_pool3d((true_atlas["labels"] == VENTRICLES).float(), k, 1, k // 2) * mask
        regions = {"": mask, ", near LV": near, ", elsewhere": mask - near}
        fw = bw = rel = 0.0
        dot, dot_sym, norm = dict.fromkeys(regions, 0.0), dict.fromkeys(regions, 0.0), dict.fromkeys(regions, 0.0)
        for chunk in tqdm(idx.split(20), desc=f"{age:g} y, {volume:.1f} ml", disable=not progress):
            atlases = atlas.expand(len(chunk), -1, -1, -1, -1)
            u = fields.integrate_velocity(net(atlases, images[chunk]).float()) * spacing
            v = fields.integrate_velocity(net(images[chunk], atlases).float()) * spacing
            t = torch.cat([law.subject_displacement(seed, POOL_OFFSET + int(i), grid) for i in chunk]) * spacing - truth * spacing
            fw, bw, rel = fw + u.sum(0, keepdim=True), bw + v.sum(0, keepdim=True), rel + t.sum(0, keepdim=True)
            ut, tt = (u * t).sum((0, 1), keepdim=True), t.pow(2).sum((0, 1), keepdim=True)  # per voxel, once
            st = ((u - v) / 2 * t).sum((0, 1), keepdim=True)
            for r, region in regions.items():
                dot[r] += float((ut * region).sum())
                dot_sym[r] += float((st * region).sum())
                norm[r] += float((tt * region).sum())
        fw, bw, rel = fw / neighbours, bw / neighbours, rel / neighbours
        row = {"age": age, "ventricle_volume": volume, "forward": _rms(fw, mask),
               "symmetric": _rms((fw - bw) / 2, mask), "law": _rms(rel, mask), "near LV fraction": float(near.sum() / mask.sum())}
        for r, region in regions.items():
            row["bias forward" + r], row["bias symmetric" + r] = _rms(fw - rel, region), _rms((fw - bw) / 2 - rel, region)
            row["recovered" + r] = dot[r] / norm[r]
            row["recovered symmetric" + r] = dot_sym[r] / norm[r]
        rows.append(row)
    return rows


TARGET_COLUMNS = ("target error", "effective n", "age offset", "volume offset", "tissue offset %",
                  "Dice GM", "Dice WM", "Dice LV", "Dice GM, skew removed", "Dice WM, skew removed",
                  "Dice LV, skew removed")


@torch.no_grad()
def target_error(model=None, conditions=((50.0, None),), sigmas=(0.3,), size: int | None = None, seed: int = 0,
                 draws: int = 1000, progress: bool = True) -> list[dict]:
    """One row per condition and sigma (keys: age, ventricle_volume, sigma, :data:`TARGET_COLUMNS`): the error of
    the centrality's zero under a perfect registration, from the synthetic training subjects ``0 .. size-1`` of
    cohort ``seed`` (``size`` defaults to the bundle's cohort size), ``neighbours`` of them drawn as the bundle's
    decoder draws them; each subject's chance to be drawn is estimated from ``draws`` draws."""
    bundle = _synthetic_bundle(model, ())
    spec = bundle.spec
    factor = int(bundle.meta["working_grid"]["factor"])
    size = int(size or bundle.meta["provenance"]["cohort_size"])
    k = min(int(bundle.meta["provenance"]["neighbours"]), size)
    law = default_law()
    grid = bundle.working_grid
    spacing = float(grid.spacing[0])
    mask = template_brain_mask(load_template().on_working_grid(factor)[1])
    subjects = SyntheticCohort(size, seed, factor)
    conds = torch.stack([subjects[i]["conditions"] for i in tqdm(range(size), desc="training subjects", disable=not progress)])
    disp = torch.cat([law.subject_displacement(seed, i, grid) for i in range(size)]) * spacing
    # each subject's individual part: its law displacement minus the one its drawn conditions alone give
    individual = disp - torch.cat([law.displacement(law.condition_velocity(*drawn_conditions(seed, i, law)), grid)
                                   for i in range(size)]) * spacing
    tissue = torch.as_tensor(law.tissue_volume(conds[:, 0].double().numpy()))
    space = _decoder_space(bundle, conds)
    gen = torch.Generator().manual_seed(seed)
    dice_of = _Dice1mm(law, grid)

    rows = []
    for age, volume in conditions:
        volume = float(median_ventricle_volume(age)) if volume is None else float(volume)
        truth = law.displacement(law.condition_velocity(age, volume), grid) * spacing
        truth_labels = law.true_atlas(age, volume)["labels"][0, 0].numpy()
        for sigma in sigmas:
            w = space.weights(spec.normalise({"age": age, "ventricle_volume": volume}).reshape(-1), sigma)
            drawn = torch.zeros(size, dtype=torch.float64)
            for _ in range(draws):
                drawn[torch.multinomial(w, k, replacement=False, generator=gen)] += 1
            p = drawn / drawn.sum()
            mean = torch.einsum("n,ncijk->cijk", p.float(), disp)[None]
            error = mean - truth
            dice = dice_of(mean, truth_labels)
            unskewed = dice_of(truth + torch.einsum("n,ncijk->cijk", p.float(), individual)[None], truth_labels)
            rows.append({"age": age, "ventricle_volume": volume, "sigma": float(sigma),
                         "target error": _rms(error, mask),
                         "effective n": float(w.sum() ** 2 / w.pow(2).sum()),
                         "age offset": float((p * conds[:, 0]).sum()) - age,
                         "volume offset": float((p * conds[:, 1]).sum()) - volume,
                         "tissue offset %": 100 * (float((p * tissue).sum()) / float(law.tissue_volume(age)) - 1),
                         **dict(zip(TARGET_COLUMNS[5:8], dice)), **dict(zip(TARGET_COLUMNS[8:], unskewed))})
    return rows


OBJECTIVE_COLUMNS = ("loss", "centrality", "similarity", "smoothness", "volume", "neighbourhood volume",
                     "volume error %", "neighbourhood volume error %", "atlas error", "Dice GM", "Dice WM", "Dice LV")


@torch.no_grad()
def objective_along(model=None, conditions=((50.0, None),), fractions=(0.0, 0.5, 1.0), draws: int = 16,
                    seed: int = 0, progress: bool = True) -> list[dict]:
    """One row per condition and fraction f (keys: age, ventricle_volume, fraction, :data:`OBJECTIVE_COLUMNS`): the
    bundle's own decoder objective (its recorded training config, on its training cohort regenerated from the
    synthetic law, its registration network) at the velocity (1 - f) v_model + f v_true, v_model the model's
    generated velocity (sampling seed ``seed``, the bundle's number of draws), v_true the law's. ``loss`` and its
    unweighted terms are means over ``draws`` neighbour draws, the same draws at every f; the volume errors (%)
    are the atlas's against its requested and neighbourhood targets as training measures them; ``atlas error``
    is the RMS over the brain of the displacement's distance from the true atlas's (mm); Dice is at 1 mm against
    the true atlas. A loss lower at f > 0 than at f = 0 says the decoder stopped short of its own objective's
    minimum along that line."""
    from diffdef.bundle import NETWORKS
    from diffdef.generate import AtlasGenerator

    from .config import load_config
    from .pipeline import prepared_cohort
    from .stages import DecoderObjective

    bundle = _synthetic_bundle(model, NETWORKS)
    cfg = load_config(None, overrides=bundle.meta["provenance"]["config"])
    if cfg.cohort.source != "synthetic":
        raise ValueError(f"The bundle was trained on {cfg.cohort.source}; this measurement needs a synthetic cohort.")
    generator = AtlasGenerator(bundle, device="cpu")
    cohort = prepared_cohort(cfg, progress=progress)
    objective = DecoderObjective(cfg, cohort, bundle.nets["registration"], torch.device("cpu"))
    law, grid = default_law(), bundle.working_grid
    spacing = float(grid.spacing[0])
    mask = template_brain_mask(cohort.template_fractions)
    dice_of = _Dice1mm(law, grid)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for age, volume in conditions:
        volume = float(median_ventricle_volume(age)) if volume is None else float(volume)
        model_velocity = generator.velocity({"age": age, "ventricle_volume": volume}, seed=seed)[0].float()
        law_velocity = law.condition_velocity(age, volume)  # on the law's grid, once
        truth = law.displacement(law_velocity, grid) * spacing
        true_velocity = law_velocity if grid.same_as(law.law_grid) else \
            fields.resample_displacement(law_velocity, law.law_grid, grid)  # a vector field in voxels, as a displacement
        truth_labels = law.true_atlas(age, volume)["labels"][0, 0].numpy()
        condition = cohort.spec.normalise({"age": age, "ventricle_volume": volume}).reshape(-1)
        drawn = [objective.neighbours(condition, gen) for _ in range(draws)]
        for f in tqdm(fractions, desc=f"{age:g} y, {volume:.1f} ml", disable=not progress):
            velocity = (1 - f) * model_velocity + f * true_velocity
            atlas, disp = objective.atlas(velocity)
            sums = {}
            for idx, weights in drawn:
                loss, terms, volume_errors, neighbourhood_errors = objective.loss(
                    velocity, atlas, disp, condition, cohort.images[idx], weights)
                for k, v in {"loss": loss, **terms}.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / draws
            rows.append({"age": age, "ventricle_volume": volume, "fraction": float(f),
                         "loss": sums["loss"], "centrality": sums["centrality"], "similarity": sums["similarity"],
                         "smoothness": sums["smoothness"], "volume": sums.get("volume", float("nan")),
                         "neighbourhood volume": sums.get("neighbourhood_volume", float("nan")),
                         "volume error %": volume_errors[0] if volume_errors else float("nan"),
                         "neighbourhood volume error %": neighbourhood_errors[0] if neighbourhood_errors else float("nan"),
                         "atlas error": _rms(disp * spacing - truth, mask),
                         **dict(zip(OBJECTIVE_COLUMNS[9:], dice_of(disp * spacing, truth_labels)))})
    return rows


def table(rows: list[dict], columns=COLUMNS) -> str:
    """Markdown table of :func:`measure`'s rows, of :func:`target_error`'s with ``columns=TARGET_COLUMNS`` or of
    :func:`objective_along`'s with ``columns=OBJECTIVE_COLUMNS``."""
    extra = {TARGET_COLUMNS: ("sigma",), OBJECTIVE_COLUMNS: ("fraction",)}.get(columns, ())
    lead = ("age", "V (ml)") + extra
    head = "| " + " | ".join(lead + columns) + " |\n|" + "---|" * (len(lead) + len(columns)) + "\n"

    def cells(r):
        return [f"{r['age']:g}", f"{r['ventricle_volume']:.1f}", *(f"{r[k]:g}" for k in extra)] + [f"{r[c]:.3f}" for c in columns]

    return head + "".join("| " + " | ".join(cells(r)) + " |\n" for r in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffdef_training.centrality_bias", description=__doc__.split("\n\n")[0],
                                 epilog="Example: python -m diffdef_training.centrality_bias --conditions 50,80,65:60")
    ap.add_argument("--model", default=None, help="bundle folder (default: the shipped model)")
    ap.add_argument("--conditions", default="50,80,65:60",
                    help="comma-separated AGE or AGE:VOLUME (years; ml, default the law's median at that age)")
    ap.add_argument("--neighbours", type=int, default=200, help="neighbours drawn per condition (with replacement; without --sigmas)")
    ap.add_argument("--registration", default=None,
                    help="a training run's registration stage folder (RUN/registration) to measure instead of the "
                         "bundle's network, on the bundle's architecture and neighbourhood (without --sigmas)")
    ap.add_argument("--pool", type=int, default=400, help="held-out synthetic subjects to draw them from (without --sigmas)")
    ap.add_argument("--seed", type=int, default=0, help="synthetic cohort seed and draw seed")
    ap.add_argument("--sigmas", default=None,
                    help="comma-separated Gaussian widths: measure the centrality's zero under a perfect registration "
                         "for each, on the training cohort, instead of the network's bias (no network is run)")
    ap.add_argument("--objective", default=None,
                    help="comma-separated fractions f in [0, 1], e.g. 0,0.5,1: evaluate instead the bundle's own decoder "
                         "objective on its training cohort at (1 - f) x the model's velocity + f x the law's true one")
    ap.add_argument("--draws", type=int, default=16, help="neighbour draws the objective is averaged over (with --objective)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--out", default=None, help="Markdown file to write (replaced atomically)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if a.neighbours < 1 or a.pool < 1:
        ap.error("--neighbours and --pool must be at least 1")
    try:
        conditions = _parse_conditions(a.conditions)
    except ValueError as exc:
        ap.error(str(exc))
    try:
        sigmas = [float(x) for x in a.sigmas.split(",")] if a.sigmas else None
    except ValueError:
        ap.error(f"--sigmas {a.sigmas!r}: give comma-separated numbers, e.g. 0.3,0.45")
    if sigmas is not None and a.registration:
        ap.error("--registration names a network to measure, --sigmas measures without one: give one of them")
    if sigmas is not None and not all(np.isfinite(s) and s > 0 for s in sigmas):
        ap.error(f"--sigmas {a.sigmas!r}: each width must be a finite number > 0")
    try:
        fractions = [float(x) for x in a.objective.split(",")] if a.objective else None
    except ValueError:
        ap.error(f"--objective {a.objective!r}: give comma-separated fractions, e.g. 0,0.5,1")
    if fractions is not None and not all(0.0 <= f <= 1.0 for f in fractions):
        ap.error(f"--objective {a.objective!r}: each fraction must lie in [0, 1] (0: the model's atlas, 1: the truth)")
    if fractions is not None and (sigmas is not None or a.registration):
        ap.error("--objective evaluates the bundle's own decoder objective: give it without --sigmas and --registration")
    if a.draws < 1:
        ap.error("--draws must be at least 1")
    torch.set_num_threads(a.threads)
    t = time.perf_counter()
    try:
        if fractions is not None:
            text = table(objective_along(a.model, conditions, fractions, a.draws, a.seed, not a.no_progress),
                         OBJECTIVE_COLUMNS)
        elif sigmas is not None:
            text = table(target_error(a.model, conditions, sigmas, seed=a.seed, progress=not a.no_progress),
                         TARGET_COLUMNS)
        else:
            text = table(measure(a.model, conditions, a.neighbours, a.pool, a.seed, not a.no_progress, a.registration))
    except (BundleError, ValueError) as exc:
        ap.error(str(exc))
    seconds = time.perf_counter() - t
    print(text + f"\n{seconds:.0f} s")
    if a.out:
        args = " ".join(sys.argv[1:] if argv is None else argv)
        with atomic_path(Path(a.out), overwrite=True) as tmp:
            tmp.write_text(f"# Bias of the centrality estimate\n\n{__doc__}\n"
                           f"Command ({seconds:.0f} s, {a.threads} thread(s)): "
                           f"`python -m diffdef_training.centrality_bias {args}`\n\n{text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
