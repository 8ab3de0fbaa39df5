"""The evaluation benchmark (diffdef_training.evaluate) on the tiny bundle, and its baselines."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from diffdef import metrics


@pytest.fixture(scope="module")
def tiny_evaluation(tiny_bundle, tiny_conditional_template, tmp_path_factory):
    """One condition, every method but the ablation (see test_ablation_comparison), cheap groupwise; two seeds,
    of which only DiffDef uses both."""
    from diffdef_training.evaluate import EvalSettings, run_evaluation, write_outputs

    out = tmp_path_factory.mktemp("evaluation")
    s = EvalSettings(model=str(tiny_bundle), conditional_template=str(tiny_conditional_template), out=str(out),
                     conditions=[(65.0, 25.0)], seeds=(0, 1), intensity_seeds=1, conventional_conditions=1, conventional_iterations=1, conventional_demons_iterations=5,
                     threads=2, progress=False)
    result = run_evaluation(s)
    files = write_outputs(result, out)
    return result, out, files


def _rows(result, method):
    return [r for r in result["rows"] if r["method"] == method]


def test_outputs_written(tiny_evaluation, tiny_conditional_template):
    result, out, files = tiny_evaluation
    for name in ("evaluation.md", "evaluation.json", "evaluation_atlases.png", "evaluation_volumes.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    data = json.loads((out / "evaluation.json").read_text())
    assert {r["method"] for r in data["rows"]} == {"true atlas", "DiffDef", "DiffDef, no volume calibration",
                                                  "MNI template", "conventional", "conventional, 1 mm",
                                                  "intensity generation", "conditional template network"}
    md = (out / "evaluation.md").read_text()
    for method in ("DiffDef", "MNI template", "conventional", "intensity generation", "conditional template network",
                   "Targets"):
        assert method in md
    assert str(tiny_conditional_template) in md and data["conditional_template_model"] == str(tiny_conditional_template)
    assert data["seconds_total"] > 0


def test_metrics_finite_and_in_range(tiny_evaluation):
    result, _, _ = tiny_evaluation
    for r in result["rows"]:
        if r["method"] == "true atlas":
            continue
        for lab, d in r["dice"].items():
            assert 0.0 <= d <= 1.0, (r["method"], lab, d)
        assert all(h is None or (math.isfinite(h) and h >= 0) for h in r["hd95_mm"].values()), r
        assert -1.0 <= r["ncc"] <= 1.0 and -1.0 <= r["ssim"] <= 1.0
        assert math.isfinite(r["centrality_mm"]) and r["centrality_mm"] > 0
        assert r["ventricle_ml"] > 0 and r["tissue_ml"] > 0 and r["seconds"] >= 0
    diffdef = _rows(result, "DiffDef")[0]
    assert diffdef["folding_pct"] == 0.0  # velocity-integrated: diffeomorphic
    assert diffdef["dice"]["WM"] > 0.8  # even the barely trained model warps the template only a little
    assert _rows(result, "conventional")[0]["folding_pct"] is None  # no deformation to judge
    # the barely trained decoder misses the requested volume; the calibrated atlas, as diffdef generate makes it, not
    uncalibrated = _rows(result, "DiffDef, no volume calibration")[0]
    assert abs(diffdef["ventricle_err_pct"]) < 3 < abs(uncalibrated["ventricle_err_pct"])
    note = next(t["note"] for t in result["targets"] if t["target"].startswith("ventricle volume"))
    worst = max(abs(r["ventricle_err_pct"]) for r in _rows(result, "DiffDef, no volume calibration"))
    assert f"the decoder alone (no volume calibration): max {worst:.1f} %" in note


def test_conditional_template_runs_once_per_condition(tiny_evaluation):
    """The deterministic baseline makes one atlas per condition (the first seed), scored like DiffDef's, with
    its deformation judged (folding) and its requested volume calibrated as diffdef generate does."""
    result, _, _ = tiny_evaluation
    assert len(_rows(result, "DiffDef")) == 2
    (row,) = _rows(result, "conditional template network")
    assert row["seed"] == 0 and row["folding_pct"] == 0.0 and abs(row["ventricle_err_pct"]) < 3


def test_a_diffdef_bundle_is_refused_as_the_conditional_template(tiny_bundle, tmp_path):
    from diffdef_training.evaluate import EvalSettings, run_evaluation

    s = EvalSettings(model=str(tiny_bundle), conditional_template=str(tiny_bundle), out=str(tmp_path),
                     conditions=[(65.0, 25.0)], seeds=(0,), methods=("conditional template network",), progress=False)
    with pytest.raises(ValueError, match="not a conditional template network.*diffdef-train conditional-template"):
        run_evaluation(s)
    assert not any(tmp_path.iterdir())


def test_conventional_at_1mm_uses_the_same_subjects(tiny_evaluation):
    """The 1 mm conventional template is the coarse one's neighbourhood rebuilt on the 1 mm grid: same subjects,
    and its speed-up row is reported."""
    result, _, _ = tiny_evaluation
    coarse, fine = _rows(result, "conventional")[0], _rows(result, "conventional, 1 mm")[0]
    assert fine["details"]["subjects"] == coarse["details"]["subjects"]
    assert fine["details"]["grid_spacing_mm"] == 1.0 and coarse["details"]["grid_spacing_mm"] == 8.0
    assert fine["dice"]["WM"] > 0.5
    names = [t["target"] for t in result["targets"]]
    assert "speed-up per atlas vs conventional" in names and "speed-up per atlas vs conventional, 1 mm" in names


def test_identity_is_the_template(tiny_evaluation):
    from diffdef.template import load_template

    result, _, _ = tiny_evaluation
    ident = _rows(result, "MNI template")[0]
    vols = load_template().label_volumes_ml()
    assert ident["ventricle_ml"] == pytest.approx(vols["lateral ventricles"])
    # the condition (65 y, 25 ml) differs from the template: the truth is not the template
    assert ident["dice"]["LV"] < 0.99 and ident["ncc"] < 0.999


def test_truth_meets_its_conditions(tiny_evaluation):
    """The reference row measures the law's own atlas: the volume bookkeeping must give back V and B(a)."""
    result, _, _ = tiny_evaluation
    truth = _rows(result, "true atlas")[0]
    assert abs(truth["ventricle_err_pct"]) < 3.0
    assert abs(truth["tissue_err_pct"]) < 1.0
    assert truth["folding_pct"] == 0.0


def test_ablation_comparison():
    from diffdef_training.evaluate import ablation_comparison, format_ablation

    rows = [{"method": m, "age": a, "ventricle_volume": 20.0, "in_range": a < 85, "centrality_mm": c}
            for m, a, c in (("DiffDef", 60.0, 0.5), ("DiffDef", 60.0, 0.7), ("DiffDef, no MP loss", 60.0, 0.9),
                            ("DiffDef", 90.0, 1.2), ("DiffDef, no MP loss", 90.0, 1.0), ("MNI template", 60.0, 2.0))]
    ab = ablation_comparison(rows)
    assert ab["in_range"] == {"with_mp": pytest.approx(0.6), "without_mp": pytest.approx(0.9), "mp_better": 1, "n": 1}
    assert ab["all"]["mp_better"] == 1 and ab["all"]["n"] == 2
    assert "extrapolated" in format_ablation(ab)


def test_groupwise_template_moves_to_the_centre():
    """Two images warped by +u and -u from a base: the groupwise template is nearer the base than either."""
    from diffdef import fields
    from diffdef.template import load_template
    from diffdef_training.baselines import groupwise_template

    template = load_template()
    t1, frac = template.on_working_grid(8)
    grid = template.working_grid(8).grid
    k = torch.arange(grid.shape[0], dtype=torch.float32)
    u = torch.zeros((1, 3) + grid.shape)
    u[:, 0] = 0.8 * torch.sin(k / grid.shape[0] * math.pi)[:, None, None]  # smooth, up to 0.8 voxel along i
    images = torch.cat([fields.warp_image(t1, u), fields.warp_image(t1, -u)])
    fractions = torch.cat([fields.warp_probabilities(frac, u), fields.warp_probabilities(frac, -u)])
    out = groupwise_template(images, fractions, torch.ones(2), grid, iterations=2, demons_iterations=20)
    err = lambda x: float((x - t1).pow(2).mean())
    assert err(out["image"]) < 0.6 * min(err(images[0:1]), err(images[1:2]))
    assert torch.allclose(out["fractions"].sum(1), torch.ones(1), atol=1e-4)


def test_training_pool_neighbourhood_is_exact(tiny_bundle):
    """The cheap candidate preselection returns the N nearest subjects by measured condition."""
    from diffdef.bundle import load_bundle
    from diffdef_training.evaluate import TrainingPool
    from diffdef_training.stages import neighbourhood_weights
    from diffdef_training.synthetic import default_law

    spec = load_bundle(tiny_bundle, networks_wanted=()).spec
    pool = TrainingPool(default_law(), 0, 24, 8)
    values = {"age": 70.0, "ventricle_volume": 30.0}
    idx, w = pool.neighbourhood(spec, values, 3, 0.3)
    measured = torch.tensor([[pool.subject(i).conditions["age"], pool.subject(i).conditions["ventricle_volume"]]
                             for i in range(24)])
    full = neighbourhood_weights(spec.normalise(values)[0], spec.normalise_tensor(measured), 0.3)
    assert idx == torch.argsort(full, descending=True, stable=True)[:3].tolist()
    assert torch.all(w[:-1] >= w[1:])


def test_default_grid_spans_and_exceeds_training_range(tiny_bundle):
    from diffdef.bundle import load_bundle
    from diffdef_training.evaluate import EvalSettings, condition_grid
    from diffdef_training.synthetic import default_law

    spec = load_bundle(tiny_bundle, networks_wanted=()).spec
    grid = condition_grid(EvalSettings(), spec, default_law())
    ages = [c for c in grid if c["sweep"] == "age"]
    vols = [c for c in grid if c["sweep"] == "ventricle"]
    assert [c["age"] for c in ages] == [40, 50, 60, 70, 80, 90]
    assert not ages[0]["in_range"] and not ages[-1]["in_range"]
    high = next(c.high for c in spec.conditions if c.name == "ventricle_volume")
    assert max(c["ventricle_volume"] for c in vols) > high


def test_methods_whose_names_hold_a_comma_are_selected_whole():
    import argparse

    from diffdef_training.evaluate import METHODS, add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    parse = lambda text: p.parse_args(["--methods", text]).methods
    assert parse("DiffDef,DiffDef, no MP loss,MNI template") == ("DiffDef", "DiffDef, no MP loss", "MNI template")
    assert parse("conventional, 1 mm , conventional") == ("conventional, 1 mm", "conventional")
    assert parse(",".join(METHODS)) == METHODS
    assert parse("DiffDef,GAN") == ("DiffDef", "GAN")  # refused by run_evaluation with the valid names
    with pytest.raises(SystemExit):
        parse(" , ")


def test_cli_help_and_bad_method(capsys):
    from diffdef_training.cli import main

    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--help"])
    assert e.value.code == 0
    assert "--ablation" in capsys.readouterr().out
    from diffdef_training.evaluate import EvalSettings, run_evaluation

    with pytest.raises(ValueError, match="Unknown method"):
        run_evaluation(EvalSettings(methods=("DiffDef", "GAN")))
