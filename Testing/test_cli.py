"""The ``diffdef`` command line: outputs, geometry, the exported displacement, trajectories, refusals, bad input."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from diffdef import fields, outputs
from diffdef.cli import main
from diffdef.geometry import Grid, displacement_from_mm, from_sitk, to_sitk
from diffdef.io import read_displacement_itk
from diffdef.template import load_template

FAST = ["--steps", "2", "--no-progress", "--device", "cpu"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def generated(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    code = main(["generate", "--model", str(tiny_bundle), "--age", "70", "--ventricle-volume", "30", "--jacobian",
                 "--seed", "3", *FAST, "-o", str(out)])
    assert code == 0
    return out


def test_generate_writes_every_output(generated):
    names = sorted(p.name for p in generated.iterdir())
    assert names == sorted(["atlas.json", "atlas_t1.nii.gz", "atlas_labels.nii.gz", "atlas_displacement.nii.gz",
                            "atlas_displacement.nrrd", "atlas_jacobian.nii.gz", "atlas_preview.png"])
    meta = json.loads((generated / "atlas.json").read_text())
    assert meta["conditions_requested"] == {"age": 70.0, "ventricle_volume": 30.0}
    assert meta["seed"] == 3 and meta["steps"] == 2 and meta["folding_ratio"] == 0.0
    assert meta["samples"] == json.loads((Path(meta["model"]["path"]) / "model.json").read_text())["sampling"]["samples"]
    assert set(meta["label_volumes_ml"]) == {"CSF", "gray matter", "white matter", "lateral ventricles"}
    # the requested volume is calibrated by default, and the sidecar says from what
    assert meta["calibrate_volumes"] is True and meta["volume_calibration"]["ventricle_volume"]["converged"]
    assert meta["label_volumes_ml"]["lateral ventricles"] == pytest.approx(30.0, rel=0.03)
    assert meta["model"]["path"] and meta["model"]["provenance"]["cohort"] == "synthetic"
    assert meta["diffdef_version"] and meta["warnings"] == []
    assert {"load_s", "sampling_and_decoding_s", "integration_s", "warping_s", "writing_s"} <= set(meta["timings_s"])
    from PIL import Image

    with Image.open(generated / "atlas_preview.png") as im:
        assert im.size[0] > 600 and im.size[1] > 200


def test_no_volume_calibration_keeps_the_decoders_volumes(generated, tiny_bundle, tmp_path, capsys):
    code, _, _ = run(capsys, "generate", "--model", tiny_bundle, "--age", "70", "--ventricle-volume", "30", "--seed", "3",
                     "--no-volume-calibration", *FAST, "-o", tmp_path)
    assert code == 0
    meta = json.loads((tmp_path / "atlas.json").read_text())
    calibrated = json.loads((generated / "atlas.json").read_text())
    assert meta["calibrate_volumes"] is False and meta["volume_calibration"] == {}
    decoder_ml = calibrated["volume_calibration"]["ventricle_volume"]["decoder_ml"]
    assert meta["label_volumes_ml"]["lateral ventricles"] == pytest.approx(decoder_ml, rel=0.03)


@pytest.mark.parametrize("name", ["atlas_t1.nii.gz", "atlas_labels.nii.gz", "atlas_jacobian.nii.gz"])
def test_nifti_geometry_equals_the_template(generated, name):
    template = load_template()
    img = nib.load(str(generated / name))
    assert img.shape == template.grid.shape
    assert np.allclose(img.affine, template.grid.affine, atol=1e-5)
    array, grid = from_sitk(sitk.ReadImage(str(generated / name)))
    assert grid.same_as(template.grid, tol=1e-4)
    assert np.array_equal(array, np.asarray(img.dataobj))
    if name == "atlas_labels.nii.gz":
        assert img.get_data_dtype() == np.uint8 and set(np.unique(array)) <= {0, 1, 2, 3, 4}
    if name == "atlas_jacobian.nii.gz":
        assert array.min() > 0


@pytest.mark.parametrize("name", ["atlas_displacement.nii.gz", "atlas_displacement.nrrd"])
def test_displacement_files_are_on_the_working_grid(generated, tiny_bundle, name):
    """The field is exported on the grid it was integrated on (ITK interpolates it as the core does)."""
    from diffdef.bundle import load_bundle

    work = load_bundle(tiny_bundle).working_grid
    image = sitk.ReadImage(str(generated / name))
    assert image.GetNumberOfComponentsPerPixel() == 3 and image.GetDimension() == 3
    disp, grid = read_displacement_itk(generated / name)
    assert grid.same_as(work, tol=1e-4) and np.all(np.isfinite(disp))
    if name.endswith(".nii.gz"):
        img = nib.load(str(generated / name))  # ANTs layout: 5-D, intent vector
        assert img.shape == work.shape + (1, 3) and img.header.get_intent()[0] == "vector"


CROP_START, CROP_SIZE = (60, 70, 55), (70, 80, 70)  # a block through the ventricles: keeps SimpleITK quick


def _sitk_warp(template, field_path):
    """SimpleITK's warp of the template with the exported field, on a block of the template grid."""
    field = sitk.Cast(sitk.ReadImage(str(field_path)), sitk.sitkVectorFloat64)
    moving = to_sitk(template.t1, template.grid)
    reference = to_sitk(np.zeros(CROP_SIZE, np.float32), template.grid.crop(CROP_START, CROP_SIZE))
    warped = sitk.Resample(moving, reference, sitk.DisplacementFieldTransform(field), sitk.sitkLinear, 0.0,
                           sitk.sitkFloat32)
    return from_sitk(warped)[0]


def _block(array):
    return array[tuple(slice(s, s + n) for s, n in zip(CROP_START, CROP_SIZE))]


@pytest.mark.parametrize("name", ["atlas_displacement.nii.gz", "atlas_displacement.nrrd"])
def test_exported_displacement_warps_as_the_core(generated, name):
    """SimpleITK Resample of the template with the exported field reproduces the generated atlas T1."""
    template = load_template()
    atlas_t1 = np.asarray(nib.load(str(generated / "atlas_t1.nii.gz")).dataobj)
    theirs = _sitk_warp(template, generated / name)
    assert np.abs(theirs - _block(atlas_t1)).max() < 2e-3


def test_writer_exports_a_large_displacement_that_warps_as_the_core(tmp_path):
    """The same check with a displacement of several mm (the tiny model's fields are small), on a block."""
    template = load_template()
    atlas = _small_atlas()
    disp = displacement_from_mm(torch.from_numpy(atlas.displacement_mm).permute(3, 0, 1, 2)[None], atlas.grid)
    atlas.t1 = fields.warp_image(torch.from_numpy(np.ascontiguousarray(atlas.t1))[None, None], disp)[0, 0].numpy()
    assert disp.abs().max() > 2.0
    paths = outputs.write_atlas(atlas, tmp_path, preview=False)
    inner = (slice(8, -8),) * 3  # the core warp saw only the block: compare where x + u(x) stays inside it
    assert np.abs(atlas.t1 - _block(template.t1))[inner].mean() > 0.02  # the warp really moves the anatomy
    for key in ("displacement_itk", "displacement_slicer"):
        theirs = _sitk_warp(template, paths[key])
        assert np.abs(theirs - atlas.t1)[inner].max() < 2e-3, key
        back, grid = read_displacement_itk(paths[key])
        assert np.allclose(back, atlas.displacement_mm, atol=1e-5) and grid.same_as(atlas.grid, tol=1e-4)


def test_trajectory_writes_4d_series(tiny_bundle, tmp_path, capsys):
    code, out, err = run(capsys, "trajectory", "--model", tiny_bundle, "--age", "50:55:5", "--ventricle-volume", "30",
                         *FAST, "-o", tmp_path)
    assert code == 0, err
    img = nib.load(str(tmp_path / "trajectory_t1_4d.nii.gz"))
    assert img.shape == load_template().grid.shape + (2,)
    assert np.allclose(img.affine, load_template().grid.affine, atol=1e-5)
    assert nib.load(str(tmp_path / "trajectory_labels_4d.nii.gz")).shape[3] == 2
    from PIL import Image

    with Image.open(tmp_path / "trajectory.gif") as gif:
        assert gif.n_frames == 2
    rows = list(csv.DictReader(open(tmp_path / "trajectory.csv")))
    assert [float(r["age"]) for r in rows] == [50.0, 55.0]
    assert all(float(r["ventricle_volume"]) == 30.0 for r in rows)
    meta = json.loads((tmp_path / "trajectory.json").read_text())
    assert meta["varying"] == "age" and len(meta["frames"]) == 2


def test_refuses_to_overwrite_and_leaves_files_untouched(generated, tiny_bundle, capsys):
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in generated.iterdir()}
    code, out, err = run(capsys, "generate", "--model", tiny_bundle, "--age", "60", "--jacobian", *FAST,
                         "-o", generated)
    assert code == 2 and "--overwrite" in err and "atlas_t1.nii.gz" in err
    after = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in generated.iterdir()}
    assert after == before  # no file replaced, no temporary file left


def test_a_partly_existing_folder_is_refused_before_any_write(tiny_bundle, tmp_path, capsys):
    (tmp_path / "atlas.json").write_text("mine")
    code, _, err = run(capsys, "generate", "--model", tiny_bundle, *FAST, "-o", tmp_path)
    assert code == 2 and "atlas.json" in err
    assert [p.name for p in tmp_path.iterdir()] == ["atlas.json"] and (tmp_path / "atlas.json").read_text() == "mine"


def _small_atlas():
    """An Atlas on a block of the template grid with a smooth displacement of a few mm (no model needed)."""
    from diffdef.generate import Atlas

    template = load_template()
    grid = template.grid.crop(CROP_START, CROP_SIZE)
    g = torch.Generator().manual_seed(0)
    disp_mm = torch.nn.functional.interpolate(torch.randn(1, 3, 4, 4, 4, generator=g) * 3.0, size=CROP_SIZE,
                                              mode="trilinear", align_corners=True)
    return Atlas(t1=_block(template.t1), labels=_block(template.labels),
                 displacement_mm=disp_mm[0].permute(1, 2, 3, 0).numpy(), grid=grid, conditions={"age": 70.0},
                 seed=0, folding_ratio=0.0, sampling={"steps": 20, "guidance": 1.5, "samples": 1}, label_volumes_ml={},
                 velocity=None, jacobian=np.ones(CROP_SIZE))


def test_interrupted_writing_leaves_the_folder_untouched(tmp_path, monkeypatch):
    (tmp_path / "unrelated.txt").write_text("keep")
    real, calls = outputs.write_image, []

    def second_call_interrupts(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(outputs, "WRITE_THREADS", 1)
    monkeypatch.setattr(outputs, "write_image", second_call_interrupts)
    with pytest.raises(KeyboardInterrupt):
        outputs.write_atlas(_small_atlas(), tmp_path)
    assert len(calls) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["unrelated.txt"]  # no output, no temporary file
    monkeypatch.setattr(outputs, "write_image", real)
    paths = outputs.write_atlas(_small_atlas(), tmp_path)
    assert len(paths) == 7 and all(p.is_file() for p in paths.values())


def test_ctrl_c_exits_130_without_files(tiny_bundle, tmp_path, capsys, monkeypatch):
    from diffdef.generate import AtlasGenerator

    def interrupted(self, *a, progress=None, **k):
        progress(0.3, "Diffusion step 1/2")
        raise KeyboardInterrupt

    monkeypatch.setattr(AtlasGenerator, "generate", interrupted)
    code, _, err = run(capsys, "generate", "--model", tiny_bundle, "--age", "65", *FAST, "-o", tmp_path / "out")
    assert code == 130 and "interrupted" in err
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_out_of_range_warns_and_overwrite_replaces(tiny_bundle, tmp_path, capsys):
    args = ["generate", "--model", tiny_bundle, "--age", "95", *FAST, "--no-preview", "-o", tmp_path]
    code, out, err = run(capsys, *args)
    assert code == 0 and "age = 95 years is outside the training range" in err and "extrapolation" in err
    assert json.loads((tmp_path / "atlas.json").read_text())["warnings"]
    assert run(capsys, *args)[0] == 2
    code, _, err = run(capsys, *args, "--overwrite")
    assert code == 0, err
    assert len(list(tmp_path.iterdir())) == 5


VALID = ("age (years", "ventricle_volume (ml")


@pytest.mark.parametrize("command", ["generate", "trajectory"])
@pytest.mark.parametrize("argv, needle", [
    (["--age", "nan"], "finite"),
    (["--ventricle-volume", "-5"], "negative"),
    (["--height", "180"], "Unknown condition 'height'"),
    (["--condition", "height=180"], "Unknown condition 'height'"),
    (["--age", "old"], "must be a number"),
])
def test_bad_conditions_exit_2_listing_valid_names(tiny_bundle, tmp_path, capsys, command, argv, needle):
    if command == "trajectory":
        argv = argv + (["--ventricle-volume", "20:30:5"] if "--age" in argv else ["--age", "50:60:5"])
    code, _, err = run(capsys, command, "--model", tiny_bundle, *argv, *FAST, "-o", tmp_path / "o")
    assert code == 2, err
    assert all(v in err for v in VALID), err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, needle", [
    (["trajectory", "--age", "50:nan:5"], "NaN"),
    (["trajectory", "--age", "60:50:5"], "STEP"),
    (["trajectory", "--age", "50:60:5", "--ventricle-volume", "10:20:5"], "Only one"),
    (["trajectory", "--age", "50"], "range"),
    (["generate", "--age", "50:60:5"], "ranges are for"),
])
def test_bad_ranges_exit_2(tiny_bundle, tmp_path, capsys, argv, needle):
    code, _, err = run(capsys, *argv, "--model", tiny_bundle, *FAST, "-o", tmp_path / "o")
    assert code == 2 and needle in err, err


@pytest.mark.parametrize("plane, index", [("coronal", -1), ("axial", 999)])
def test_a_slice_outside_the_grid_is_refused_before_generating(tiny_bundle, tmp_path, capsys, plane, index):
    code, out, err = run(capsys, "trajectory", "--model", tiny_bundle, "--age", "50:55:5", "--plane", plane,
                         "--slice", index, *FAST, "-o", tmp_path / "o")
    assert code == 2 and f"Slice {index} is outside the {plane} slices" in err and "0 to " in err, err
    assert not (tmp_path / "o").exists() and "written" not in out


def test_slice_count_follows_the_grid_orientation():
    """The slices of a plane are counted on the axis nearest its normal: a permuted grid has other counts."""
    grid = Grid((30, 40, 50), np.array([[0.0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]]))  # i->A, j->S, k->R
    for plane, count in {"sagittal": 50, "coronal": 30, "axial": 40}.items():
        outputs.check_slice_index(grid, plane, count - 1)
        with pytest.raises(ValueError, match=f"use 0 to {count - 1}"):
            outputs.check_slice_index(grid, plane, count)


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_bad_samples_or_steps_exit_2(tiny_bundle, tmp_path, capsys, value):
    for option in ("--samples", "--steps"):
        with pytest.raises(SystemExit) as exited:  # argparse's usage error
            run(capsys, "generate", "--model", tiny_bundle, "--age", "70", *FAST, option, value, "-o", tmp_path / "o")
        err = capsys.readouterr().err
        assert exited.value.code == 2 and option in err and "at least 1" in err, err
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "four"])
def test_bad_smoothing_exit_2(tiny_bundle, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exited:  # argparse's usage error
        run(capsys, "generate", "--model", tiny_bundle, "--age", "70", *FAST, "--smoothing", value, "-o", tmp_path / "o")
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "--smoothing" in err and "0 or more" in err, err
    assert not (tmp_path / "o").exists()


def test_smoothing_filters_the_averaged_velocity(tiny_generator, tiny_bundle, tmp_path, capsys):
    """``smoothing_mm``: the mean velocity filtered by a Gaussian of that sigma in mm (working-grid voxels x
    spacing); the bundle's value by default, recorded in the sidecar; negative or non-finite values refused."""
    gen, values = tiny_generator, {"age": 70.0, "ventricle_volume": 30.0}
    raw, _, _, used0 = gen.velocity(values, seed=5, steps=2, samples=2, smoothing_mm=0.0)
    smooth, _, _, used = gen.velocity(values, seed=5, steps=2, samples=2, smoothing_mm=12.0)
    assert used == {**used0, "smoothing_mm": 12.0}
    assert torch.allclose(smooth, fields.smooth(raw, 12.0 / float(gen.bundle.working_grid.spacing[0])), atol=1e-6)
    assert smooth.std() < raw.std()
    assert gen.velocity(values, seed=5, steps=2, samples=2)[3]["smoothing_mm"] == \
        gen.bundle.meta["sampling"]["smoothing_mm"] == 0.0  # tiny.yaml: the default, none
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="smoothing must be a finite number of mm >= 0"):
            gen.velocity(values, seed=5, steps=2, smoothing_mm=bad)
    code, _, err = run(capsys, "generate", "--model", tiny_bundle, "--age", "70", *FAST, "--smoothing", "12",
                       "-o", tmp_path / "o")
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "atlas.json").read_text())["smoothing_mm"] == 12.0


def test_without_calibration_the_models_default_smoothing_is_left_out(tiny_generator, monkeypatch):
    """A bundle's default ``smoothing_mm`` pairs with the volume calibration (the filter shrinks the ventricles and
    grows the tissue until the calibration gives them back), so ``calibrate_volumes=False``, which promises the
    decoder's own volumes, leaves it out; an explicit ``smoothing_mm`` is still applied."""
    gen, values, fast = tiny_generator, {"age": 70.0, "ventricle_volume": 30.0}, {"seed": 5, "steps": 2, "samples": 2}
    monkeypatch.setitem(gen.bundle.meta["sampling"], "smoothing_mm", 8.0)
    unfiltered = gen.generate(values, calibrate_volumes=False, smoothing_mm=0.0, **fast)
    plain = gen.generate(values, calibrate_volumes=False, **fast)
    assert plain.sampling["smoothing_mm"] == 0.0 and torch.equal(plain.velocity, unfiltered.velocity)
    asked = gen.generate(values, calibrate_volumes=False, smoothing_mm=8.0, **fast)
    assert asked.sampling["smoothing_mm"] == 8.0 and not torch.allclose(asked.velocity, unfiltered.velocity)
    assert gen.generate(values, **fast).sampling["smoothing_mm"] == 8.0


def test_samples_average_the_velocities_of_one_batch_of_latents(tiny_generator):
    """``samples`` K: the decoder's mean velocity over K latents drawn in one batch, the first of which is the
    latent ``samples=1`` draws with the same seed; K = 1 is a single draw, the result differs from it."""
    from diffdef.sampling import sample_latents

    gen, values = tiny_generator, {"age": 70.0, "ventricle_volume": 30.0}
    one, _, _, used1 = gen.velocity(values, seed=5, steps=2, samples=1)
    three, _, _, used3 = gen.velocity(values, seed=5, steps=2, samples=3)
    assert used1["samples"] == 1 and used3 == {**used1, "samples": 3}
    cond = gen.spec.normalise(values).expand(3, -1)
    latents = sample_latents(gen.bundle.nets["diffusion"], gen.bundle.nets["condition_embedding"],
                             gen.bundle.meta["architecture"]["scheduler"], cond, gen.bundle.latent_shape, steps=2,
                             guidance=used1["guidance"], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        each = torch.cat([gen.bundle.nets["decoder"](latents[i:i + 1], cond[:1]) for i in range(3)])
    assert torch.allclose(each[:1], one, atol=1e-5)
    assert torch.allclose(each.mean(0, keepdim=True), three, atol=1e-5)
    assert not torch.allclose(one, three, atol=1e-4)
    default = gen.generate(values, seed=5, steps=2)
    assert default.sampling["samples"] == gen.bundle.meta["sampling"].get("samples", 1)


def test_bad_model_folder_exit_2(tmp_path, capsys):
    code, _, err = run(capsys, "generate", "--model", tmp_path, "--age", "70", "-o", tmp_path / "o")
    assert code == 2 and "not a DiffDef model bundle" in err and "model.json" in err
    (tmp_path / "model.json").write_text("{broken")
    code, _, err = run(capsys, "generate", "--model", tmp_path, "--age", "70", "-o", tmp_path / "o")
    assert code == 2 and "model.json" in err


def test_corrupt_weights_exit_2(tiny_bundle, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bad)
    (bad / "decoder.safetensors").write_bytes(b"garbage")
    code, _, err = run(capsys, "generate", "--model", bad, *FAST, "-o", tmp_path / "o")
    assert code == 2 and "decoder.safetensors" in err


def test_a_bundle_reads_the_weights_it_shares_with_another(tiny_bundle, tmp_path, capsys):
    """share-weights: a variant bundle (here, one with its own decoder) keeps only its differing file; it loads to
    the same networks, and a missing or damaged shared file is refused with a message that says what to do."""
    import shutil

    from safetensors.torch import load_file, save_file

    from diffdef.bundle import BundleError, load_bundle, sha256
    from diffdef_training.cli import main as train_main

    base, variant = tmp_path / "models" / "base", tmp_path / "variants" / "v"
    shutil.copytree(tiny_bundle, base)
    shutil.copytree(tiny_bundle, variant)
    decoder = {k: v + 0.01 for k, v in load_file(str(variant / "decoder.safetensors")).items()}
    save_file(decoder, str(variant / "decoder.safetensors"))
    meta = json.loads((variant / "model.json").read_text())
    meta["weights"]["decoder"]["sha256"] = sha256(variant / "decoder.safetensors")
    (variant / "model.json").write_text(json.dumps(meta))
    assert train_main(["share-weights", str(variant), "--base", str(base)]) in (None, 0)
    assert "now reads condition_embedding, diffusion, image_decoder, registration from" in capsys.readouterr().out
    assert sorted(p.name for p in variant.iterdir()) == ["decoder.safetensors", "model.json"]
    files = {n: e["file"] for n, e in json.loads((variant / "model.json").read_text())["weights"].items()}
    assert files["diffusion"] == "../../models/base/diffusion.safetensors" and files["decoder"] == "decoder.safetensors"
    own, ref = load_bundle(variant), load_bundle(tiny_bundle)
    for name in ("diffusion", "registration"):
        assert all(torch.equal(a, b) for a, b in zip(own.nets[name].state_dict().values(),
                                                     ref.nets[name].state_dict().values()))
    assert not torch.equal(next(iter(own.nets["decoder"].state_dict().values())),
                           next(iter(ref.nets["decoder"].state_dict().values())))
    assert train_main(["share-weights", str(variant), "--base", str(base)]) in (None, 0)  # again: nothing to do
    assert "now reads no network" in capsys.readouterr().out
    (base / "registration.safetensors").write_bytes(b"garbage")
    with pytest.raises(BundleError, match="Checksum mismatch for registration.safetensors"):
        load_bundle(variant)
    shutil.rmtree(base)
    code, _, err = run(capsys, "generate", "--model", variant, *FAST, "-o", tmp_path / "o")
    assert code == 2 and "from another bundle" in err and "keep the two bundles where they were" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["generate", "trajectory", "compare"])
def test_help_has_units_and_examples(tiny_bundle, capsys, command):
    with pytest.raises(SystemExit) as exc:
        main([command, "--model", str(tiny_bundle), "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "years" in text and "--ventricle-volume" in text and "--seed" in text


def test_compare_missing_subject_exit_2(tiny_bundle, tmp_path, capsys):
    code, _, err = run(capsys, "compare", tmp_path / "nope.nii.gz", "--model", tiny_bundle, "--age", "70", *FAST,
                       "-o", tmp_path / "o")
    assert code == 2 and "not found" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_compare_writes_every_output(tiny_bundle, tmp_path, capsys):
    """The template as its own subject, with its own labels: Dice 1 and every file (about 30 s of CPU). The tiny
    decoder's own atlas is nearly the template; the calibration would give it the tiny cohort's tissue (GM -6 % at
    70 y), more than the tiny registration network recovers (CSF Dice 0.84)."""
    from diffdef.io import write_image

    template = load_template()
    write_image(tmp_path / "subject.nii.gz", template.t1, template.grid)
    write_image(tmp_path / "seg.nii.gz", template.labels, template.grid)
    code, out, err = run(capsys, "compare", tmp_path / "subject.nii.gz", "--labels", tmp_path / "seg.nii.gz",
                         "--model", tiny_bundle, "--age", "70", "--no-volume-calibration", *FAST, "-o", tmp_path / "cmp")
    assert code == 0, err
    names = {p.name for p in (tmp_path / "cmp").iterdir()}
    assert names == {p.name for p in outputs.comparison_paths(tmp_path / "cmp", with_labels=True).values()}
    rows = list(csv.DictReader(open(tmp_path / "cmp" / "compare.csv")))
    assert len(rows) == 4 and all(float(r["dice"]) > 0.9 for r in rows)
    img = nib.load(str(tmp_path / "cmp" / "compare_log_jacobian.nii.gz"))
    assert img.shape == template.grid.shape and np.allclose(img.affine, template.grid.affine, atol=1e-5)


def test_the_console_entry_exits_with_mains_status_and_flushed_output(tiny_bundle, tmp_path):
    """``python -m diffdef.cli`` ends with ``os._exit`` (no interpreter teardown): the exit status is main's and
    everything printed reaches the pipe, for a refusal (2) and a trajectory that writes files (0)."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "diffdef.cli"]
    refused = subprocess.run(command + ["generate", "--model", str(tiny_bundle), "--age", "nan",
                                        "-o", str(tmp_path / "r")], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "finite number" in refused.stderr and not (tmp_path / "r").exists()
    done = subprocess.run(command + ["trajectory", "--model", str(tiny_bundle), "--age", "50:55:5", *FAST,
                                     "-o", str(tmp_path / "t")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith(f"written to {tmp_path / 't'}/")
    assert json.loads((tmp_path / "t" / "trajectory.json").read_text())["varying"] == "age"
