"""Requested-volume calibration at generation time (diffdef.calibration), on the shipped model, whose decoder
misses the requested ventricle volume at 40 years (outside its training ages) by more than 10 %."""
from __future__ import annotations

import copy
import math

import pytest

from diffdef.bundle import BundleError, load_bundle
from diffdef.calibration import MAX_EVALUATIONS, VolumeCalibrator, bundle_volume_labels, secant_search
from diffdef.generate import AtlasGenerator

FAST = {"steps": 5, "samples": 1, "seed": 0}
LV, TISSUE = "lateral ventricles", ("gray matter", "white matter")


@pytest.fixture(scope="module")
def shipped():
    return AtlasGenerator(None, device="cpu")


@pytest.fixture(scope="module")
def without_fit():
    """The shipped model as a bundle exported before bundles carried the cohort's tissue fit (``held_volumes``)."""
    bundle = load_bundle(networks_wanted=("diffusion", "condition_embedding", "decoder", "registration"))
    bundle.meta = copy.deepcopy(bundle.meta)
    del bundle.meta["held_volumes"]
    return AtlasGenerator(bundle, device="cpu")


def _tissue(atlas):
    return sum(atlas.label_volumes_ml[n] for n in TISSUE)


def _fit(generator, asked):
    return generator.calibrator.held_targets(generator.spec.validate(asked)[0])[0]


def test_calibration_meets_the_requested_volume_and_the_cohorts_tissue(shipped, without_fit):
    asked = {"age": 40, "ventricle_volume": 13.1}
    own = shipped.generate(asked, calibrate_volumes=False, **FAST)
    atlas = shipped.generate(asked, **FAST)
    assert abs(own.label_volumes_ml[LV] / 13.1 - 1) > 0.05  # the decoder alone misses it here
    assert abs(atlas.label_volumes_ml[LV] / 13.1 - 1) < 0.003  # the 1 mm label count the sidecar reports
    assert abs(_tissue(atlas) / _fit(shipped, asked) - 1) < 0.002  # brain tissue: the cohort's for the condition
    assert [(h["labels"], h["source"], h["converged"]) for h in atlas.held_volumes] == [([2, 3], "cohort fit", True)]
    # without the fit and without a smoothing, the decoder's tissue is kept (its gradient projected out)
    kept = without_fit.generate(asked, smoothing_mm=0.0, **FAST)
    assert abs(_tissue(kept) / _tissue(own) - 1) < 0.002 and kept.held_volumes == []
    assert atlas.folding_ratio == 0.0
    report = atlas.volume_calibration["ventricle_volume"]
    assert report["requested_ml"] == 13.1 and report["converged"] and 1 <= report["evaluations"] <= 4
    assert report["calibrated_ml"] == pytest.approx(atlas.label_volumes_ml[LV], abs=0.002)  # what it met is the map's
    assert abs(report["decoder_ml"] / own.label_volumes_ml[LV] - 1) < 0.03  # what the decoder alone made
    assert atlas.sampling["calibrate_volumes"] is True and own.sampling["calibrate_volumes"] is False
    assert own.volume_calibration == {} and "volume_calibration_s" in atlas.timings


def test_without_a_requested_volume_only_the_tissue_changes(shipped, without_fit):
    # the calibration alone: the shipped default smoothing (which the calibration follows by restoring the tissue)
    # is left out, as it is without the calibration; a bundle without the tissue fit then changes nothing
    own = without_fit.generate({"age": 70}, calibrate_volumes=False, **FAST)
    atlas = without_fit.generate({"age": 70}, smoothing_mm=0.0, **FAST)
    assert atlas.volume_calibration == {} and atlas.held_volumes == []
    assert (atlas.labels == own.labels).all() and (atlas.velocity == own.velocity).all()
    fitted = shipped.generate({"age": 70}, smoothing_mm=0.0, **FAST)
    assert fitted.volume_calibration == {} and abs(_tissue(fitted) / _fit(shipped, {"age": 70}) - 1) < 0.002


def test_after_a_smoothing_the_tissue_gets_back_the_decoders_volume(without_fit):
    """The velocity filter (``smoothing_mm``) also removes part of the decoder's fine-scale atrophy: brain tissue
    grows. Without the cohort's tissue fit, the calibration brings it back to the unfiltered decoder's volume, then
    meets the requested one."""
    asked = {"age": 80, "ventricle_volume": 37.9}
    own = without_fit.generate(asked, **FAST)
    filtered = without_fit.generate(asked, smoothing_mm=8.0, calibrate_volumes=False, **FAST)
    atlas = without_fit.generate(asked, smoothing_mm=8.0, **FAST)
    assert _tissue(filtered) / _tissue(own) - 1 > 0.005
    assert abs(_tissue(atlas) / _tissue(own) - 1) < 0.003
    assert [h["source"] for h in atlas.held_volumes] == ["decoder"]
    assert abs(atlas.label_volumes_ml[LV] / 37.9 - 1) < 0.003 and atlas.folding_ratio == 0.0
    assert set(atlas.volume_calibration) == {"ventricle_volume"} and atlas.sampling["smoothing_mm"] == 8.0


def test_a_volume_out_of_reach_is_a_warning_and_does_not_fold(shipped):
    atlas = shipped.generate({"age": 65, "ventricle_volume": 400}, **FAST)
    report = atlas.volume_calibration["ventricle_volume"]
    assert not report["converged"] and report["evaluations"] == MAX_EVALUATIONS
    assert report["decoder_ml"] < report["calibrated_ml"] < 400  # it went as far as it could
    # counted on a box grown by the displacement's own reach: still the whole label map's count, this far out
    assert report["calibrated_ml"] == pytest.approx(atlas.label_volumes_ml[LV], abs=0.002)
    assert any("400 ml could not be met exactly" in w for w in atlas.warnings)
    assert atlas.folding_ratio == 0.0


def test_a_request_of_0_ml_is_reported_not_met(shipped, without_fit):
    # 0 ml is a valid request (not negative), but no deformation empties the ventricles: the atlas keeps the
    # decoder's (after the tissue's calibration), and says so
    asked = {"age": 65, "ventricle_volume": 0}
    own = shipped.generate(asked, calibrate_volumes=False, **FAST)
    for smoothing_mm in (0.0, None):
        atlas = shipped.generate(asked, smoothing_mm=smoothing_mm, **FAST)
        report = atlas.volume_calibration["ventricle_volume"]
        assert report == {"requested_ml": 0.0, "decoder_ml": pytest.approx(own.label_volumes_ml[LV], abs=0.002),
                          "calibrated_ml": pytest.approx(atlas.label_volumes_ml[LV], abs=0.002), "evaluations": 0,
                          "converged": False}
        assert any("ventricle_volume = 0 ml could not be met exactly" in w for w in atlas.warnings)
    assert atlas.sampling["smoothing_mm"] == shipped.sampling["smoothing_mm"] > 0
    assert abs(_tissue(atlas) / _fit(shipped, asked) - 1) < 0.003
    plain = without_fit.generate(asked, calibrate_volumes=False, **FAST)
    assert (without_fit.generate(asked, smoothing_mm=0.0, **FAST).labels == plain.labels).all()


@pytest.mark.parametrize("decoder, needle", [
    ({"volume_labels": {"sex": 4}}, "not a condition of the model"),
    ({"volume_labels": {"ventricle_volume": 9}}, "not a template label"),
    ({"volume_labels": {"ventricle_volume": 4}, "neighbourhood_volume_labels": [[2, "3"]]}, "not a template label"),
])
def test_bad_volume_labels_in_a_bundle_are_refused(decoder, needle):
    bundle = load_bundle(networks_wanted=())
    bundle.meta = copy.deepcopy(bundle.meta)
    bundle.meta["provenance"]["config"]["decoder"].update(decoder)
    with pytest.raises(BundleError, match=needle):
        bundle_volume_labels(bundle)


def test_a_bundle_without_volume_terms_is_not_calibrated(shipped):
    bundle = load_bundle(networks_wanted=())
    bundle.meta = copy.deepcopy(bundle.meta)
    del bundle.meta["provenance"]["config"]
    assert bundle_volume_labels(bundle) == ({}, [])
    velocity = shipped.velocity({"age": 70, "ventricle_volume": 30}, steps=2, samples=1)[0]
    same, report, held = VolumeCalibrator(bundle, shipped.template)(velocity, {"ventricle_volume": 30.0})
    assert report == {} and held == [] and same is velocity


def test_the_search_takes_the_plain_secant_where_the_volume_is_smooth():
    """A smooth increasing f: the points are the plain secant's (t1, then the secant through the last two)."""
    f = lambda t: math.log((10 + 3 * t + 0.2 * t * t) / 14)
    calls = []
    t, value, evaluations = secant_search(lambda t: calls.append(t) or f(t), f(0.0), 1.0, 0.003)
    plain = [0.0, 1.0]
    while len(plain) < len(calls) + 1:
        a, b = plain[-2:]
        plain.append(b - f(b) * (b - a) / (f(b) - f(a)))
    assert calls == plain[1:] and abs(value) < 0.003 and value == f(t) and evaluations == len(calls) <= 4


def test_the_search_crosses_a_staircase():
    """The 1 mm nearest-neighbour count near the identity warp: flat for small steps, then a steep rise (as the
    shipped model's ventricles at 50 y / 17.1 ml with a 6 mm smoothing). The gradient's first step does not move it
    here, where the plain secant stops (the model's count moved by 3 voxels, and its secant went 59 times as far); the
    safeguarded one widens its steps and meets the volume within tolerance."""
    def staircase(t):  # ml: 16.92 up to t = 4, then 0.4 ml more per unit of t, in whole voxels (0.001 ml)
        return math.log((16.92 + max(0.0, t - 4.0) * 0.4 // 0.001 * 0.001) / 17.1)

    t, value, evaluations = secant_search(staircase, staircase(0.0), 1.0, 0.003)
    assert abs(value) < 0.003 and value == staircase(t) and evaluations <= 6
    assert 4.32 < t < 4.58  # where 16.92 + 0.4 (t - 4) ml is within 0.3 % of 17.1


def test_the_search_backs_off_where_the_map_folds_and_stops_at_its_budget():
    """None (a fold) at t: the next try is halfway back; an unreachable root uses every evaluation and returns
    the nearest point that did not fold."""
    calls = []

    def capped(t):  # folds beyond t = 2; the root (t = 5) is out of reach
        calls.append(t)
        return None if t > 2 else t / 5 - 1

    t, value, evaluations = secant_search(capped, -1.0, 4.0, 0.003, max_evaluations=8)
    assert calls[:2] == [4.0, 2.0] and evaluations == 8 and t <= 2 and value == pytest.approx(t / 5 - 1)
    assert secant_search(capped, -1.0, 0.0, 0.003) == (0.0, -1.0, 0)  # no step (e.g. a zero slope): nothing measured
