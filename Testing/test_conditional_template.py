"""The evaluation's conditional template network (diffdef_training.conditional_template): its training objective,
the bundle it writes, how that bundle generates, and its refusals."""
from __future__ import annotations

import json

import pytest
import torch


def test_each_template_is_registered_to_its_own_subject_without_diffdefs_terms(tiny_bundle, tmp_path, monkeypatch):
    """Dalca-style: the template of subject i's conditions is scored against subject i alone, and DiffDef's
    requested-volume, neighbourhood-volume and shape terms are off."""
    from diffdef.bundle import load_bundle
    from diffdef_training import conditional_template as ct
    from diffdef_training.engine import init_distributed
    from diffdef_training.pipeline import prepared_cohort

    bundle = load_bundle(tiny_bundle)
    recorded = ct.recorded_config(bundle)
    assert recorded.decoder.volume_labels and recorded.decoder.neighbourhood_volume_labels  # the tiny config has them
    cfg = ct.objective_config(recorded, steps=2, batch_size=2)
    cohort = prepared_cohort(cfg, progress=False)
    calls = []

    class Recording(ct.DecoderObjective):
        def loss(self, velocity, atlas, disp, condition, neighbour_images, weights=None):
            calls.append((condition.clone(), neighbour_images.clone()))
            assert not self.has_volume_terms and not self.has_neighbourhood_shape
            return super().loss(velocity, atlas, disp, condition, neighbour_images, weights)

    monkeypatch.setattr(ct, "DecoderObjective", Recording)
    ct.train_conditional_template(cfg, init_distributed("cpu"), cohort, tmp_path, bundle.nets["image_decoder"],
                                  bundle.nets["registration"], bundle.latent_shape, progress=False)
    assert len(calls) == 4  # 2 steps x 2 subjects
    for condition, images in calls:
        assert images.shape[0] == 1
        (i,) = [n for n in range(len(cohort)) if torch.equal(cohort.images[n], images[0])]
        known = ~torch.isnan(condition)
        assert torch.equal(condition[known], cohort.conditions[i][known])


def test_bundle_shares_the_base_networks(tiny_bundle, tiny_conditional_template):
    from diffdef.bundle import load_bundle

    meta = json.loads((tiny_conditional_template / "model.json").read_text())
    assert meta["weights"]["decoder"]["file"] == "decoder.safetensors"
    for name in ("diffusion", "condition_embedding", "registration"):
        assert (tiny_conditional_template / meta["weights"][name]["file"]).resolve() == \
            (tiny_bundle / f"{name}.safetensors").resolve()
        assert not (tiny_conditional_template / f"{name}.safetensors").exists()
    assert meta["architecture"]["decoder"]["latent_input"] is False and meta["sampling"]["samples"] == 1
    assert meta["provenance"]["base_bundle"] == str(tiny_bundle)
    assert meta["provenance"]["conditional_template"]["steps"] == 3
    ct = load_bundle(tiny_conditional_template)
    assert not ct.uses_latents and load_bundle(tiny_bundle).uses_latents
    assert not (tiny_conditional_template.parent / "bundle.partial").exists()


def test_generation_is_one_deterministic_atlas_per_condition(tiny_conditional_template):
    """No latent is sampled: the seed changes nothing, the conditions do (after three steps, a little)."""
    from diffdef.generate import AtlasGenerator

    gen = AtlasGenerator(tiny_conditional_template, device="cpu")
    a = gen.generate({"age": 60, "ventricle_volume": 25}, seed=0, calibrate_volumes=False)
    b = gen.generate({"age": 60, "ventricle_volume": 25}, seed=1, calibrate_volumes=False)
    c = gen.generate({"age": 80, "ventricle_volume": 25}, seed=0, calibrate_volumes=False)
    assert torch.equal(a.velocity, b.velocity)
    assert not torch.equal(a.velocity, c.velocity)
    assert a.sampling["steps"] == 0 and a.sampling["samples"] == 1 and a.folding_ratio == 0.0
    assert a.warnings == []
    asked = gen.generate({"age": 60, "ventricle_volume": 25}, seed=0, steps=5, calibrate_volumes=False)
    assert torch.equal(asked.velocity, a.velocity) and "samples nothing" in asked.warnings[0]
    calibrated = gen.generate({"age": 60, "ventricle_volume": 25})  # as diffdef generate runs it
    assert calibrated.label_volumes_ml["lateral ventricles"] == pytest.approx(25, rel=0.03)


def test_refusals_write_nothing(tiny_bundle, tiny_conditional_template, tmp_path):
    from diffdef_training.conditional_template import run

    before = sorted(p.name for p in tiny_conditional_template.iterdir())
    with pytest.raises(FileExistsError, match="already exists and is not empty; nothing was written"):
        run(tiny_bundle, tiny_conditional_template, tmp_path / "run", steps=1, progress=False, device="cpu")
    assert sorted(p.name for p in tiny_conditional_template.iterdir()) == before
    with pytest.raises(ValueError, match="is itself a conditional template bundle"):
        run(tiny_conditional_template, tmp_path / "out", tmp_path / "run", steps=1, progress=False, device="cpu")
    with pytest.raises(FileExistsError, match="add --resume to continue it"):  # the fixture's run folder
        run(tiny_bundle, tmp_path / "out", tiny_conditional_template.parent / "ct-run", steps=1, progress=False,
            device="cpu")
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_command_line(tiny_bundle, tmp_path, capsys):
    from diffdef_training.cli import main

    main(["conditional-template", str(tiny_bundle), "--output", str(tmp_path / "ct"), "--run", str(tmp_path / "run"),
          "--steps", "1", "--no-progress", "--device", "cpu"])
    assert f"conditional template bundle written to {tmp_path / 'ct'}" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="error: .* already exists"):
        main(["conditional-template", str(tiny_bundle), "--output", str(tmp_path / "ct"), "--run",
              str(tmp_path / "run2"), "--steps", "1", "--no-progress"])


def test_generate_command_warns_that_sampling_options_do_not_apply(tiny_conditional_template, tmp_path, capsys):
    from diffdef.cli import main

    assert main(["generate", "--model", str(tiny_conditional_template), "--age", "60", "--ventricle-volume", "25",
                 "--steps", "5", "--no-preview", "-o", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "warning: This model is a conditional template network" in captured.out + captured.err
    assert json.loads((tmp_path / "atlas.json").read_text())["steps"] == 0
