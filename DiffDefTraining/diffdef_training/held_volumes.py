"""The cohort's model of the held volumes (``decoder.neighbourhood_volume_labels``: brain tissue) that a bundle
carries, so that generation gives an atlas its sub-population's tissue volume rather than the decoder's.

The decoder learns the tissue volume only as closely as its Gaussian neighbourhood's mean, which the cohort's edges
skew (a neighbourhood at 80 years reaches younger subjects: the shipped decoder's tissue is 1.9 % over the law's
B(a) there, and 65 y / 10 ml, whose neighbours are younger, +1.4 %; docs/decoder-sweep.md, eighth and twenty-eighth
rounds). A least-squares fit over the whole cohort has no such skew. For each set of conditions a request can
give (any may be omitted), the log of each held group's volume in ml (as :func:`volumes_ml` measures it) is fitted
as linear in those conditions, each of ``decoder.log_conditions`` by its logarithm, over the subjects that have
them: with a condition omitted, the regression marginal over it. The bundle holds the coefficients, not the
subjects' volumes; :class:`diffdef.calibration.HeldVolumeModel` reads and evaluates them.
Why not a library's regression: numpy's ``lstsq`` is the fit; the rest is the bundle's format.
"""
from __future__ import annotations

import itertools
import sys

import numpy as np
import torch

from diffdef import fields
from diffdef.bundle import BundleError, read_meta, write_meta
from diffdef.calibration import held_feature
from diffdef.template import load_template

from .config import TrainConfig, neighbourhood_volume_groups


def grouped(maps: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """Label maps or fractions (B, L, ...) summed within each group of label values: (B, len(groups), ...)."""
    return torch.stack([maps[:, group].sum(1) for group in groups], 1) if groups else maps[:, :0]


def volume_ratios(cohort, groups: list[list[int]]) -> torch.Tensor:
    """Each subject's volume of each label group relative to the template's, both counted on the working grid's
    hard labels (so that their partial-volume bias cancels): (N, len(groups))."""
    template_hard = fields.one_hot(cohort.template_fractions.argmax(1, keepdim=True), cohort.template_fractions.shape[1])
    return grouped(cohort.labels, groups).sum(dim=(2, 3, 4)).float() / grouped(template_hard, groups).sum(dim=(2, 3, 4))


def volumes_ml(cohort, groups: list[list[int]]) -> np.ndarray:
    """Each subject's volume (ml) of each label group: (N, len(groups)). From ``cohort.label_volumes_ml`` where the
    cohort has them (the synthetic cohort: its warped fractions, as its ventricle volumes are measured; a real one:
    each label map counted at its own resolution, in template space), else the
    working-grid hard labels' :func:`volume_ratios` times the template's 1 mm volume, which overstates atrophied
    brains' tissue (synthetic subjects: +0.8 % on average against the fractions' volume, up to +1.8 %)."""
    if cohort.label_volumes_ml is not None:
        return np.stack([cohort.label_volumes_ml[:, g].sum(1).numpy() for g in groups], 1).astype(float)
    template = load_template()
    template_ml = np.array([template.mask(g).sum() * template.grid.voxel_volume_ml for g in groups], dtype=float)
    return volume_ratios(cohort, groups).double().numpy() * template_ml


def fit(cohort, cfg: TrainConfig) -> dict | None:
    """The held-volume model of ``cohort`` (conditions normalised by ``cohort.spec``) as model.json's
    ``held_volumes`` entry; None when the config holds no volumes or the cohort has no label maps."""
    groups = neighbourhood_volume_groups(cfg.decoder)
    if not groups or cohort.labels is None:
        return None
    spec = cohort.spec
    log_names = list(cfg.decoder.log_conditions)
    raw = np.stack([cohort.conditions[:, k].numpy().astype(float) * c.sd + c.mean
                    for k, c in enumerate(spec.conditions)], 1)
    features = np.stack([held_feature(raw[:, k], c, log_names) for k, c in enumerate(spec.conditions)], 1)
    target = np.log(volumes_ml(cohort, groups))  # (N, G)
    measured_from = "label_volumes" if cohort.label_volumes_ml is not None else "working_grid_labels"
    if cohort.label_volumes_ml is None:
        print("held volumes: the cohort records no per-subject label volumes, so the fit counts the working-grid "
              "labels (about 1 % high for atrophied brains); preprocessing the cohort again records them.",
              file=sys.stderr)
    fits = []
    for size in range(len(spec.names), -1, -1):
        for subset in itertools.combinations(range(len(spec.names)), size):
            rows = np.isfinite(features[:, list(subset)]).all(1)
            if rows.sum() < size + 2:  # too few subjects to fit: the request is answered by a smaller set's fit
                continue
            x = np.concatenate([np.ones((rows.sum(), 1)), features[rows][:, list(subset)]], 1)
            coef, *_ = np.linalg.lstsq(x, target[rows], rcond=None)
            residual = target[rows] - x @ coef
            fits.append({"conditions": [spec.names[k] for k in subset], "intercept": coef[0].tolist(),
                         "slopes": coef[1:].tolist(), "subjects": int(rows.sum()),
                         "rms_log": np.sqrt((residual ** 2).mean(0)).tolist()})
    return {"labels": groups, "log_conditions": log_names, "measured_from": measured_from, "fits": fits}


def write_into_bundle(bundle_path, cfg: TrainConfig, progress: bool = True) -> dict:
    """Fit the held-volume model on the cohort of ``cfg`` and write it into the bundle's model.json (atomically),
    for a bundle exported before bundles carried it. The bundle must record the same cohort and held labels."""
    from .pipeline import prepared_cohort

    meta = read_meta(bundle_path)
    recorded = meta.get("provenance", {}).get("config", {})
    mine = cfg.to_dict()
    for section, key in (("cohort", None), ("decoder", "neighbourhood_volume_labels"), ("decoder", "log_conditions")):
        theirs = recorded.get(section, {}) if key is None else recorded.get(section, {}).get(key)
        ours = mine[section] if key is None else mine[section][key]
        if key is None:
            ours = {k: v for k, v in ours.items() if k in theirs}
        if theirs != ours:
            raise BundleError(f"The bundle was trained with {section}{'.' + key if key else ''} {theirs!r}, the config "
                              f"gives {ours!r}: pass the config the bundle was trained with.")
    model = fit(prepared_cohort(cfg, progress=progress), cfg)
    if model is None:
        raise BundleError("The config holds no decoder.neighbourhood_volume_labels (or the cohort no label maps): "
                          "there is no held volume to fit.")
    write_meta(bundle_path, {**meta, "held_volumes": model})
    return model
