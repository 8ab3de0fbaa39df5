"""Real-cohort ingestion: manifest validation, preprocessing that undoes a random affine, cache, report, dataset, CLI."""
from __future__ import annotations

import csv
import json
import math
import shutil

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from diffdef.geometry import Grid, from_sitk, ras_to_lps, to_sitk
from diffdef.io import write_image
from diffdef.template import CROP_SIZE, CROP_START, GM, WM, load_template
from diffdef_training import cohort
from diffdef_training.cohort import (CohortDataset, ManifestError, PreprocessOptions, collate, preprocess_cohort,
                                     preprocess_main, preprocess_subject, read_manifest)

sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def random_affine(rng: np.random.Generator) -> sitk.AffineTransform:
    """Rotation up to 10 deg about each axis, scale +-8 % per axis, shift +-10 mm, about the brain centre (LPS)."""
    a = np.deg2rad(rng.uniform(-10, 10, 3))
    c, s = np.cos(a), np.sin(a)
    rx = np.array([[1, 0, 0], [0, c[0], -s[0]], [0, s[0], c[0]]])
    ry = np.array([[c[1], 0, s[1]], [0, 1, 0], [-s[1], 0, c[1]]])
    rz = np.array([[c[2], -s[2], 0], [s[2], c[2], 0], [0, 0, 1]])
    t = sitk.AffineTransform(3)
    t.SetMatrix((rz @ ry @ rx @ np.diag(rng.uniform(0.92, 1.08, 3))).ravel().tolist())
    t.SetTranslation(rng.uniform(-10, 10, 3).tolist())
    t.SetCenter([0.0, 18.0, 18.0])
    return t


def make_subject(folder, name, transform, spacing=2.0, gain=800.0, seed=0):
    """Template resampled through ``transform`` (subject point -> template point) onto a 2 mm subject grid, with
    an intensity gain and noise: (image path, label path)."""
    t = load_template()
    shape = tuple(int(math.ceil(n / spacing)) for n in t.grid.shape)
    affine = np.diag([spacing] * 3 + [1.0])
    affine[:3, 3] = t.grid.affine[:3, 3] + (spacing - 1) / 2
    grid = Grid(shape, affine)
    ref = to_sitk(np.zeros(shape, np.float32), grid)
    img = from_sitk(sitk.Resample(to_sitk(t.t1, t.grid), ref, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))[0]
    lab = from_sitk(sitk.Resample(to_sitk(t.labels, t.grid), ref, transform, sitk.sitkNearestNeighbor, 0,
                                  sitk.sitkUInt8))[0]
    noise = np.random.default_rng(seed).normal(0, 0.01, shape)
    img = (gain * (img + noise * (img > 0))).astype(np.float32)
    ip, lp = folder / f"{name}_t1.nii.gz", folder / f"{name}_labels.nii.gz"
    write_image(ip, img, grid)
    write_image(lp, lab.astype(np.uint8), grid)
    return ip, lp


def template_labels_working(factor=4):
    t = load_template()
    return t.on_working_grid(factor)[1][0].argmax(0).numpy()


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cohort")
    rng = np.random.default_rng(2024)
    transforms = [random_affine(rng) for _ in range(2)]
    paths = [make_subject(folder, f"sub{i}", tr, seed=i) for i, tr in enumerate(transforms)]
    return folder, paths, transforms


@pytest.fixture(scope="module")
def cohort_run(subjects, tmp_path_factory):
    """A 4-row manifest: two good subjects (one without labels), one that fails in preprocessing (empty image),
    a missing value. Preprocessed once, with a counting hook."""
    folder, paths, _ = subjects
    zero = folder / "empty.nii.gz"
    write_image(zero, np.zeros((20, 20, 20), np.float32), Grid((20, 20, 20), np.diag([8.0, 8, 8, 1])))
    manifest = folder / "manifest.csv"
    manifest.write_text("subject,image,labels,age,ventricle_volume\n"
                        f"a,{paths[0][0].name},{paths[0][1].name},63,21.5\n"
                        f"b,{paths[1][0].name},,NA,30\n"
                        f"c,{zero.name},,70,\n")
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0])
        return preprocess_subject(*args, **kwargs)

    cache = tmp_path_factory.mktemp("cache")
    report = cache / "report.csv"
    ds, records = preprocess_cohort(manifest, cache, report=report, conditions=["age", "ventricle_volume"],
                                    progress=False, preprocess=counting)
    return dict(manifest=manifest, cache=cache, report=report, ds=ds, records=records, calls=list(calls),
                counting=counting, calls_list=calls)


# ---------------------------------------------------------------------------------------------------- must show


def test_preprocessing_undoes_a_random_affine(subjects):
    """Must show: after preprocessing, the subject's labels overlap the template's with Dice >= 0.9 for GM and WM."""
    _, paths, transforms = subjects
    ref = template_labels_working()
    t = load_template()
    for (ip, lp), truth in zip(paths, transforms):
        result = preprocess_subject(ip, lp, PreprocessOptions(keep_fine=True))
        assert result.image.shape == ref.shape == (40, 48, 40)
        assert result.grid.same_as(t.working_grid().grid)
        d_gm, d_wm = dice(result.labels == GM, ref == GM), dice(result.labels == WM, ref == WM)
        print(f"{ip.name}: Dice GM {d_gm:.3f} WM {d_wm:.3f}, {result.info['seconds']:.2f} s")
        assert d_gm >= 0.9 and d_wm >= 0.9
        # the fitted transform (template -> subject) composed with the truth (subject -> template) is ~ identity
        pts = t.grid.voxel_to_world(np.argwhere(t.labels[::6, ::6, ::6] > 0) * 6)
        err = [np.linalg.norm(np.asarray(truth.TransformPoint(result.transform.TransformPoint(p))) - p)
               for p in ras_to_lps(pts)]
        assert np.mean(err) < 1.5 and np.max(err) < 3.0, (np.mean(err), np.max(err))
        # intensities land on the template's scale
        sl = tuple(slice(s, s + n) for s, n in zip(CROP_START, CROP_SIZE))
        assert np.abs(result.fine_image - t.t1[sl]).mean() < 0.03
        assert float(result.fine_image[0, 0, 0]) == 0.0  # background stays 0
        assert np.abs(result.image - t.on_working_grid()[0][0, 0].numpy()).mean() < 0.02


def test_label_volumes_are_recorded_in_template_space(subjects):
    """Each subject is the template resampled through an affine (det 0.94 and 1.15): its label volumes, counted
    natively and divided by the fitted affine's determinant, are the template's within 0.5 % for GM and WM (a
    native count is 6 and 15 % off) and 3 % for the ventricles (16.9 ml on a 2 mm grid). The determinant is
    recorded too: the inverse of the true affine's (subject -> template) within 1 %."""
    _, paths, transforms = subjects
    t = load_template()
    truth = np.bincount(t.labels.ravel().astype(np.int64), minlength=5) * t.grid.voxel_volume_ml
    for (ip, lp), true_transform in zip(paths, transforms):
        info = preprocess_subject(ip, lp).info
        volumes = np.array(info["label_volumes_ml"])
        true_det = abs(np.linalg.det(np.reshape(true_transform.GetMatrix(), (3, 3))))
        assert abs(true_det - 1) > 0.05 and info["affine_determinant"] == pytest.approx(1 / true_det, rel=0.01)
        assert volumes.shape == (5,)
        np.testing.assert_allclose(volumes[[GM, WM]], truth[[GM, WM]], rtol=0.005)
        np.testing.assert_allclose(volumes[4], truth[4], rtol=0.03)
    assert "label_volumes_ml" not in preprocess_subject(paths[0][0]).info  # no label map, no volumes


# ---------------------------------------------------------------------------------------------------- runner, cache


def test_runner_reports_failures_and_keeps_going(cohort_run, subjects):
    """The report has a row per subject, with its registration's affine determinant and final metric (quality
    control: a failed registration scales the brain), empty where preprocessing failed."""
    records = cohort_run["records"]
    assert [r["status"] for r in records] == ["ok", "ok", "failed"]
    assert records[2]["row"] == 3 and records[2]["line"] == 4
    assert "empty.nii.gz is constant (every voxel = 0): nothing to register" in records[2]["error"]
    with open(cohort_run["report"]) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    assert "empty.nii.gz" in rows[2]["image"] and rows[2]["error"]
    assert len(cohort_run["ds"]) == 2
    true_dets = [abs(np.linalg.det(np.reshape(t.GetMatrix(), (3, 3)))) for t in subjects[2]]  # subject -> template
    assert [float(r["affine_determinant"]) for r in rows[:2]] == pytest.approx([1 / d for d in true_dets], rel=0.01)
    assert all(float(r["registration_metric"]) < 0 for r in rows[:2])  # Mattes MI, lower is better
    assert rows[2]["affine_determinant"] == rows[2]["registration_metric"] == ""


def test_second_run_is_a_cache_hit(cohort_run, tmp_path):
    calls = cohort_run["calls_list"]
    calls.clear()
    report = tmp_path / "report.json"
    ds, records = preprocess_cohort(cohort_run["manifest"], cohort_run["cache"], report=report,
                                    conditions=["age", "ventricle_volume"], progress=False,
                                    preprocess=cohort_run["counting"])
    # the two good subjects come from the cache; only the failing one is retried
    assert [r["status"] for r in records] == ["cached", "cached", "failed"]
    assert len(calls) == 1 and calls[0].name == "empty.nii.gz"
    assert json.loads(report.read_text())[0]["status"] == "cached"
    a, b = cohort_run["ds"][0], ds[0]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["labels"], b["labels"])
    # other options -> another key
    cache = cohort.PreprocessCache(cohort_run["cache"])
    r0 = read_manifest(cohort_run["manifest"], ["age", "ventricle_volume"]).rows[0]
    assert cache.key(r0.image, r0.labels, PreprocessOptions()) != cache.key(r0.image, r0.labels,
                                                                           PreprocessOptions(n4=True))
    assert not list(cohort_run["cache"].glob("*/.*"))  # no temporary folders left behind
    entry = cache.path(cache.key(r0.image, r0.labels, PreprocessOptions()))
    assert isinstance(sitk.ReadTransform(str(entry / "transform.tfm")), sitk.Transform)


def test_dataset_items(cohort_run):
    ds: CohortDataset = cohort_run["ds"]
    item = ds[0]
    assert item["label_volumes_ml"].shape == (5,) and item["label_volumes_ml"].dtype == torch.float64
    assert item["image"].shape == (1, 40, 48, 40) and item["image"].dtype == torch.float32
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert item["labels"].shape == (1, 40, 48, 40)
    assert item["conditions"].tolist() == [63.0, 21.5]
    second = ds[1]
    assert second["labels"] is None and "label_volumes_ml" not in second
    assert math.isnan(second["conditions"][0]) and second["conditions"][1] == 30.0
    batch = collate([item, second])
    assert batch["image"].shape == (2, 1, 40, 48, 40) and batch["labels"][1] is None
    assert torch.isnan(ds.conditions()).sum() == 1


def test_an_entry_cached_before_label_volumes_gets_them_on_the_next_run(cohort_run, tmp_path):
    """An entry written before preprocessing recorded label volumes and the affine's determinant: the next run adds
    them (the same as a fresh entry's), replacing meta.json atomically, without preprocessing the subject again."""
    cache = cohort.PreprocessCache(tmp_path / "cache")
    shutil.copytree(cohort_run["cache"], cache.root, dirs_exist_ok=True)
    r0, r1 = read_manifest(cohort_run["manifest"], ["age", "ventricle_volume"]).rows[:2]
    key, unlabelled = (cache.key(r.image, r.labels, PreprocessOptions()) for r in (r0, r1))
    fresh = cache.meta(key)["info"]["label_volumes_ml"]
    fresh_dets = [cache.meta(k)["info"]["affine_determinant"] for k in (key, unlabelled)]
    old = cache.meta(key)
    del old["info"]["label_volumes_ml"], old["info"]["affine_determinant"]
    (cache.path(key) / "meta.json").write_text(json.dumps(old))
    old_unlabelled = cache.meta(unlabelled)
    del old_unlabelled["info"]["affine_determinant"]
    (cache.path(unlabelled) / "meta.json").write_text(json.dumps(old_unlabelled))
    entry = {"folder": str(cache.path(key)), "conditions": [63.0, 21.5], "subject": "a", "row": 1}
    assert "label_volumes_ml" not in CohortDataset([entry], ["age", "ventricle_volume"], cohort_run["ds"].grid)[0]
    calls = cohort_run["calls_list"]
    before = len(calls)
    ds, records = preprocess_cohort(cohort_run["manifest"], cache.root, conditions=["age", "ventricle_volume"],
                                    progress=False, preprocess=cohort_run["counting"])
    assert records[0]["status"] == "cached" and len(calls) == before + 1  # only the failing row runs again
    np.testing.assert_allclose(ds[0]["label_volumes_ml"].numpy(), fresh, rtol=1e-12)
    assert [ds[0]["affine_determinant"], ds[1]["affine_determinant"]] == pytest.approx(fresh_dets, rel=1e-12)
    assert {k: v for k, v in cache.meta(key).items() if k != "info"} == {k: v for k, v in old.items() if k != "info"}
    assert not list(cache.path(key).glob(".*"))  # no temporary file left beside meta.json


def test_cli(cohort_run, capsys):
    m, cache = str(cohort_run["manifest"]), str(cohort_run["cache"])
    assert preprocess_main([m, "--conditions", "age,ventricle_volume", "--cache", cache, "--validate-only"]) == 0
    code = preprocess_main([m, "--conditions", "age,ventricle_volume", "--cache", cache, "--no-progress",
                            "--threads", "2"])
    out, err = capsys.readouterr()
    assert code == 1  # one subject fails
    assert "0 preprocessed, 2 from the cache, 1 failed" in out and "row 3 (line 4)" in err
    dets = {r["subject"]: r["affine_determinant"] for r in cohort_run["records"][:2]}
    low, high = sorted(dets, key=dets.get)
    assert (f"affine determinant (subject volume / template volume): median {dets[high]:.3f}, smallest "
            f"{dets[low]:.3f} ({low}), largest {dets[high]:.3f} ({high})") in out
    assert (cohort_run["cache"] / "report.csv").is_file()
    assert preprocess_main([m, "--conditions", "age", "--cache", cache]) == 2
    assert "unknown column 'ventricle_volume'" in capsys.readouterr().err


def test_n4_correction_removes_a_bias_field():
    t = load_template()
    img = t.t1[::2, ::2, ::2].astype(np.float32)
    grid = Grid(img.shape, t.grid.affine @ np.diag([2.0, 2, 2, 1]))
    ii = np.linspace(-1, 1, img.shape[0])[:, None, None]
    biased = img * np.exp(0.3 * ii) * 500
    out = from_sitk(cohort.n4_correct(to_sitk(biased, grid), shrink=2, iterations=(20, 20)))[0]
    wm = t.labels[::2, ::2, ::2] == WM
    left, right = wm & (ii < -0.3), wm & (ii > 0.3)
    before = biased[right].mean() / biased[left].mean()
    after = out[right].mean() / out[left].mean()
    assert before > 1.2 and abs(after - 1) < abs(before - 1) / 2, (before, after)


# ---------------------------------------------------------------------------------------------------- manifest errors


@pytest.fixture()
def files(tmp_path):
    g = Grid((6, 6, 6), np.eye(4))
    write_image(tmp_path / "ok.nii.gz", np.ones((6, 6, 6), np.float32), g)
    write_image(tmp_path / "ok_labels.nii.gz", np.ones((6, 6, 6), np.uint8), g)
    write_image(tmp_path / "other_labels.nii.gz", np.ones((6, 6, 7), np.uint8), Grid((6, 6, 7), np.eye(4)))
    nib.save(nib.Nifti1Image(np.ones((6, 6, 6, 2), np.float32), np.eye(4)), str(tmp_path / "four_d.nii.gz"))
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkFloat32), str(tmp_path / "two_d.nrrd"))
    sitk.WriteImage(sitk.Image([5, 5, 5], sitk.sitkFloat32), str(tmp_path / "ok.nrrd"))
    (tmp_path / "garbage.nii.gz").write_bytes(b"not an image")
    return tmp_path


def problems(tmp_path, text, conditions=("age",), **kw) -> list[str]:
    path = tmp_path / "m.csv"
    path.write_text(text)
    with pytest.raises(ManifestError) as info:
        read_manifest(path, conditions, **kw)
    assert str(path) in str(info.value)
    return info.value.problems


def test_valid_manifest(files):
    (files / "sub").mkdir()
    write_image(files / "sub" / "x.nii.gz", np.ones((6, 6, 6), np.float32), Grid((6, 6, 6), np.eye(4)))
    (files / "m.csv").write_text(f"image,labels,age\nok.nii.gz,ok_labels.nii.gz,50\n\nok.nrrd,,NA\n"
                                 f"sub/x.nii.gz,, \n{files / 'ok.nii.gz'},,n/a\n")
    m = read_manifest(files / "m.csv", ["age"])
    assert [r.row for r in m.rows] == [1, 2, 3, 4] and [r.line for r in m.rows] == [2, 4, 5, 6]
    assert m.rows[0].labels == files / "ok_labels.nii.gz" and m.rows[1].labels is None
    assert m.rows[2].image == files / "sub" / "x.nii.gz"
    assert m.rows[0].conditions == (50.0,) and all(math.isnan(r.conditions[0]) for r in m.rows[1:])


def test_missing_file(files):
    p = problems(files, "image,labels,age\nok.nii.gz,nope_labels.nii.gz,1\nmissing.nii.gz,,2\n")
    assert len(p) == 2
    assert p[0].startswith("row 1 (line 2): label map file not found") and "nope_labels.nii.gz" in p[0]
    assert p[1].startswith("row 2 (line 3): image file not found") and "missing.nii.gz" in p[1]


def test_non_3d_images(files):
    p = problems(files, "image,age\nfour_d.nii.gz,1\ntwo_d.nrrd,2\ngarbage.nii.gz,3\n")
    assert len(p) == 3
    assert p[0].startswith("row 1 (line 2): image") and "not a 3-D scalar image (shape [6, 6, 6, 2])" in p[0]
    assert p[1].startswith("row 2 (line 3): image") and "not a 3-D scalar image (shape [8, 8])" in p[1]
    assert p[2].startswith("row 3 (line 4): image") and "cannot be read as an image" in p[2]


def test_label_map_on_another_grid(files):
    p = problems(files, "image,labels,age\nok.nii.gz,other_labels.nii.gz,1\n")
    assert p == ["row 1 (line 2): label map shape [6, 6, 7] differs from image shape [6, 6, 6]; "
                 "both must be on the same grid"]


def test_unknown_and_missing_columns(files):
    p = problems(files, "image,age,sex\nok.nii.gz,1,F\n", conditions=("age", "ventricle_volume"))
    assert len(p) == 2
    assert p[0].startswith("line 1: unknown column 'sex'")
    assert p[1] == "line 1: missing required column 'ventricle_volume'"
    p = problems(files, "path,age\nok.nii.gz,1\n")
    assert "line 1: missing required column 'image'" in p
    p = problems(files, "image,age\nok.nii.gz,1\n", require_labels=True)
    assert p == ["line 1: missing required column 'labels'"]


def test_bad_values(files):
    p = problems(files, "image,age,ventricle_volume\nok.nii.gz,sixty,20\nok.nii.gz,-3,inf\nok.nii.gz,50\n",
                 conditions=("age", "ventricle_volume"))
    assert p == ["row 1 (line 2): column 'age' is not a number ('sixty')",
                 "row 2 (line 3): column 'age' is negative ('-3'); conditions must be >= 0",
                 "row 2 (line 3): column 'ventricle_volume' is infinite ('inf')",
                 "row 3 (line 4): has 2 cells, the header has 3"]


def test_all_problems_in_one_error(files):
    p = problems(files, "image,labels,age\n,ok_labels.nii.gz,x\nmissing.nii.gz,,1\nok.nii.gz,,2\nfour_d.nii.gz,,-1\n"
                        "ok.nii.gz,,\n", require_labels=True)
    assert p == ["row 1 (line 2): the image cell is empty",
                 "row 1 (line 2): column 'age' is not a number ('x')",
                 f"row 2 (line 3): image file not found: {files / 'missing.nii.gz'}",
                 "row 2 (line 3): the labels cell is empty (label maps are required)",
                 "row 3 (line 4): the labels cell is empty (label maps are required)",
                 f"row 4 (line 5): image {files / 'four_d.nii.gz'} is not a 3-D scalar image (shape [6, 6, 6, 2]); "
                 "take one 3-D volume first",
                 "row 4 (line 5): the labels cell is empty (label maps are required)",
                 "row 4 (line 5): column 'age' is negative ('-1'); conditions must be >= 0",
                 "row 5 (line 6): the labels cell is empty (label maps are required)"]


def test_empty_manifests(files):
    assert problems(files, "") == ["the file is empty (a header line with at least 'image' is needed)"]
    assert problems(files, "image,age\n") == ["the manifest has no data rows"]
    with pytest.raises(ManifestError, match="manifest file not found"):
        read_manifest(files / "absent.csv", ["age"])


def test_log_condition_with_a_zero_in_the_manifest_is_refused_before_training(subjects, tmp_path):
    """A manifest whose ventricle volume is 0 for one subject (valid for the manifest: conditions are >= 0) cannot
    be measured on the log scale (``decoder.log_conditions``): the pipeline refuses it once the cohort is read,
    saying how many values and what to do, before any stage folder is made."""
    from diffdef_training.config import load_config
    from diffdef_training.pipeline import run_pipeline

    _, paths, _ = subjects
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("image,labels,age,ventricle_volume\n"
                        f"{paths[0][0]},{paths[0][1]},63,21.5\n{paths[1][0]},{paths[1][1]},70,0\n")
    out = tmp_path / "run"
    cfg = load_config(None, {"output": str(out), "cohort": {"source": str(manifest), "cache": str(tmp_path / "cache"),
                                                           "conditions": ["age", "ventricle_volume"]},
                             "decoder": {"log_conditions": ["ventricle_volume"]}})
    with pytest.raises(ValueError, match=r"ventricle_volume.*1 cohort value\(s\) of it are not positive") as exc:
        run_pipeline(cfg, progress=False)
    assert "(smallest 0)" in str(exc.value)
    assert not any((out / s).exists() for s in ("autoencoder", "diffusion", "registration", "decoder"))
