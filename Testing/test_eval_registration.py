"""Smoke tests of the registration report (issue 5: tiny bundle, 2 held-out pairs, few demons iterations) and of
the centrality-bias measurement."""
from __future__ import annotations

import math


def test_eval_registration_smoke(tiny_bundle, tmp_path, capsys):
    from diffdef_training.eval_registration import main

    out = tmp_path / "registration.md"
    assert main(["--model", str(tiny_bundle), "--pairs", "2", "--demons-iterations", "5", "--bspline-iterations", "3",
                 "--out", str(out)]) == 0
    text = out.read_text()
    assert "ANTs is not installed" in text
    for method in ("before registration", "network", "SimpleITK demons", "SimpleITK BSpline"):
        assert f"| all | {method} | 2 |" in text
    assert "| template->subject | network | 1 |" in text and "| subject->subject | network | 1 |" in text
    assert "| all | network |" in capsys.readouterr().out


def test_eval_registration_values(tiny_bundle):
    from diffdef_training.eval_registration import evaluate

    result = evaluate(tiny_bundle, pairs=2, demons_iterations=5, bspline=False, log=None)
    rows = {(r["pairs"], r["method"]): r for r in result["rows"]}
    assert set(m for _, m in rows) == {"before registration", "network", "SimpleITK demons"}
    for r in rows.values():
        assert all(0.0 <= d <= 1.0 for d in r["dice"].values() if not math.isnan(d))
        assert 0.0 <= r["folding"] <= 100.0
    assert rows[("all", "network")]["folding"] == 0.0  # scaling and squaring of a smooth velocity


def test_centrality_bias_smoke(tiny_bundle, tmp_path, capsys):
    from diffdef_training.centrality_bias import COLUMNS, main

    out = tmp_path / "bias.md"
    assert main(["--model", str(tiny_bundle), "--conditions", "60,70:30", "--neighbours", "4", "--pool", "6",
                 "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 60 ") or line.startswith("| 70 ")]
    assert len(rows) == 2 and rows[1].startswith("| 70 | 30.0 |")
    for row in rows:
        values = dict(zip(COLUMNS, (float(v) for v in row.strip("| ").split(" | ")[2:]), strict=True))
        assert all(math.isfinite(v) for v in values.values())
        assert all(v >= 0 for c, v in values.items() if not c.startswith("recovered"))  # RMS norms, mm
    assert "| 60 |" in capsys.readouterr().out


def test_centrality_bias_regions_split_the_brain(tiny_bundle):
    """The near-LV and elsewhere parts partition the brain: their mean squared biases, weighted by their voxel
    shares, give the whole brain's, and the whole brain's recovered fractions lie between the parts'."""
    from diffdef_training.centrality_bias import measure

    for row in measure(tiny_bundle, [(60.0, None), (70.0, 45.0)], neighbours=4, pool=6, progress=False):
        f = row["near LV fraction"]
        assert 0 < f < 1
        for bias in ("bias forward", "bias symmetric"):
            whole = f * row[f"{bias}, near LV"] ** 2 + (1 - f) * row[f"{bias}, elsewhere"] ** 2
            assert math.isclose(whole, row[bias] ** 2, rel_tol=1e-4)
        for recovered in ("recovered", "recovered symmetric"):  # ratios over the same |t|^2: the whole lies between
            parts = row[f"{recovered}, near LV"], row[f"{recovered}, elsewhere"]
            assert min(parts) - 1e-6 <= row[recovered] <= max(parts) + 1e-6


def test_centrality_bias_measures_a_runs_registration_network(tiny_run, tiny_bundle, tmp_path, capsys):
    """``--registration RUN/registration`` screens a run's network on the bundle's neighbourhood: the network the
    bundle was exported from gives the bundle's rows, another network other rows; a file of another architecture
    is refused with the mismatch named, and nothing is written."""
    import shutil

    import pytest
    import torch
    from safetensors.torch import load_file, save_file

    from diffdef_training.centrality_bias import main, measure

    kw = dict(conditions=[(60.0, None)], neighbours=4, pool=6, progress=False)
    assert measure(tiny_bundle, **kw, registration=tiny_run / "registration") == measure(tiny_bundle, **kw)
    state = load_file(str(tiny_run / "registration" / "registration.safetensors"))
    other = tmp_path / "other"
    other.mkdir()
    save_file({k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()},
              str(other / "registration.safetensors"))
    assert measure(tiny_bundle, **kw, registration=other) != measure(tiny_bundle, **kw)
    bad = tmp_path / "bad.safetensors"
    save_file({k: v for k, v in list(state.items())[1:]}, str(bad))
    before = load_file(str(tiny_bundle / "registration.safetensors"))
    with pytest.raises(SystemExit):
        main(["--model", str(tiny_bundle), "--registration", str(bad), "--neighbours", "2", "--pool", "3",
              "--no-progress", "--out", str(tmp_path / "x.md")])
    assert "do not match the architecture" in capsys.readouterr().err and not (tmp_path / "x.md").exists()
    assert all(torch.equal(before[k], v) for k, v in load_file(str(tiny_bundle / "registration.safetensors")).items())
    with pytest.raises(SystemExit):
        main(["--model", str(tiny_bundle), "--registration", str(tmp_path / "missing"), "--no-progress"])
    assert "does not exist: give a training run's registration stage folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--registration", str(other), "--sigmas", "0.3"])
    assert "give one of them" in capsys.readouterr().err
    shutil.rmtree(other)


def test_centrality_bias_refuses_bad_conditions(tmp_path, capsys):
    import pytest

    from diffdef_training.centrality_bias import main

    for bad in ("50:-3", "nan", "fifty"):
        with pytest.raises(SystemExit) as exc:
            main(["--conditions", bad, "--out", str(tmp_path / "x.md")])
        assert exc.value.code == 2
    assert "AGE or AGE:VOLUME" in capsys.readouterr().err
    assert not (tmp_path / "x.md").exists()


def test_centrality_target_when_every_subject_is_drawn_does_not_depend_on_sigma(tiny_bundle):
    """With as many training subjects as the decoder draws neighbours (4 in the tiny config), every subject is
    drawn every time: the centrality's zero is their plain mean, whatever the Gaussian width; with fewer drawn,
    a narrow width moves it."""
    from diffdef_training.centrality_bias import TARGET_COLUMNS, target_error

    all_drawn = target_error(tiny_bundle, [(60.0, 30.0)], sigmas=(0.5, 100.0), size=4, draws=20, progress=False)
    assert [r["sigma"] for r in all_drawn] == [0.5, 100.0]
    for c in ("target error", "age offset", "volume offset", "tissue offset %") + TARGET_COLUMNS[5:]:
        assert math.isclose(all_drawn[0][c], all_drawn[1][c], rel_tol=1e-5, abs_tol=1e-6)
    assert all_drawn[1]["effective n"] > 3.99  # a very wide neighbourhood weighs all alike
    some_drawn = target_error(tiny_bundle, [(60.0, 30.0)], sigmas=(0.5, 100.0), size=12, draws=50, progress=False)
    assert some_drawn[0]["target error"] != some_drawn[1]["target error"]
    assert all(math.isfinite(r[c]) for r in some_drawn for c in TARGET_COLUMNS)
    assert some_drawn[0]["effective n"] < 11 < some_drawn[1]["effective n"]


def test_centrality_target_dice_separates_the_skew_from_the_individual_variation(tiny_bundle):
    """One training subject, drawn every time, asked at its own drawn conditions: the neighbourhood has no skew, so
    its centroid's atlas and the skew-removed one are the same, and both differ from the true atlas only by that
    subject's individual variation (Dice below 1). Asked at other conditions, the skew separates the two."""
    from diffdef_training.centrality_bias import target_error
    from diffdef_training.synthetic import drawn_conditions

    age, volume = drawn_conditions(0, 0)
    own, other = target_error(tiny_bundle, [(age, volume), (age + 15.0, volume * 2.5)], sigmas=(0.5,), size=1,
                              draws=2, progress=False)
    for label in ("GM", "WM", "LV"):
        assert math.isclose(own[f"Dice {label}"], own[f"Dice {label}, skew removed"], abs_tol=2e-3)
        assert 0.5 < own[f"Dice {label}"] < 0.999
    assert other["Dice LV"] < other["Dice LV, skew removed"] - 0.05  # the skew: half the ventricles' volume


def test_centrality_bias_refuses_bad_sigmas(tmp_path, capsys):
    import pytest

    from diffdef_training.centrality_bias import main

    for bad in ("0.3,abc", "0", "-1", "nan"):
        with pytest.raises(SystemExit) as exc:
            main(["--sigmas", bad, "--out", str(tmp_path / "x.md")])
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "give comma-separated numbers" in err and "finite number > 0" in err
    assert not (tmp_path / "x.md").exists()


def test_objective_along_evaluates_the_decoders_own_loss(tiny_bundle):
    """``--objective``: the bundle's decoder loss along the line from its atlas to the truth. The loss is the
    recorded config's weighted sum of the terms it prints; the line ends at the truth (the atlas error falls to the
    interpolation error between grids, and the ventricles' 1 mm Dice rises); and the draws are the same at every
    fraction, so a fraction given twice gives the same row."""
    from diffdef.bundle import load_bundle
    from diffdef_training.centrality_bias import OBJECTIVE_COLUMNS, objective_along
    from diffdef_training.config import load_config

    rows = objective_along(tiny_bundle, [(75.0, 45.0)], fractions=(0.0, 1.0, 0.0), draws=3, progress=False)
    assert [r["fraction"] for r in rows] == [0.0, 1.0, 0.0]
    assert rows[0] == rows[2]
    d = load_config(None, overrides=load_bundle(tiny_bundle, networks_wanted=()).meta["provenance"]["config"]).decoder
    for r in rows:
        assert all(math.isfinite(r[c]) for c in OBJECTIVE_COLUMNS)
        weighted = (d.sim_weight * r["similarity"] + d.smooth_weight * r["smoothness"] + d.mp_weight * r["centrality"]
                    + d.volume_weight * r["volume"] + d.neighbourhood_volume_weight * r["neighbourhood volume"])
        assert math.isclose(r["loss"], weighted, rel_tol=1e-4, abs_tol=1e-6)
    model, truth = rows[0], rows[1]
    assert truth["atlas error"] < 0.25 * model["atlas error"]
    assert truth["Dice LV"] > model["Dice LV"] + 0.2  # 8 mm grid here: the truth itself scores 0.86


def test_objective_along_refuses_bad_fractions(tmp_path, capsys):
    import pytest

    from diffdef_training.centrality_bias import main

    for bad in (["--objective", "0,x"], ["--objective", "1.5"], ["--objective", "0,1", "--sigmas", "0.3"],
                ["--objective", "0", "--draws", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(bad + ["--out", str(tmp_path / "x.md")])
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "give comma-separated fractions" in err and "must lie in [0, 1]" in err
    assert "without --sigmas and --registration" in err and "--draws must be at least 1" in err
    assert not (tmp_path / "x.md").exists()
