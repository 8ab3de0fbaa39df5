"""The training cohort's held-volume model (brain tissue by condition): fitted at export
(diffdef_training.held_volumes), carried in model.json, read and met at generation (diffdef.calibration)."""
from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from diffdef.bundle import BundleError, load_bundle
from diffdef.calibration import HeldVolumeModel, bundle_volume_labels
from diffdef.conditions import Condition, ConditionSpec
from diffdef_training import held_volumes
from diffdef_training.config import load_config

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "DiffDefTraining" / "configs" / "tiny.yaml"


class _Cohort:
    """What :func:`held_volumes.fit` reads of a cohort: spec, normalised conditions, label maps, volumes."""

    def __init__(self, ages, volumes, tissue_ml):
        self.spec = ConditionSpec([Condition("age", "years", 65.0, 10.0, 45.0, 82.0),
                                   Condition("ventricle_volume", "ml", 25.0, 12.0, 5.0, 90.0)])
        raw = torch.tensor(np.stack([ages, volumes], 1), dtype=torch.float64)
        self.conditions = self.spec.normalise_tensor(raw)
        self.labels = torch.zeros(len(ages), 5, 2, 2, 2)  # present: the fit needs label maps
        self.label_volumes_ml = torch.zeros(len(ages), 5, dtype=torch.float64)
        self.label_volumes_ml[:, 2], self.label_volumes_ml[:, 3] = (torch.from_numpy(f * tissue_ml) for f in (0.4, 0.6))


def test_the_fit_recovers_a_linear_law_and_its_marginals():
    rng = np.random.default_rng(0)
    ages, volumes = rng.uniform(45, 82, 300), np.exp(rng.normal(3.2, 0.35, 300))
    tissue = np.exp(7.5 - 0.0025 * ages + 0.01 * np.log(volumes))  # ml, exactly log-linear
    volumes[:20] = np.nan  # subjects without a ventricle volume: left out of the fits that use it
    cfg = load_config(None, {"decoder": {"neighbourhood_volume_labels": [[2, 3]],
                                         "log_conditions": ["ventricle_volume"]}})
    model = held_volumes.fit(_Cohort(ages, volumes, tissue), cfg)
    fits = {tuple(f["conditions"]): f for f in model["fits"]}
    assert model["labels"] == [[2, 3]] and set(fits) == {("age", "ventricle_volume"), ("age",), ("ventricle_volume",), ()}
    both = fits[("age", "ventricle_volume")]
    assert both["subjects"] == 280 and fits[("age",)]["subjects"] == 300
    np.testing.assert_allclose(both["intercept"], [7.5], atol=1e-9)
    np.testing.assert_allclose(both["slopes"], [[-0.0025], [0.01]], atol=1e-9)
    assert both["rms_log"][0] < 1e-9
    bundle = load_bundle(networks_wanted=())
    bundle.spec = _Cohort(ages[:1], volumes[:1], tissue[:1]).spec
    read = HeldVolumeModel(json.loads(json.dumps(model)), bundle, [[2, 3]])
    assert read.volumes_ml({"age": 70.0, "ventricle_volume": 30.0})[0] == pytest.approx(
        math.exp(7.5 - 0.0025 * 70 + 0.01 * math.log(30)), rel=1e-9)
    # a condition omitted: the fit without it (the marginal regression), not the full fit at a made-up value
    age_only = fits[("age",)]
    assert read.volumes_ml({"age": 70.0, "ventricle_volume": None})[0] == pytest.approx(
        math.exp(age_only["intercept"][0] + 70 * age_only["slopes"][0][0]), rel=1e-9)
    assert read.volumes_ml({"age": None, "ventricle_volume": None})[0] == pytest.approx(math.exp(fits[()]["intercept"][0]))
    # a volume below the cohort's smallest (5 ml) is taken at it: its logarithm stays finite at 0 ml
    assert read.volumes_ml({"age": 70.0, "ventricle_volume": 0.0}) == pytest.approx(
        read.volumes_ml({"age": 70.0, "ventricle_volume": 5.0}))


def test_without_finer_volumes_the_fit_counts_the_hard_labels_against_the_template():
    from diffdef.template import load_template
    from diffdef_training.pipeline import prepared_cohort

    small_cohort = prepared_cohort(load_config(None, {"cohort": {"size": 6, "held_out": 2, "factor": 8}}), progress=False)
    cohort = copy.copy(small_cohort)
    cohort.label_volumes_ml = None
    template = load_template()
    ml = held_volumes.volumes_ml(cohort, [[2, 3]])
    ratio = held_volumes.volume_ratios(cohort, [[2, 3]]).numpy()
    np.testing.assert_allclose(ml[:, 0], ratio[:, 0] * template.mask([2, 3]).sum() * template.grid.voxel_volume_ml)
    fine = held_volumes.volumes_ml(small_cohort, [[2, 3]])  # the synthetic cohort's own: its fractions' sums
    np.testing.assert_allclose(fine[:, 0], small_cohort.label_volumes_ml[:, [2, 3]].sum(1).numpy())


def test_the_exported_bundle_carries_the_fit_and_an_older_bundle_gets_it_written(tiny_bundle, tmp_path, capsys):
    from diffdef_training.cli import main

    exported = json.loads((tiny_bundle / "model.json").read_text())["held_volumes"]
    assert exported["labels"] == [[2], [3]] and len(exported["fits"]) == 4
    older = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, older)
    meta = json.loads((older / "model.json").read_text())
    del meta["held_volumes"]
    (older / "model.json").write_text(json.dumps(meta))
    main(["held-volumes", str(older), "--config", str(TINY), "--no-progress"])
    assert "written into" in capsys.readouterr().out
    written = json.loads((older / "model.json").read_text())
    assert written["held_volumes"] == exported and {k: v for k, v in written.items() if k != "held_volumes"} == meta
    load_bundle(older)  # still a valid bundle: the weights' checksums are untouched
    before = (older / "model.json").read_text()
    other = tmp_path / "other.yaml"
    other.write_text(TINY.read_text().replace("size: 24", "size: 20"))
    with pytest.raises(SystemExit, match="trained with cohort"):
        main(["held-volumes", str(older), "--config", str(other), "--no-progress"])
    assert (older / "model.json").read_text() == before  # nothing written


@pytest.mark.parametrize("change, needle", [
    (lambda e: e.update(labels=[[2, 3]]), "not the decoder's held groups"),
    (lambda e: e["fits"][0].update(intercept=[float("nan"), 1.0]), "finite"),
    (lambda e: e["fits"][0].update(conditions=["sex"]), "not a condition"),
    (lambda e: e.update(fits=[f for f in e["fits"] if f["conditions"]]), "no fit without conditions"),
    (lambda e: e.pop("fits"), "invalid"),
])
def test_a_bad_held_volume_model_is_refused(tiny_bundle, change, needle):
    bundle = load_bundle(tiny_bundle, networks_wanted=())
    entry = copy.deepcopy(bundle.meta["held_volumes"])
    change(entry)
    with pytest.raises(BundleError, match=needle):
        HeldVolumeModel(entry, bundle, bundle_volume_labels(bundle)[1])


def test_generation_brings_the_tissue_to_the_cohorts_fit(tiny_generator):
    """Every calibrated atlas of a bundle with the fit gets its tissue from it, also where no volume is asked and
    without a smoothing; a bundle without the fit keeps the decoder's (projected out)."""
    for conditions in ({"age": 70, "ventricle_volume": 30}, {"age": 55}):
        atlas = tiny_generator.generate(conditions, steps=2, samples=1, smoothing_mm=0.0)
        targets = tiny_generator.calibrator.held_targets(tiny_generator.spec.validate(conditions)[0])
        assert [h["target_ml"] for h in atlas.held_volumes] == targets
        for h, label in zip(atlas.held_volumes, ("gray matter", "white matter")):
            assert h["source"] == "cohort fit" and h["labels"] in ([2], [3]) and h["converged"]
            assert h["atlas_ml"] == atlas.label_volumes_ml[label]
            # GM and WM searched one after the other (and the ventricles after them) on the tiny model's 8 mm grid,
            # each kept to first order only by the next: within 3 % (the shipped model's one tissue group: 0.2 %)
            assert abs(h["atlas_ml"] / h["target_ml"] - 1) < 0.03
    plain = tiny_generator.generate({"age": 70, "ventricle_volume": 30}, steps=2, samples=1, smoothing_mm=0.0,
                                    calibrate_volumes=False)
    assert plain.held_volumes == []


def test_a_real_cohort_fit_reads_each_subjects_label_volumes(tmp_path, capsys):
    """A cohort from a manifest (synthetic subjects under random affines, preprocessed as a user's would be): the
    pipeline carries each subject's template-space label volumes as preprocessing recorded them, and the fit
    records that it used them; without them it counts the working-grid labels and says so."""
    from diffdef_training.cohort import PreprocessOptions, preprocess_cohort
    from diffdef_training.pipeline import load_cohort
    from diffdef_training.synthetic import export_cohort

    manifest = export_cohort(tmp_path / "cohort", 3, seed=5, random_affine=True, progress=False)
    cfg = load_config(TINY, {"output": str(tmp_path / "run"), "cohort": {"source": str(manifest)}})
    cohort, _ = load_cohort(cfg, progress=False)
    ds, records = preprocess_cohort(manifest, tmp_path / "run" / "cohort_cache", conditions=cfg.cohort.conditions,
                                    options=PreprocessOptions(factor=cfg.cohort.factor), progress=False)
    assert [r["status"] for r in records] == ["cached"] * 3
    assert torch.equal(cohort.label_volumes_ml, torch.stack([ds[i]["label_volumes_ml"] for i in range(3)]))
    cohort.spec = ConditionSpec([Condition("age", "years", 65.0, 10.0, 40.0, 90.0),
                                 Condition("ventricle_volume", "ml", 25.0, 12.0, 5.0, 90.0)])
    assert held_volumes.fit(cohort, cfg)["measured_from"] == "label_volumes"
    cohort.label_volumes_ml = None  # a cache without them: the working-grid labels, said so
    assert held_volumes.fit(cohort, cfg)["measured_from"] == "working_grid_labels"
    assert "preprocessing the cohort again records them" in capsys.readouterr().err


def test_native_volume_conditions_are_divided_by_each_subjects_affine_determinant(tmp_path):
    """A manifest of native ventricle volumes (the template-space ones times each subject's affine determinant, as
    measured on brains larger or smaller than MNI's) loads with ``cohort.native_volumes`` as the template-space
    ones; a missing value stays missing."""
    import csv

    from diffdef_training.cohort import PreprocessOptions, preprocess_cohort
    from diffdef_training.pipeline import load_cohort
    from diffdef_training.synthetic import export_cohort

    manifest = export_cohort(tmp_path / "cohort", 3, seed=5, random_affine=True, progress=False)
    cache = str(tmp_path / "cache")
    cfg = load_config(TINY, {"output": str(tmp_path / "run"), "cohort": {"source": str(manifest), "cache": cache}})
    _, template_raw = load_cohort(cfg, progress=False)
    ds, _ = preprocess_cohort(manifest, cache, conditions=cfg.cohort.conditions, progress=False,
                              options=PreprocessOptions(factor=cfg.cohort.factor))
    dets = np.array([ds[i]["affine_determinant"] for i in range(3)])
    assert np.abs(dets - 1).max() > 0.03  # the random affines scale the brains
    with open(manifest) as fh:
        rows = list(csv.DictReader(fh))
    for row, det in zip(rows, dets):
        row["ventricle_volume"] = repr(float(row["ventricle_volume"]) * float(det))
    rows[2]["ventricle_volume"] = ""
    native = manifest.with_name("native.csv")
    with open(native, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cfg = load_config(TINY, {"output": str(tmp_path / "run"),
                             "cohort": {"source": str(native), "cache": cache, "native_volumes": ["ventricle_volume"]}})
    _, raw = load_cohort(cfg, progress=False)
    np.testing.assert_allclose(raw[:2], template_raw[:2], rtol=1e-6)
    assert raw[2, 0] == template_raw[2, 0] and np.isnan(raw[2, 1])


def test_a_manifest_of_native_volumes_is_warned_about():
    """The decoder meets ventricle_volume in template space: a manifest whose values are a median 20 % below the
    recorded template-space volumes (e.g. native volumes of brains smaller than MNI's) gets a warning; one within
    10 % (the synthetic subjects' own, 4 mm labels under random affines: 0.81-1.04 each) does not."""
    from diffdef_training.pipeline import volume_condition_mismatches

    cfg = load_config(TINY)
    volumes = np.zeros((4, 5))
    volumes[:, 4] = [20.0, 30.0, 40.0, 25.0]
    raw = np.stack([[60.0, 70.0, 80.0, 65.0], volumes[:, 4] * [0.9, 1.05, 0.95, 1.0]], 1)
    assert volume_condition_mismatches(cfg, raw, volumes) == []
    raw[:, 1] = volumes[:, 4] * 0.8
    raw[0, 1] = np.nan  # a missing value is left out
    (message,) = volume_condition_mismatches(cfg, raw, volumes)
    assert "ventricle_volume is a median 20 % below" in message and "(3 subjects with both)" in message
    assert "template space" in message and "cohort.native_volumes" in message and "label_volumes_ml" in message
