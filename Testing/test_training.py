"""The training package (issue 5's Must-show list): a tiny end-to-end run that the core loads and generates from,
DDP (torchrun, gloo) equal to one process, exact resume, clear errors on bad input before any training, loss
plots, and the morphology-preservation loss switch."""
from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffdef import fields

from diffdef_training import stages
from diffdef_training.config import ConfigError, load_config
from diffdef_training.engine import CheckpointError, RunContext, sample_generator
from diffdef_training.pipeline import prepared_cohort, run_pipeline

ROOT = Path(__file__).resolve().parent.parent
# the smallest useful networks; 4 norm groups (2 channels each): with one channel per group the conv biases before a
# GroupNorm have an exactly-zero gradient, and Adam turns its float noise into +-lr steps (no two summation orders
# agree there)
SMALL_AE = {"channels": [8, 16], "num_res_blocks": [1, 1], "attention_levels": [False, False], "norm_num_groups": 4}
SMALL = {
    "cohort": {"size": 8, "held_out": 2, "factor": 8},
    "autoencoder": {"steps": 3, "batch_size": 4, "warmup": 1, "checkpoint_every": 2, "log_every": 1},
    "registration": {"steps": 4, "batch_size": 2, "warmup": 1, "checkpoint_every": 2, "log_every": 1},
    "architecture": {"autoencoder": SMALL_AE, "registration": {"channels": [8, 16, 16, 16]}},
}


def _write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# -- 1. tiny end to end ---------------------------------------------------------------------------------------------
def test_tiny_bundle_loads_and_generates_without_folding(tiny_run, tiny_generator):
    from diffdef.bundle import load_bundle

    bundle = load_bundle(tiny_run / "bundle")
    assert list(bundle.spec.names) == ["age", "ventricle_volume"]
    assert set(bundle.nets) >= {"diffusion", "condition_embedding", "decoder", "registration"}
    for conditions in ({"age": 70, "ventricle_volume": 30}, {"age": 70}):
        atlas = tiny_generator.generate(conditions, seed=0)
        assert atlas.folding_ratio == 0.0
        assert atlas.t1.shape == atlas.labels.shape and atlas.t1.ndim == 3
        assert torch.isfinite(torch.as_tensor(atlas.displacement_mm)).all()
    assert atlas.conditions["ventricle_volume"] is None

    prov = json.loads((tiny_run / "bundle" / "model.json").read_text())["provenance"]
    assert prov["cohort_size"] == 24
    assert prov["steps"] == {"autoencoder": 4, "diffusion": 4, "registration": 4, "decoder": 3}
    assert set(prov["final_losses"]) == {"autoencoder", "diffusion", "registration", "decoder"}
    assert "l1" in prov["final_losses"]["autoencoder"] and "centrality" in prov["final_losses"]["decoder"]
    assert prov["morphology_preservation_loss"] is True
    assert set(prov["stage_machines"]) == set(prov["steps"])  # where each stage trained, from its done.json
    assert all(m.endswith(", CPU") and "  " not in m for m in prov["stage_machines"].values()), prov["stage_machines"]
    assert re.fullmatch(r"[0-9a-f]{40}", prov["git_commit"]), prov["git_commit"]


def test_cpu_name_leaves_out_a_processor_the_platform_does_not_report(monkeypatch):
    import platform

    from diffdef_training.pipeline import cpu_name

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(platform, "processor", lambda: "")
    assert cpu_name() == "x86_64"
    monkeypatch.setattr(platform, "processor", lambda: "i386")
    assert cpu_name() == "x86_64 i386"


# -- 2. torchrun (gloo, 2 processes) == one process -----------------------------------------------------------------
def test_ddp_two_processes_match_one_process(tmp_path):
    cfg = _write(tmp_path / "ddp.json", SMALL)
    cmd = [sys.executable, "-m", "diffdef_training.cli", "pipeline", "--config", str(cfg), "--stages", "autoencoder",
           "--no-progress"]
    ddp = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            *cmd[1:], "--output", str(tmp_path / "ddp")], env=_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    single = subprocess.run([*cmd, "--output", str(tmp_path / "single")], env=_env(), capture_output=True, text=True,
                            timeout=300)
    ddp_out = ddp.communicate(timeout=300)[0]
    assert single.returncode == 0, single.stdout + single.stderr
    assert ddp.returncode == 0, ddp_out
    assert "no bundle" in single.stdout  # a subset of stages ends cleanly after its last stage
    for run in ("single", "ddp"):
        assert not (tmp_path / run / "diffusion").exists() and not (tmp_path / run / "bundle").exists()
    a = _weights(tmp_path / "single" / "autoencoder" / "autoencoder.safetensors")
    b = _weights(tmp_path / "ddp" / "autoencoder" / "autoencoder.safetensors")
    assert _max_diff(a, b) < 1e-5
    # rank 0 alone logs: one row per step
    rows = list(csv.DictReader(open(tmp_path / "ddp" / "autoencoder" / "log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert torch.load(tmp_path / "ddp" / "autoencoder" / "checkpoints" / "latest.pt", weights_only=True)["step"] == 3


# -- 3. resume ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_cohort():
    return prepared_cohort(load_config(None, SMALL), progress=False)


def _train(name, cfg, cohort, out, seed, **kw):
    torch.manual_seed(seed)  # a resumed run must not depend on the fresh network's initialisation
    ctx = RunContext(0, 1, torch.device("cpu"), cfg.seed)
    fn = {"autoencoder": stages.train_autoencoder, "registration": stages.train_registration}[name]
    return fn(cfg, ctx, cohort, out, progress=False, **kw)


@pytest.mark.parametrize("name", ["autoencoder", "registration"])
def test_resume_equals_uninterrupted(name, small_cohort, tmp_path):
    k = 2
    cfg = load_config(None, {**SMALL, name: {**SMALL[name], "steps": 2 * k, "ema": 0.9, "checkpoint_every": 1}})
    full = _train(name, cfg, small_cohort, tmp_path / "full", seed=0)
    convs = [p for p in full.parameters() if p.ndim == 5]  # trained channels-last on the CPU (channels_last_on_cpu)
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in convs)
    part = _train(name, cfg, small_cohort, tmp_path / "part", seed=0, stop_after=k)
    assert torch.load(tmp_path / "part" / "checkpoints" / "latest.pt", weights_only=True)["step"] == k
    resumed = _train(name, cfg, small_cohort, tmp_path / "part", seed=99, resume=True)
    assert part is not resumed
    a, b = full.state_dict(), resumed.state_dict()
    assert _max_diff(a, b) <= 1e-6
    # the whole training state agrees too: raw weights, EMA, optimizer moments, scheduler, step
    sa = torch.load(tmp_path / "full" / "checkpoints" / "latest.pt", weights_only=True)
    sb = torch.load(tmp_path / "part" / "checkpoints" / "latest.pt", weights_only=True)
    assert sa["step"] == sb["step"] == 2 * k
    assert _max_diff(sa["model"], sb["model"]) <= 1e-6
    assert _max_diff(sa["ema"], sb["ema"]) <= 1e-6
    assert sa["scheduler"] == sb["scheduler"]
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert _max_diff(pa, pb) <= 1e-6
    # the log continues where it stopped: one row per step, none repeated
    rows = list(csv.DictReader(open(tmp_path / "part" / "log.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 2 * k + 1))


# -- 4. bad input: clear errors before any training -----------------------------------------------------------------
def _cli(*args):
    from diffdef_training.cli import main

    with pytest.raises(SystemExit) as exc:
        main(list(args))
    return str(exc.value)


def test_config_unknown_key_and_wrong_type(tmp_path):
    out = tmp_path / "run"
    bad_key = _write(tmp_path / "k.json", {"output": str(out), "autoencoder": {"stpes": 3}})
    with pytest.raises(ConfigError, match=r"autoencoder\.stpes"):
        load_config(bad_key)
    assert "Unknown key autoencoder.stpes" in _cli("pipeline", "--config", str(bad_key))
    bad_type = tmp_path / "t.yaml"
    bad_type.write_text(f"output: {out}\ndecoder: {{steps: ten}}\n")
    with pytest.raises(ConfigError, match=r"decoder\.steps must be int, got 'ten'"):
        load_config(bad_type)
    assert "decoder.steps" in _cli("pipeline", "--config", str(bad_type))
    with pytest.raises(ConfigError, match=r"decoder\.mp_loss must be bool"):
        load_config(None, {"decoder": {"mp_loss": "no"}})
    with pytest.raises(ConfigError, match="Unknown key architecture.unet"):
        load_config(None, {"architecture": {"unet": {}}})
    with pytest.raises(ConfigError, match="cohort.conditions"):
        load_config(None, {"cohort": {"conditions": ["age", "age"]}})
    with pytest.raises(ConfigError, match=r"cohort\.native_volumes names 'icv', which is not in cohort\.conditions"):
        load_config(None, {"cohort": {"source": "c.csv", "native_volumes": ["icv"]}})
    with pytest.raises(ConfigError, match="the synthetic cohort's are already there"):
        load_config(None, {"cohort": {"native_volumes": ["ventricle_volume"]}})
    assert not out.exists()


def test_command_line_settings(tmp_path):
    """``--set KEY=VALUE`` reaches the config at any depth without replacing the key's siblings, and a mapping
    value replaces the key's whole value; bad settings are refused with the key and an example, before anything
    is written."""
    from diffdef_training.config import parse_setting

    shipped = ROOT / "DiffDefTraining" / "configs" / "shipped.yaml"
    settings = [parse_setting(s) for s in ["decoder.mp_weight=3", "device=cuda", "decoder.volume_labels={}",
                                           "architecture.registration.channels=[8, 16]"]]
    cfg, base = load_config(shipped, None, settings), load_config(shipped)
    assert (cfg.decoder.mp_weight, cfg.device, cfg.decoder.volume_labels) == (3.0, "cuda", {})
    assert (cfg.decoder.steps, base.decoder.volume_labels) == (base.decoder.steps, {"ventricle_volume": 4})
    assert cfg.architecture["registration"]["channels"] == [8, 16]
    assert {k: v for k, v in cfg.architecture["registration"].items() if k != "channels"} == \
        {k: v for k, v in base.architecture["registration"].items() if k != "channels"}
    out = tmp_path / "run"
    for bad, words in [("decoder.mp_weight", "KEY=VALUE"), ("=3", "KEY=VALUE"), ("decoder..steps=3", "KEY=VALUE"),
                       ("decoder.stpes=3", "decoder.stpes"), ("decoder.steps=ten", "decoder.steps must be int"),
                       ("decoder.steps=[1", "Cannot read the value")]:
        assert words in _cli("pipeline", "--config", str(shipped), "--output", str(out), "--set", bad), bad
    assert not out.exists()


def test_manifest_conditions_must_match_config(tmp_path):
    from diffdef_training.cohort import ManifestError

    manifest = tmp_path / "cohort.csv"
    manifest.write_text("image,age,sex\nsub1.nii.gz,70,1\n")
    cfg = load_config(None, {**SMALL, "output": str(tmp_path / "run"),
                             "cohort": {"source": str(manifest), "conditions": ["age", "ventricle_volume"]}})
    with pytest.raises(ManifestError) as exc:
        run_pipeline(cfg, progress=False)
    msg = str(exc.value)
    assert "unknown column 'sex'" in msg and "missing required column 'ventricle_volume'" in msg
    assert not (tmp_path / "run").exists()  # refused before anything was created
    assert "ventricle_volume" in _cli("pipeline", "--output", str(tmp_path / "run"), "--config",
                                      str(_write(tmp_path / "c.json", {**SMALL, "cohort": cfg.to_dict()["cohort"]})))
    # the synthetic cohort only knows age and ventricle volume
    cfg = load_config(None, {**SMALL, "output": str(tmp_path / "run"), "cohort": {"conditions": ["age", "sex"]}})
    with pytest.raises(ValueError, match="synthetic cohort"):
        run_pipeline(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_resume_from_incompatible_checkpoint(tmp_path, small_cohort):
    run = tmp_path / "run"
    cfg = load_config(None, {**SMALL, "output": str(run), "autoencoder": {**SMALL["autoencoder"], "steps": 4}})
    _train("autoencoder", cfg, small_cohort, run / "autoencoder", seed=0, stop_after=1)
    log = (run / "autoencoder" / "log.csv").read_text()
    other_arch = {**SMALL, "output": str(run), "autoencoder": {**SMALL["autoencoder"], "steps": 4},
                  "architecture": {**SMALL["architecture"], "autoencoder": {**SMALL_AE, "channels": [8, 8]}}}
    with pytest.raises(CheckpointError, match="does not fit the autoencoder network"):
        run_pipeline(load_config(None, other_arch), resume=True, progress=False, only=("autoencoder",))
    other_lr = {**SMALL, "output": str(run), "autoencoder": {**SMALL["autoencoder"], "steps": 4, "lr": 0.5}}
    with pytest.raises(CheckpointError, match="another autoencoder configuration"):
        run_pipeline(load_config(None, other_lr), resume=True, progress=False, only=("autoencoder",))
    assert "does not fit" in _cli("pipeline", "--config", str(_write(tmp_path / "a.json", other_arch)), "--resume",
                                  "--stages", "autoencoder")
    (run / "autoencoder" / "checkpoints" / "latest.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        run_pipeline(cfg, resume=True, progress=False, only=("autoencoder",))
    assert (run / "autoencoder" / "log.csv").read_text() == log  # no step was taken
    assert not (run / "autoencoder" / "done.json").exists()
    # a later stage whose inputs are not trained is refused up front
    with pytest.raises(ValueError, match="Stage autoencoder is not current"):
        run_pipeline(cfg, progress=False, only=("diffusion",))


def test_a_resumed_stage_counts_the_time_before_its_interruption(tmp_path, small_cohort):
    """A stage trained in two runs records the seconds of both (done.json, and so the bundle's
    provenance.stage_seconds), not the last run's alone: the checkpoint carries the count."""
    run = tmp_path / "run"
    cfg = load_config(None, {**SMALL, "output": str(run),
                             "autoencoder": {**SMALL["autoencoder"], "steps": 2, "checkpoint_every": 1}})
    _train("autoencoder", cfg, small_cohort, run / "autoencoder", seed=0, stop_after=1)
    latest = run / "autoencoder" / "checkpoints" / "latest.pt"
    state = torch.load(latest, weights_only=True)
    assert 0 < state["seconds"] < 600
    state["seconds"] = 5000.0  # as if the interrupted run had trained that long
    torch.save(state, latest)
    run_pipeline(cfg, resume=True, progress=False, only=("autoencoder",))
    assert 5000 < json.loads((run / "autoencoder" / "done.json").read_text())["seconds"] < 5600
    assert 5000 < torch.load(latest, weights_only=True)["seconds"] < 5600


def test_fresh_start_refuses_to_overwrite_a_resumable_checkpoint(tmp_path, small_cohort):
    """The same command without --resume would start an interrupted stage from step 0 and overwrite its steps:
    refused, with nothing touched; a checkpoint of other settings is the documented retraining and is replaced."""
    run = tmp_path / "run"
    cfg = load_config(None, {**SMALL, "output": str(run), "autoencoder": {**SMALL["autoencoder"], "steps": 4}})
    _train("autoencoder", cfg, small_cohort, run / "autoencoder", seed=0, stop_after=1)
    latest = run / "autoencoder" / "checkpoints" / "latest.pt"
    before = {f: f.read_bytes() for f in (latest, run / "autoencoder" / "log.csv")}
    with pytest.raises(CheckpointError, match=r"holds 1 of 4 steps .* Add --resume to continue it, or delete"):
        run_pipeline(cfg, progress=False, only=("autoencoder",))
    assert "Add --resume" in _cli("pipeline", "--config", str(_write(tmp_path / "c.json", cfg.to_dict())),
                                  "--stages", "autoencoder")
    assert {f: f.read_bytes() for f in before} == before
    other_lr = load_config(None, {**cfg.to_dict(), "autoencoder": {**cfg.to_dict()["autoencoder"], "lr": 0.5}})
    run_pipeline(other_lr, progress=False, only=("autoencoder",))
    assert torch.load(latest, weights_only=True)["step"] == 4


# -- 5. plots -------------------------------------------------------------------------------------------------------
def test_plot_command_writes_pngs(tiny_run, tmp_path, capsys):
    from diffdef_training.cli import main

    main(["plot", str(tiny_run), "--output", str(tmp_path)])
    pngs = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in pngs] == [f"{s}_curves.png" for s in ("autoencoder", "decoder", "diffusion", "registration")]
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
    assert str(pngs[0]) in capsys.readouterr().out
    assert "No stage log" in _cli("plot", str(tmp_path))


# -- 6. the morphology-preservation loss switch ---------------------------------------------------------------------
def test_decoder_without_mp_loss_trains(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("bundle"))
    before = {s: (run / s / "done.json").read_text() for s in ("autoencoder", "diffusion", "registration")}
    cfg = load_config(ROOT / "DiffDefTraining" / "configs" / "tiny.yaml",
                      {"output": str(run), "decoder": {"mp_loss": False}})
    bundle = run_pipeline(cfg, progress=False)
    # only the decoder was retrained (its settings changed); the frozen networks were reused
    assert {s: (run / s / "done.json").read_text() for s in before} == before
    meta = json.loads((bundle / "model.json").read_text())
    assert meta["provenance"]["morphology_preservation_loss"] is False
    rows = list(csv.DictReader(open(run / "decoder" / "log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]  # a fresh start replaces the copied run's log
    assert all(torch.isfinite(torch.tensor(float(r["similarity"]))) for r in rows)
    assert _max_diff(_weights(bundle / "decoder.safetensors"), _weights(tiny_run / "bundle" / "decoder.safetensors")) > 0


def test_decoder_loss_weights_each_logged_term(tiny_run, tmp_path):
    """The decoder's logged total loss is its logged terms weighted as configured, and the neighbourhood-volume
    and -shape terms have weights of their own (3 and 7 here, the requested-volume term 1): tiny.yaml's decoder
    retrained."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("bundle"))
    cfg = load_config(ROOT / "DiffDefTraining" / "configs" / "tiny.yaml",
                      {"output": str(run), "decoder": {"neighbourhood_volume_weight": 3.0,
                                                       "neighbourhood_shape_labels": [4], "neighbourhood_shape_weight": 7.0}})
    run_pipeline(cfg, progress=False)
    d = cfg.decoder
    rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(open(run / "decoder" / "log.csv"))]
    assert len(rows) == d.steps and d.volume_weight == 1.0
    for r in rows:
        assert r["neighbourhood_volume"] > 0 and r["neighbourhood_shape"] > 0
        terms = (d.sim_weight * r["similarity"] + d.smooth_weight * r["smoothness"] + d.mp_weight * r["centrality"]
                 + d.volume_weight * r["volume"] + 3.0 * r["neighbourhood_volume"] + 7.0 * r["neighbourhood_shape"])
        assert r["loss"] == pytest.approx(terms, rel=1e-5)


def test_config_refuses_a_negative_or_nan_volume_setting():
    for key in ("volume_weight", "neighbourhood_volume_weight", "neighbourhood_volume_sigma", "neighbourhood_shape_weight"):
        for bad in (-1.0, float("nan")):
            with pytest.raises(ConfigError, match=rf"decoder\.{key} must be >= 0"):
                load_config(None, {"decoder": {key: bad}})


def test_decoder_objective_terms(small_cohort):
    from diffdef.networks import RegistrationNet

    cfg = load_config(None, SMALL)
    torch.manual_seed(0)
    objective = stages.DecoderObjective(cfg, small_cohort, RegistrationNet(**cfg.architecture["registration"]), "cpu")
    velocity = (0.1 * torch.randn(1, 3, *small_cohort.images.shape[2:])).requires_grad_(True)
    atlas, _ = objective.atlas(velocity)
    idx, weights = objective.neighbours(small_cohort.conditions[0], torch.Generator().manual_seed(0))
    assert len(idx) == min(cfg.decoder.neighbours, len(small_cohort)) and len(set(idx.tolist())) == len(idx)
    assert weights is None  # equal weights unless decoder.local_linear
    terms = objective.terms(velocity, atlas, small_cohort.images[idx])
    assert set(terms) == {"centrality", "similarity", "smoothness"}
    assert terms["centrality"].ndim == 0 and float(terms["centrality"]) >= 0
    terms["centrality"].backward()
    assert velocity.grad is not None and velocity.grad.abs().sum() > 0  # usable as a loss


def test_local_linear_factors_centre_the_neighbourhood_on_the_condition():
    """At the cohort's edge the Gaussian neighbourhood's mean condition is pulled inwards; weighted by the
    local-linear factors it is the condition itself, so a displacement linear in the condition averages to the
    condition's own. A condition the query omits, or a subject lacks, plays no part."""
    g = torch.Generator().manual_seed(0)
    cohort = torch.rand(400, 2, generator=g) * 2 - 1  # normalised conditions, uniform on [-1, 1]^2
    cohort[::7, 1] = float("nan")  # subjects without the second condition
    edge = torch.tensor([-0.95, 0.9])
    w = stages.neighbourhood_weights(edge, cohort, 0.3)
    d = (cohort - edge).nan_to_num(0.0)
    gaussian_mean = (w[:, None] * d).sum(0) / w.sum()
    assert gaussian_mean.abs().min() > 0.05  # the skew being corrected
    kernel = w * stages.local_linear_factors(edge, cohort, w)
    assert torch.allclose((kernel[:, None] * d).sum(0) / kernel.sum(), torch.zeros(2), atol=1e-4)
    assert float(kernel.sum() / w.sum()) == pytest.approx(1.0, abs=1e-4)
    only_first = torch.tensor([-0.95, float("nan")])
    w1 = stages.neighbourhood_weights(only_first, cohort, 0.3)
    k1 = w1 * stages.local_linear_factors(only_first, cohort, w1)
    assert float((k1 * d[:, 0]).sum() / k1.sum()) == pytest.approx(0.0, abs=1e-4)
    nothing = torch.tensor([float("nan"), float("nan")])  # no condition given: the plain mean over the cohort
    w0 = stages.neighbourhood_weights(nothing, cohort, 0.3)
    assert torch.equal(stages.local_linear_factors(nothing, cohort, w0), torch.ones(len(cohort)))
    inside = torch.tensor([0.0, 0.0])  # deep inside the cohort there is almost nothing to correct
    wi = stages.neighbourhood_weights(inside, cohort, 0.3)
    nearest = wi.argsort()[-50:]
    assert torch.allclose(stages.local_linear_factors(inside, cohort, wi)[nearest], torch.ones(50), atol=0.2)


def test_log_scale_neighbourhood_centres_a_small_volume():
    """``decoder.log_conditions`` measures a volume's neighbourhood distance on the log scale: its coordinate is
    (log V - mean log V) / sd log V over the cohort, the other conditions and missing values are unchanged, and on
    a log-normal cohort the neighbourhood of a small volume is no longer pulled towards larger ones. A cohort
    with a non-positive value of it is refused."""
    from diffdef.conditions import Condition, ConditionSpec

    g = torch.Generator().manual_seed(0)
    volume = 25 * torch.exp(0.45 * torch.randn(400, generator=g))  # ml, log-normal like the synthetic cohort's
    raw = torch.stack([60 + 10 * torch.randn(400, generator=g), volume], 1)
    raw[::9, 0] = float("nan")
    spec = ConditionSpec([Condition("age", "years", 60.0, 10.0, 40.0, 80.0),
                          Condition("ventricle_volume", "ml", float(volume.mean()), float(volume.std()), 5.0, 120.0)])
    cohort = spec.normalise_tensor(raw)
    linear, logs = stages.NeighbourhoodSpace(spec, cohort), stages.NeighbourhoodSpace(spec, cohort, ["ventricle_volume"])
    assert torch.equal(linear.cohort.nan_to_num(7.0), cohort.nan_to_num(7.0))
    log_v = volume.double().log()
    assert torch.allclose(logs.cohort[:, 1].double(), (log_v - log_v.mean()) / log_v.std(), atol=1e-5)
    assert torch.equal(logs.cohort[:, 0].nan_to_num(7.0), cohort[:, 0].nan_to_num(7.0))
    small = spec.normalise({"age": 60.0, "ventricle_volume": 10.0})[0]
    assert torch.equal(linear.weights(small, 0.3), stages.neighbourhood_weights(small, cohort, 0.3))
    mean_volume = {name: float((space.weights(small, 0.3) * volume).sum() / space.weights(small, 0.3).sum())
                   for name, space in (("linear", linear), ("log", logs))}
    assert mean_volume["linear"] > 12.5 and mean_volume["log"] < 11.5  # asked 10 ml
    with pytest.raises(ValueError, match="log_conditions"):
        stages.NeighbourhoodSpace(spec, spec.normalise_tensor(raw * torch.tensor([1.0, -1.0])), ["ventricle_volume"])


def test_decoder_neighbours_come_from_the_log_scale_neighbourhood(small_cohort):
    """The decoder's objective draws its neighbours and its local-linear weights in :class:`NeighbourhoodSpace`."""
    from diffdef.networks import RegistrationNet

    cfg = load_config(None, {**SMALL, "decoder": {"local_linear": True, "log_conditions": ["ventricle_volume"]}})
    objective = stages.DecoderObjective(cfg, small_cohort, RegistrationNet(**cfg.architecture["registration"]), "cpu")
    space = stages.NeighbourhoodSpace(small_cohort.spec, small_cohort.conditions, ["ventricle_volume"])
    cond = small_cohort.conditions[0]
    idx, weights = objective.neighbours(cond, torch.Generator().manual_seed(0))
    w = space.weights(cond, cfg.decoder.sigma)
    assert torch.equal(idx, torch.multinomial(w, min(cfg.decoder.neighbours, len(w)), replacement=False,
                                              generator=torch.Generator().manual_seed(0)))
    assert torch.equal(weights, stages.local_linear_factors(space(cond), space.cohort, w)[idx])


def test_local_linear_centrality_weights_the_neighbours(small_cohort):
    """With ``decoder.local_linear`` the centrality is the mean of the neighbours' displacements times their
    factors, divided by the number of neighbours (the factors average 1), never by the factors' own sum, which
    a mix of signs can bring close to 0."""
    from diffdef.networks import RegistrationNet

    cfg = load_config(None, {**SMALL, "decoder": {"local_linear": True}})
    torch.manual_seed(0)
    objective = stages.DecoderObjective(cfg, small_cohort, RegistrationNet(**cfg.architecture["registration"]), "cpu")
    cond = small_cohort.conditions[0]
    idx, weights = objective.neighbours(cond, torch.Generator().manual_seed(0))
    w = stages.neighbourhood_weights(cond, small_cohort.conditions, cfg.decoder.sigma)
    expected = stages.local_linear_factors(cond, small_cohort.conditions, w)[idx]
    assert torch.equal(weights, expected)
    atlas = small_cohort.template_t1
    nb = small_cohort.images[idx]
    each = torch.stack([objective.mean_displacement(atlas, nb[n : n + 1])[0] for n in range(len(nb))])
    weighted = (expected[:, None, None, None, None] * each).mean(0)
    assert torch.allclose(objective.mean_displacement(atlas, nb, weights)[0], weighted, atol=1e-5)
    assert not torch.allclose(objective.mean_displacement(atlas, nb)[0], weighted, atol=1e-5)
    # factors whose sum vanishes (as a draw at the cohort's edge can give) keep the centrality bounded by the
    # largest |factor| times the largest displacement
    cancelling = torch.linspace(-1.0, 1.0, len(nb))
    bounded = objective.mean_displacement(atlas, nb, cancelling)[0]
    assert torch.isfinite(bounded).all()
    assert float(bounded.abs().max()) <= float(each.abs().max()) + 1e-6


def test_volume_on_template_grid_measures_as_the_evaluation(small_cohort):
    """With ``volume_on_template_grid`` the volume term reads the atlas's ventricles as the evaluation does (1 mm
    labels warped by the displacement resampled to 1 mm); the working-grid fractions read a large expansion short."""
    from diffdef.networks import RegistrationNet
    from diffdef.template import load_template
    from diffdef_training.synthetic import default_law

    law, template = default_law(), load_template()
    grid = small_cohort.grid
    alpha, _ = law.coefficients(65.0, 60.0)
    disp = law.displacement(alpha * law.e_vent, grid).requires_grad_(True)  # the law's ventricles at 60 ml
    truth = template.label_volumes_ml(fields.warp_labels(
        template.labels_tensor(), fields.resample_displacement(disp.detach(), grid, template.grid))[0, 0].numpy())
    truth = truth["lateral ventricles"]
    volumes = {}
    for fine in (False, True):
        cfg = load_config(None, {**SMALL, "decoder": {"volume_labels": {"ventricle_volume": 4},
                                                      "volume_on_template_grid": fine}})
        objective = stages.DecoderObjective(cfg, small_cohort, RegistrationNet(**cfg.architecture["registration"]), "cpu")
        volumes[fine] = objective.label_volumes(disp, [0])[0]
        assert float(objective.label_volumes(torch.zeros_like(disp), [0])[0]) == pytest.approx(
            template.label_volumes_ml()["lateral ventricles"], rel=0.02)
    print(f"1 mm labels {truth:.2f} ml; template grid {volumes[True].item():.2f}, working grid {volumes[False].item():.2f}")
    assert volumes[True].item() == pytest.approx(truth, rel=0.01)
    assert abs(volumes[False].item() - truth) > 3 * abs(volumes[True].item() - truth)
    volumes[True].backward()
    assert disp.grad.abs().sum() > 0  # differentiable in the displacement


class _BiasedRegistration(torch.nn.Module):
    """A stand-in registration network: velocity = true part + bias, the true part antisymmetric in
    (moving, fixed) (their intensity difference along axis 0), the bias a constant that ignores the direction."""

    def __init__(self, bias: float):
        super().__init__()
        self.bias = bias

    def forward(self, moving, fixed):
        true = torch.zeros(len(fixed), 3, *fixed.shape[2:])
        true[:, 0] = 0.05 * (fixed - moving)[:, 0]
        return true + self.bias


def _pair_kinds(cohort, registration: dict, draws: int = 400) -> list[str]:
    """The kind of each of ``draws`` registration pairs: template -> subject, subject -> template, subject -> subject."""
    scfg = load_config(None, {**SMALL, "registration": registration}).registration
    idx = [k % len(cohort) for k in range(draws)]  # each subject several times: only the draws differ
    gens = [sample_generator(0, 0, k) for k in range(draws)]
    batch = stages.registration_pairs(cohort, scfg, idx, gens)
    assert batch.known is None and batch.is_known is None  # no known warps asked
    template = cohort.template_t1[0]
    kinds = []
    for k, i in enumerate(idx):
        is_template = torch.equal(batch.moving[k], template), torch.equal(batch.fixed[k], template)
        kinds.append({(True, False): "t->s", (False, True): "s->t", (False, False): "s->s"}[is_template])
        assert torch.equal(batch.fixed_labels[k], cohort.template_fractions[0] if is_template[1] else cohort.labels[i])
        assert torch.equal(batch.fixed[k] if kinds[-1] != "s->t" else batch.moving[k], cohort.images[i])  # subject i
    return kinds


def test_registration_pairs_follow_template_moving_and_template_fixed(small_cohort):
    """``registration.template_fixed`` turns that share of the pairs into subject -> template (the direction the
    symmetric centrality runs, atlas <- subject); at its default 0 the draws are those of the shipped network's
    training (template -> subject, else another subject -> subject)."""
    shipped = _pair_kinds(small_cohort, {"template_moving": 0.5})
    assert set(shipped) == {"t->s", "s->s"} and abs(shipped.count("t->s") / len(shipped) - 0.5) < 0.1
    both = _pair_kinds(small_cohort, {"template_moving": 0.5, "template_fixed": 0.25})
    shares = {kind: both.count(kind) / len(both) for kind in ("t->s", "s->t", "s->s")}
    assert abs(shares["t->s"] - 0.5) < 0.1 and abs(shares["s->t"] - 0.25) < 0.1 and abs(shares["s->s"] - 0.25) < 0.1
    # the same generators give the same first choice: template -> subject pairs stay where they were
    assert [k == "t->s" for k in both] == [k == "t->s" for k in shipped]
    assert _pair_kinds(small_cohort, {"template_moving": 0.0, "template_fixed": 1.0}) == ["s->t"] * 400


def test_known_warp_pairs_warp_the_moving_image_by_the_field_they_carry(small_cohort, tmp_path):
    """``registration.warp_pairs``: that share of the pairs registers an image to itself warped by a random smooth
    field of the asked size; the field travels with the batch, and training logs the network's error on it."""
    settings = {"template_moving": 0.5, "warp_pairs": 0.5, "warp_rms_mm": 3.0, "warp_sigma_mm": 16.0}
    scfg = load_config(None, {**SMALL, "registration": settings}).registration
    idx = [k % len(small_cohort) for k in range(40)]
    batch = stages.registration_pairs(small_cohort, scfg, idx, [sample_generator(0, 0, k) for k in range(40)])
    assert 0.3 < batch.is_known.float().mean() < 0.7
    spacing = float(small_cohort.grid.spacing[0])
    for k in range(40):
        if batch.is_known[k]:
            disp = batch.known[k:k + 1]
            assert torch.allclose(batch.fixed[k:k + 1], fields.warp_image(batch.moving[k:k + 1], disp))
            assert torch.allclose(batch.fixed_labels[k:k + 1], fields.warp_probabilities(batch.moving_labels[k:k + 1], disp))
            rms_mm = float(disp.pow(2).sum(1).mean().sqrt()) * spacing
            assert 1.5 < rms_mm < 4.5  # the velocity's 3 mm RMS, integrated
        else:
            assert torch.equal(batch.known[k], torch.zeros_like(batch.known[k]))
            assert torch.equal(batch.fixed[k], small_cohort.images[idx[k]])  # the pair's own subject
    # the first draw is kept: the template moves in the same pairs as without known warps
    plain = stages.registration_pairs(small_cohort, load_config(None, SMALL).registration, idx,
                                      [sample_generator(0, 0, k) for k in range(40)])
    template = small_cohort.template_t1[0]
    assert [torch.equal(m, template) for m in batch.moving] == [torch.equal(m, template) for m in plain.moving]
    cfg = load_config(None, {**SMALL, "registration": {**SMALL["registration"], **settings}})
    _train("registration", cfg, small_cohort, tmp_path / "warp", seed=0)
    logged = [float(r["known_warp_mse_mm2"]) for r in csv.DictReader(open(tmp_path / "warp" / "log.csv"))]
    assert len(logged) == 4 and any(math.isfinite(v) and v > 0 for v in logged)


@pytest.mark.parametrize("settings", [{"warp_pairs": 1.5}, {"warp_pairs": float("nan")}, {"warp_sigma_mm": 0},
                                      {"warp_rms_mm": -1}, {"warp_weight": -1}])
def test_config_refuses_bad_known_warp_settings(settings):
    with pytest.raises(ConfigError, match="registration.warp_pairs must be in"):
        load_config(None, {"registration": settings})


@pytest.mark.parametrize("moving, fixed", [(0.8, 0.3), (0.5, -0.1), (0.5, float("nan"))])
def test_config_refuses_template_shares_over_one(moving, fixed):
    with pytest.raises(ConfigError, match="template_moving and registration.template_fixed"):
        load_config(None, {"registration": {"template_moving": moving, "template_fixed": fixed}})


def test_symmetric_centrality_cancels_a_direction_independent_bias(small_cohort):
    """With ``decoder.symmetric_centrality`` the mean displacement is (u(atlas->n) - u(n->atlas)) / 2: a bias
    that both directions share cancels, the antisymmetric part is kept; the forward form keeps the bias."""
    velocity = torch.zeros(1, 3, *small_cohort.images.shape[2:])
    nb = small_cohort.images[:3]
    means = {}
    for symmetric in (False, True):
        cfg = load_config(None, {**SMALL, "decoder": {"symmetric_centrality": symmetric}})
        for bias in (0.0, 0.2):
            objective = stages.DecoderObjective(cfg, small_cohort, _BiasedRegistration(bias), "cpu")
            atlas, _ = objective.atlas(velocity)
            means[symmetric, bias] = objective.mean_displacement(atlas, nb)
    bias_mm = 0.2 * float(small_cohort.grid.spacing[0])
    forward_shift = (means[False, 0.2] - means[False, 0.0]).abs().mean()
    symmetric_shift = (means[True, 0.2] - means[True, 0.0]).abs().max()
    print(f"bias {bias_mm} mm: forward shift {float(forward_shift):.4f}, symmetric {float(symmetric_shift):.5f}")
    assert forward_shift == pytest.approx(bias_mm, rel=0.05)
    # exp(v + b) is not exp(v) + b where v varies: the bias cancels to first order only
    assert symmetric_shift < 0.05 * bias_mm
    true = means[True, 0.0].abs().max()
    assert true > 1e-3 and (means[True, 0.0] - means[False, 0.0]).abs().max() < 0.05 * true  # the true part is kept


def test_decoder_volume_term_measures_the_warped_label(small_cohort):
    """The volume term against hand values: the identity keeps the template's ventricles (the working-grid
    fraction sum, 16.9 ml at 1 mm); a uniform scaling about the centre by s multiplies the volume by s^3."""
    from diffdef.networks import RegistrationNet
    from diffdef.template import load_template

    cfg = load_config(None, {**SMALL, "decoder": {"volume_labels": {"ventricle_volume": 4}}})
    objective = stages.DecoderObjective(cfg, small_cohort, RegistrationNet(**cfg.architecture["registration"]), "cpu")
    spec = small_cohort.spec
    template_ml = load_template().label_volumes_ml()["lateral ventricles"]
    shape = small_cohort.images.shape[2:]

    def term(disp, ml, age=70.0):
        cond = spec.normalise({"age": age, "ventricle_volume": ml})[0]
        return objective.volume(disp, cond)

    zero = torch.zeros(1, 3, *shape, requires_grad=True)
    loss, (err,) = term(zero, template_ml)
    assert abs(err) < 1.0 and float(loss) < 1e-3  # the block-averaged fractions keep the 1 mm volume
    loss, (err,) = term(zero, 2 * template_ml)
    assert err == pytest.approx(-50, abs=1) and float(loss) == pytest.approx(math.log(2) ** 2, rel=0.03)
    loss.backward()
    assert zero.grad.abs().sum() > 0  # differentiable in the displacement
    s = 0.9  # pull-back u(x) = (s - 1)(x - c): the atlas is the template magnified by 1/s
    centre = (torch.tensor(shape, dtype=torch.float32) - 1) / 2
    axes = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))
    disp = ((s - 1) * (axes - centre[:, None, None, None]))[None]
    _, (err,) = term(disp, template_ml)
    assert err == pytest.approx(100 * (s**-3 - 1), abs=4)
    _, errors = term(zero, float("nan"))  # ventricle volume omitted: no term
    assert errors == []


def test_last_losses_skip_steps_without_a_value(tmp_path):
    """A log column can be NaN in a step (no volume asked): the exported losses keep its last finite value,
    so model.json stays strict JSON."""
    from diffdef_training.pipeline import _last_losses

    (tmp_path / "log.csv").write_text("step,volume_abs_error_pct\n10,4.5\n20,nan\n")
    assert _last_losses(tmp_path) == {"step": 20.0, "volume_abs_error_pct": 4.5}


def test_bank_mixing_draws_conditions_independently(small_cohort):
    """With bank_mixing 0.5 the first half of the bank pairs each condition with another subject's values
    (combinations the cohort lacks); the second half keeps the subjects' own pairs; 0 keeps them all."""
    pairs = {tuple(c.tolist()) for c in small_cohort.conditions}
    for mixing in (0.0, 0.5):
        cfg = load_config(None, {**SMALL, "decoder": {"bank_size": 64, "condition_dropout": 0.0, "bank_mixing": mixing}})
        conds = stages.bank_conditions(cfg, small_cohort)
        own = [tuple(c.tolist()) in pairs for c in conds]
        half = 32 if mixing else 0
        assert all(own[half:])
        assert sum(own[:half]) <= 0.4 * half  # 8 subjects: about 1 in 8 mixed draws repeats a pair by chance
        assert torch.equal(conds, stages.bank_conditions(cfg, small_cohort))  # deterministic in the seed


def test_bank_uniform_covers_the_cohorts_edges(small_cohort):
    """With bank_uniform 0.5 after bank_mixing 0.25, a quarter of the bank is mixed, the next half is drawn
    uniformly between the cohort's extremes (log-uniformly for a log condition: its log is uniform, so its
    geometric mean is about the extremes'), the last quarter keeps the subjects' own pairs."""
    pairs = {tuple(c.tolist()) for c in small_cohort.conditions}
    cfg = load_config(None, {**SMALL, "decoder": {"bank_size": 400, "condition_dropout": 0.0, "bank_mixing": 0.25,
                                                   "bank_uniform": 0.5, "log_conditions": ["ventricle_volume"]}})
    conds = stages.bank_conditions(cfg, small_cohort)
    assert all(tuple(c.tolist()) in pairs for c in conds[300:])
    raw = conds[100:300] * torch.tensor([c.sd for c in small_cohort.spec.conditions]) + \
        torch.tensor([c.mean for c in small_cohort.spec.conditions])
    cohort_raw = small_cohort.conditions * torch.tensor([c.sd for c in small_cohort.spec.conditions]) + \
        torch.tensor([c.mean for c in small_cohort.spec.conditions])
    lo, hi = cohort_raw.min(0).values, cohort_raw.max(0).values
    assert bool((raw >= lo - 1e-3).all() and (raw <= hi + 1e-3).all())
    assert float(raw[:, 0].mean()) == pytest.approx(float(lo[0] + hi[0]) / 2, rel=0.05)  # age: uniform
    log_v = raw[:, 1].log()
    assert float(log_v.mean()) == pytest.approx(float((lo[1].log() + hi[1].log()) / 2), abs=0.08)
    assert not any(tuple(c.tolist()) in pairs for c in conds[100:300])
    space = stages.NeighbourhoodSpace(small_cohort.spec, small_cohort.conditions, ["ventricle_volume"])
    assert torch.allclose(space.normalised(space(conds)), conds, atol=1e-5)  # the inverse


def test_bank_volume_margin_extends_only_the_volume_conditions(small_cohort):
    """bank_volume_margin 0.2 widens the uniform draw of the volume condition (log scale) by 0.2 of its log range
    on each side, so some draws lie past the cohort's extremes and none past the widened ones; age, which is not a
    volume, keeps the cohort's extremes. A negative margin is refused, and so is one without the log-uniform draw
    to widen."""
    decoder = {"bank_size": 400, "condition_dropout": 0.0, "bank_mixing": 0.0, "bank_uniform": 1.0,
               "log_conditions": ["ventricle_volume"], "volume_labels": {"ventricle_volume": 4},
               "bank_volume_margin": 0.2}
    cfg = load_config(None, {**SMALL, "decoder": decoder})
    sd = torch.tensor([c.sd for c in small_cohort.spec.conditions])
    mean = torch.tensor([c.mean for c in small_cohort.spec.conditions])
    raw = stages.bank_conditions(cfg, small_cohort) * sd + mean
    cohort_raw = small_cohort.conditions * sd + mean
    lo, hi = cohort_raw.min(0).values, cohort_raw.max(0).values
    assert bool((raw[:, 0] >= lo[0] - 1e-3).all() and (raw[:, 0] <= hi[0] + 1e-3).all())
    log_lo, log_hi = lo[1].log(), hi[1].log()
    span = log_hi - log_lo
    log_v = raw[:, 1].log()
    assert bool((log_v >= log_lo - 0.2 * span - 1e-4).all() and (log_v <= log_hi + 0.2 * span + 1e-4).all())
    assert int((log_v < log_lo).sum()) > 20 and int((log_v > log_hi).sum()) > 20  # about 400 * 0.2 / 1.4 = 57 each
    with pytest.raises(ConfigError, match="bank_volume_margin must be 0 or more"):
        load_config(None, {"decoder": {**decoder, "bank_volume_margin": -0.1}})
    for other in ({"log_conditions": []}, {"bank_uniform": 0.0}):  # a negative volume; nothing to widen
        with pytest.raises(ConfigError, match="bank_volume_margin widens the uniform draw"):
            load_config(None, {"decoder": {**decoder, **other}})


@pytest.mark.parametrize("mixing, uniform", [(0.6, 0.6), (0.0, -0.1), (0.0, 1.5)])
def test_config_refuses_bank_fractions_over_one(mixing, uniform):
    with pytest.raises(ConfigError, match="bank_mixing and decoder.bank_uniform"):
        load_config(None, {"decoder": {"bank_mixing": mixing, "bank_uniform": uniform}})


def test_decoder_neighbourhood_volume_term(small_cohort):
    """The neighbourhood-volume term: at the identity the atlas keeps the template's volumes, so its error is
    the template's volume against the Gaussian-weighted mean of the subjects' (hand-computed here), per label or
    per group of labels counted together; a cohort without label maps is refused."""
    import copy

    from diffdef.networks import RegistrationNet

    cond = small_cohort.spec.normalise({"age": 70.0, "ventricle_volume": 30.0})[0]
    tmpl = small_cohort.template_fractions.argmax(1)
    subj = small_cohort.labels.argmax(1)
    # each label alone, and GM + WM counted together (brain tissue): one term per entry
    for entries, groups in (([2, 3], [(2,), (3,)]), ([[2, 3]], [(2, 3)])):
        cfg = load_config(None, {**SMALL, "decoder": {"neighbourhood_volume_labels": entries}})
        objective = stages.DecoderObjective(cfg, small_cohort, RegistrationNet(**cfg.architecture["registration"]), "cpu")
        zero = torch.zeros(1, 3, *small_cohort.images.shape[2:], requires_grad=True)
        loss, errors = objective.neighbourhood_volume(zero, cond)
        w = stages.neighbourhood_weights(cond, small_cohort.conditions, cfg.decoder.sigma)
        assert len(errors) == len(groups)
        for e, group in zip(errors, groups):
            inside = lambda labels: sum(labels == label for label in group)
            ratios = inside(subj).sum(dim=(1, 2, 3)).float() / inside(tmpl).sum()
            target = float((w * ratios).sum() / w.sum())
            assert e == pytest.approx(100 * (1 / target - 1), abs=1e-3)
        loss.backward()
        assert zero.grad.abs().sum() > 0
    unlabelled = copy.copy(small_cohort)
    unlabelled.labels = None
    with pytest.raises(ValueError, match="label maps"):
        stages.DecoderObjective(cfg, unlabelled, RegistrationNet(**cfg.architecture["registration"]), "cpu")


def test_decoder_neighbourhood_shape_term(small_cohort):
    """The neighbourhood-shape term: at the identity it is sum((template fraction - q)^2) / sum(template fraction)
    per label, q the Gaussian-weighted mean of the subjects' one-hot label maps (hand-computed here), summed over
    the labels; it is 0 for an atlas equal to that mean, has a gradient, and a cohort without label maps is refused."""
    import copy

    from diffdef.networks import RegistrationNet

    cond = small_cohort.spec.normalise({"age": 70.0, "ventricle_volume": 30.0})[0]
    cfg = load_config(None, {**SMALL, "decoder": {"neighbourhood_shape_labels": [4, 1]}})
    objective = stages.DecoderObjective(cfg, small_cohort, RegistrationNet(**cfg.architecture["registration"]), "cpu")
    zero = torch.zeros(1, 3, *small_cohort.images.shape[2:], requires_grad=True)
    loss = objective.neighbourhood_shape(zero, cond)
    w = stages.neighbourhood_weights(cond, small_cohort.conditions, cfg.decoder.sigma)
    expected = 0.0
    for label in (4, 1):
        q = sum(wi * (small_cohort.labels[i, label] > 0.5).float() for i, wi in enumerate(w)) / w.sum()
        p = small_cohort.template_fractions[0, label]
        expected += float(((p - q) ** 2).sum() / p.sum())
    assert loss.item() == pytest.approx(expected, rel=1e-4) and expected > 0
    loss.backward()
    assert zero.grad.abs().sum() > 0
    # an atlas whose fractions are the neighbourhood's mean scores 0
    mean_cohort = copy.copy(small_cohort)
    mean_cohort.template_fractions = small_cohort.template_fractions.clone()
    for label in (4, 1):
        mean_cohort.template_fractions[0, label] = (w[:, None, None, None] * small_cohort.labels[:, label]).sum(0) / w.sum()
    at_mean = stages.DecoderObjective(cfg, mean_cohort, RegistrationNet(**cfg.architecture["registration"]), "cpu")
    assert float(at_mean.neighbourhood_shape(torch.zeros_like(zero), cond)) == pytest.approx(0.0, abs=1e-10)
    unlabelled = copy.copy(small_cohort)
    unlabelled.labels = None
    with pytest.raises(ValueError, match="neighbourhood_shape_labels needs label maps"):
        stages.DecoderObjective(cfg, unlabelled, RegistrationNet(**cfg.architecture["registration"]), "cpu")


@pytest.mark.parametrize("key", ["neighbourhood_volume_labels", "neighbourhood_shape_labels"])
def test_pipeline_refuses_label_terms_without_label_maps_before_any_stage(key, tmp_path, monkeypatch):
    """A decoder term that reads the cohort's label maps, on a cohort without them, stops the pipeline before the
    first stage trains (it used to fail only when the decoder stage began, after the upstream stages' hours)."""
    from diffdef_training import pipeline

    real = pipeline.load_cohort

    def without_labels(cfg, split="train", progress=True):
        cohort, raw = real(cfg, split, progress)
        cohort.labels = None
        return cohort, raw

    monkeypatch.setattr(pipeline, "load_cohort", without_labels)
    cfg = load_config(None, {**SMALL, "output": str(tmp_path / "run"), "decoder": {key: [4] if "shape" in key else [[2, 3]]}})
    with pytest.raises(ValueError, match=rf"decoder\.{key} needs label maps"):
        run_pipeline(cfg, progress=False)
    assert not (tmp_path / "run" / "autoencoder").exists()


@pytest.mark.parametrize("decoder, words", [
    ({"neighbourhood_shape_labels": [0]}, "template label values"),
    ({"neighbourhood_shape_labels": [9]}, "template label values"),
    ({"neighbourhood_volume_labels": [0]}, "template label values"),
    ({"neighbourhood_volume_labels": [2, 7]}, "template label values"),
    ({"neighbourhood_volume_labels": [[2, 7]]}, "template label values"),
    ({"neighbourhood_volume_labels": [[]]}, "empty group"),
    ({"volume_labels": {"ventricle_volume": 4}, "neighbourhood_volume_labels": [4]}, "in both"),
    ({"volume_labels": {"ventricle_volume": 4}, "neighbourhood_volume_labels": [[3, 4]]}, "in both")])
def test_config_refuses_bad_neighbourhood_volume_labels(decoder, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, {"decoder": decoder})


@pytest.mark.parametrize("volume_labels, words", [
    ({"brain_age": 4}, "not in cohort.conditions"), ({"ventricle_volume": 0}, "template label value"),
    ({"ventricle_volume": 9}, "template label value"), ({"ventricle_volume": "4"}, "template label value")])
def test_config_refuses_bad_volume_labels(volume_labels, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, {"decoder": {"volume_labels": volume_labels}})


@pytest.mark.parametrize("log_conditions", [["brain_age"], ["ventricle_volume", "sex"]])
def test_config_refuses_an_unknown_log_condition(log_conditions):
    with pytest.raises(ConfigError, match="decoder.log_conditions names .* not in cohort.conditions"):
        load_config(None, {"decoder": {"log_conditions": log_conditions}})


def test_docs_schema_table_is_current():
    from diffdef_training.config import schema_table

    docs = (ROOT / "docs" / "training.md").read_text()
    assert schema_table() in docs
    for words in ("--nproc_per_node 4", "--nnodes", "--node_rank", "--rdzv_endpoint", "NCCL", "gloo", "amp", "--resume"):
        assert words in docs


def test_shipped_variants_differ_from_shipped_only_where_they_say():
    """Every config in configs/ loads; the ablation shares everything with shipped.yaml but its output and the
    decoder keys of the MP term (a change to shipped.yaml must reach it too)."""
    configs = ROOT / "DiffDefTraining" / "configs"
    for path in configs.glob("*.yaml"):
        load_config(path)
    shipped = load_config(configs / "shipped.yaml").to_dict()
    allowed = {"shipped-no-mp.yaml": {"mp_loss", "mp_weight", "symmetric_centrality"}}  # the MP term's options do nothing without it
    for name, keys in allowed.items():
        variant = load_config(configs / name).to_dict()
        assert variant["output"] != shipped["output"]
        assert {k: v for k, v in variant.items() if k not in ("output", "decoder")} == \
            {k: v for k, v in shipped.items() if k not in ("output", "decoder")}
        differing = {k for k in shipped["decoder"] if variant["decoder"][k] != shipped["decoder"][k]}
        assert differing == keys, name


def test_training_benchmark_defaults_to_the_shipped_config():
    """``bench_training`` without --config projects the shipped model's budget, as its help says (it used to
    fall back to the library defaults, whose step counts are not the shipped ones)."""
    from diffdef_training import bench_training

    assert bench_training.SHIPPED_CONFIG == ROOT / "DiffDefTraining" / "configs" / "shipped.yaml"
    cfg = load_config(bench_training.SHIPPED_CONFIG)
    shipped = json.loads((ROOT / "DiffDefSlicer" / "Resources" / "Models" / "default" / "model.json").read_text())
    steps = shipped["provenance"]["steps"]  # the budget the shipped bundle was trained with
    assert {stage: cfg.stage(stage).steps for stage in steps} == steps


def test_training_benchmark_runs_every_stage(capsys):
    """``bench_training`` times steps of each stage and projects the budget, on a config with a volume term as
    the shipped one has (the decoder reads the condition's mean and sd from the cohort's spec: the benchmark once
    left it unset and failed at the decoder)."""
    from diffdef_training import bench_training

    bench_training.main(["--config", str(ROOT / "DiffDefTraining" / "configs" / "tiny.yaml"), "--steps", "1",
                         "--subjects", "8"])
    out = capsys.readouterr().out
    for stage in ("autoencoder", "diffusion", "registration", "decoder", "latent bank"):
        assert stage in out
    assert "projected total for this config" in out


def test_training_benchmark_times_steps_inside_the_loop(small_cohort, tmp_path):
    """A benchmark step is a step of the stage's own loop, as log.csv reports it, not a whole one-step stage run
    with its setup (which overstated the shipped decoder's step by 40 %): ``steps`` times after a warm-up step,
    together less than the stage's wall time, and the config left as it was."""
    from diffdef_training import bench_training

    cfg, cohort = load_config(None, SMALL), small_cohort
    before = cfg.registration
    ctx = RunContext(0, 1, torch.device("cpu"), cfg.seed)
    t = time.perf_counter()
    times, peak = bench_training.stage_step_times(
        cfg, "registration", lambda c, d: stages.train_registration(c, ctx, cohort, d, progress=False), 3, tmp_path)
    wall = time.perf_counter() - t
    assert len(times) == 3 and all(s > 0 for s in times) and sum(times) < wall and peak > 0
    assert cfg.registration is before


def test_sweep_trains_the_setting_and_scores_it(tiny_run, tmp_path):
    """sweep.sh retrains only the decoder (or the stages named by STAGES), with the override, on the given
    upstream stages, and scores its bundle on the validation conditions (tiny.yaml stands in for shipped.yaml)."""
    env = {**os.environ, "CONFIG": str(ROOT / "DiffDefTraining" / "configs" / "tiny.yaml"), "UPSTREAM": str(tiny_run),
           "SWEEP_DIR": str(tmp_path), "VALIDATION": "65:30",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    script = ROOT / "DiffDefTraining" / "scripts" / "sweep.sh"
    done_hash = lambda run, stage: json.loads((run / stage / "done.json").read_text())["hash"]

    done = subprocess.run(["bash", str(script), "w2", "decoder.smooth_weight=2"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "w2"
    for stage in ("autoencoder", "diffusion", "registration"):  # reused, not retrained
        assert (run / stage / "done.json").read_text() == (tiny_run / stage / "done.json").read_text()
    assert done_hash(run, "decoder") != done_hash(tiny_run, "decoder")
    rows = [r for r in json.loads((run / "val" / "evaluation.json").read_text())["rows"] if r["method"] == "DiffDef"]
    assert [(r["age"], r["ventricle_volume"], r["seed"]) for r in rows] == [(65.0, 30.0, 0), (65.0, 30.0, 1)]
    assert all(0 <= r["dice"]["GM"] <= 1 for r in rows)

    done = subprocess.run(["bash", str(script), "reg", "registration.steps=5", "registration.antisymmetric=true"],
                          env={**env, "STAGES": "registration,decoder"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "reg"
    for stage in ("autoencoder", "diffusion"):
        assert (run / stage / "done.json").read_text() == (tiny_run / stage / "done.json").read_text()
    assert json.loads((run / "registration" / "done.json").read_text())["losses"]["step"] == 5
    for stage in ("registration", "decoder"):
        assert done_hash(run, stage) != done_hash(tiny_run, stage)
    assert (run / "val" / "evaluation.json").exists()
    from diffdef.bundle import load_bundle

    assert load_bundle(run / "bundle").nets["registration"].antisymmetric  # the option travels with the bundle
    assert not load_bundle(tiny_run / "bundle").nets["registration"].antisymmetric

    done = subprocess.run(["bash", str(script), "fromb"], env={**env, "UPSTREAM": str(tiny_run / "bundle")},
                          capture_output=True, text=True)  # a bundle as upstream: unpacked, then the decoder trains
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "fromb"
    for stage in ("autoencoder", "diffusion", "registration"):
        assert done_hash(run, stage) == done_hash(tiny_run, stage)
        assert json.loads((run / stage / "done.json").read_text())["unpacked_from"] == str(tiny_run / "bundle")
    assert (run / "val" / "evaluation.json").exists()
    exported, source = (json.loads((r / "bundle" / "model.json").read_text())["provenance"] for r in (run, tiny_run))
    for stage in ("autoencoder", "diffusion", "registration"):  # the unpacked stages' records travel on, not lost
        assert exported["final_losses"][stage] == source["final_losses"][stage] != {}
        assert exported["stage_seconds"][stage] == source["stage_seconds"][stage]

    refused = subprocess.run(["bash", str(script), "bad"], env={**env, "STAGES": "registration"}, capture_output=True, text=True)
    assert refused.returncode == 2 and "STAGES must include decoder" in refused.stderr
    assert not (tmp_path / "bad").exists()


def test_unpack_gives_a_run_the_bundles_upstream_stages(tiny_run, tiny_bundle, tmp_path, capsys):
    """``diffdef-train unpack`` writes a bundle's autoencoder, diffusion and registration networks as finished
    stages of a new run folder: the trained stages' own weights and hashes, so a decoder run on them retrains
    nothing else and, with the same seed, trains the bundle's decoder again."""
    from diffdef_training.cli import main

    tiny, run = ROOT / "DiffDefTraining" / "configs" / "tiny.yaml", tmp_path / "run"
    main(["unpack", str(tiny_bundle), "--config", str(tiny), "--output", str(run)])
    assert "--stages decoder" in capsys.readouterr().out
    for s in ("autoencoder", "diffusion", "registration"):
        assert _max_diff(_weights(run / s / f"{s}.safetensors"), _weights(tiny_run / s / f"{s}.safetensors")) == 0
        done, trained = (json.loads((d / s / "done.json").read_text()) for d in (run, tiny_run))
        assert done["hash"] == trained["hash"] and done["seconds"] == pytest.approx(trained["seconds"])
        assert done["unpacked_from"] == str(tiny_bundle)
    before = {s: (run / s / "done.json").read_text() for s in ("autoencoder", "diffusion", "registration")}
    bundle = run_pipeline(load_config(tiny, {"output": str(run)}), progress=False, only=("decoder",))
    assert {s: (run / s / "done.json").read_text() for s in before} == before
    meta, original = (json.loads((b / "model.json").read_text()) for b in (bundle, tiny_bundle))
    assert meta["latent"]["scale_factor"] == pytest.approx(original["latent"]["scale_factor"])
    for name in ("diffusion", "condition_embedding", "registration", "image_decoder"):
        assert meta["weights"][name]["sha256"] == original["weights"][name]["sha256"]
    assert _max_diff(_weights(bundle / "decoder.safetensors"), _weights(tiny_bundle / "decoder.safetensors")) < 1e-5


def test_unpack_refuses_other_settings_existing_stages_and_a_bundle_without_the_autoencoder(tiny_bundle, tmp_path):
    from diffdef.bundle import BundleError
    from diffdef_training.cli import main
    from diffdef_training.pipeline import unpack_bundle

    tiny = ROOT / "DiffDefTraining" / "configs" / "tiny.yaml"
    run = tmp_path / "run"
    other = load_config(tiny, {"output": str(run), "registration": {"smooth_weight": 2.0}})
    with pytest.raises(ValueError, match=r"registration \(section\(s\) registration\)"):
        unpack_bundle(tiny_bundle, other)
    assert not run.exists()  # nothing written
    unpack_bundle(tiny_bundle, other, ("autoencoder", "diffusion"))  # the stages that agree
    with pytest.raises(FileExistsError, match="already exist"):
        unpack_bundle(tiny_bundle, load_config(tiny, {"output": str(run)}))
    assert not (run / "registration").exists()
    with pytest.raises(ValueError, match="Cannot unpack stage 'decoder'"):
        unpack_bundle(tiny_bundle, load_config(tiny, {"output": str(tmp_path / "b")}), ("decoder",))
    no_autoencoder = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, no_autoencoder)
    meta = json.loads((no_autoencoder / "model.json").read_text())
    del meta["weights"]["image_decoder"]
    (no_autoencoder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="no autoencoder weights"):
        unpack_bundle(no_autoencoder, load_config(tiny, {"output": str(tmp_path / "c")}))
    assert not (tmp_path / "c").exists()
    unpack_bundle(no_autoencoder, load_config(tiny, {"output": str(tmp_path / "c")}), ("registration",))
    with pytest.raises(SystemExit, match="error: .*already exist"):
        main(["unpack", str(tiny_bundle), "--config", str(tiny), "--output", str(run), "--stages", "diffusion"])


def test_added_options_at_their_default_keep_finished_runs_current():
    """Options added after models were trained (``config.ADDED``) are left out of the run hash and the checkpoint
    key while at their default: tiny.yaml's decoder hash and key are the ones computed before those options
    existed (commit 6c3efb1), so finished stages and checkpoints stay current; setting one changes both."""
    from diffdef_training.config import settings_key
    from diffdef_training.pipeline import _DEPENDS

    cfg = load_config(ROOT / "DiffDefTraining" / "configs" / "tiny.yaml")
    sections = ("architecture", *_DEPENDS["decoder"])
    assert cfg.hash(*sections) == "50921aaf6f53d549"
    key = settings_key(cfg.decoder)
    assert key.startswith("DecoderConfig(steps=3, ") and "symmetric_centrality" not in key and key.endswith("volume_weight=1.0)")
    for section, option in (("decoder", "symmetric_centrality"), ("decoder", "volume_on_template_grid"),
                            ("decoder", "local_linear"), ("registration", "antisymmetric"),
                            ("decoder", "velocity_smoothing_mm"), ("decoder", "neighbourhood_volume_weight"),
                            ("decoder", "log_conditions"), ("decoder", "bank_uniform"),
                            ("decoder", "neighbourhood_volume_sigma"), ("decoder", "neighbourhood_shape_labels"),
                            ("decoder", "neighbourhood_shape_weight")):
        value = {"velocity_smoothing_mm": 4.0, "neighbourhood_volume_weight": 4.0, "bank_uniform": 0.5,
                 "neighbourhood_volume_sigma": 0.2, "neighbourhood_shape_labels": [4], "neighbourhood_shape_weight": 4.0,
                 "log_conditions": ["ventricle_volume"]}.get(option, True)
        changed = load_config(ROOT / "DiffDefTraining" / "configs" / "tiny.yaml", {section: {option: value}})
        assert changed.hash(*sections) != cfg.hash(*sections)
        assert f"{option}={value}" in settings_key(getattr(changed, section))


def test_generation_only_options_never_change_a_run():
    """``sampling.samples``, ``generation_guidance`` and ``smoothing_mm`` are read when atlases are generated, never
    in training: no value of them changes a run hash or a checkpoint key (so changing one re-exports the bundle and
    retrains nothing); out of range they are refused."""
    from diffdef_training.config import settings_key
    from diffdef_training.pipeline import _DEPENDS

    path = ROOT / "DiffDefTraining" / "configs" / "tiny.yaml"
    cfg = load_config(path)
    for samples, generation_guidance, smoothing_mm in ((1, 1.0, 0.0), (3, 0.0, 4.0), (16, 2.5, 6.5)):
        changed = load_config(path, {"sampling": {"samples": samples, "generation_guidance": generation_guidance,
                                                  "smoothing_mm": smoothing_mm}})
        assert (changed.sampling.samples, changed.sampling.generation_guidance, changed.sampling.smoothing_mm) == (
            samples, generation_guidance, smoothing_mm)
        assert changed.hash() == cfg.hash() and changed.hash("architecture", *_DEPENDS["decoder"]) == cfg.hash(
            "architecture", *_DEPENDS["decoder"])
        assert settings_key(changed.sampling) == settings_key(cfg.sampling)
    assert load_config(path, {"sampling": {"steps": 7}}).hash("sampling") != cfg.hash("sampling")  # steps count
    for key in ("samples", "steps"):
        with pytest.raises(ConfigError, match=f"sampling.{key} must be >= 1"):
            load_config(path, {"sampling": {key: 0}})
    assert load_config(path, {"sampling": {"guidance": 2.0}}).hash("sampling") != cfg.hash("sampling")  # the bank's
    for key in ("guidance", "generation_guidance"):
        with pytest.raises(ConfigError, match="must be >= 0"):
            load_config(path, {"sampling": {key: -1.0}})
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="sampling.smoothing_mm must be a finite number >= 0"):
            load_config(path, {"sampling": {"smoothing_mm": bad}})


def test_bundle_records_the_generation_default(tiny_bundle):
    """The bundle's sampling defaults are the config's: ``samples``, ``smoothing_mm``, and ``generation_guidance`` as
    the guidance weight where it is set (else the latent bank's ``guidance``)."""
    meta = json.loads((tiny_bundle / "model.json").read_text())
    config = meta["provenance"]["config"]["sampling"]
    assert meta["sampling"]["samples"] == config["samples"] >= 1
    assert meta["sampling"]["smoothing_mm"] == config["smoothing_mm"] == 0.0
    assert (config["guidance"], config["generation_guidance"]) == (1.5, 1.0)  # tiny.yaml: the bank at 1.5
    assert meta["sampling"]["guidance"] == 1.0


def test_neighbourhood_volume_target_local_linear_and_own_width(small_cohort):
    """The neighbourhood-volume target is the subjects' brain-tissue ratios weighted by the Gaussian weights of
    ``decoder.sigma``; with ``decoder.neighbourhood_volume_local_linear`` times :func:`local_linear_factors`
    (the local-linear estimate at the condition); with ``decoder.neighbourhood_volume_sigma`` by the Gaussian of
    that width instead. At the cohort's oldest age the Gaussian mean is pulled towards younger subjects, so all
    three targets differ."""
    from diffdef.networks import RegistrationNet

    oldest = float(small_cohort.conditions[:, 0].max()) * small_cohort.spec.conditions[0].sd + small_cohort.spec.conditions[0].mean
    cond = small_cohort.spec.normalise({"age": oldest, "ventricle_volume": 30.0})[0]
    zero = torch.zeros(1, 3, *small_cohort.images.shape[2:])
    variants = {"gaussian": {}, "local_linear": {"neighbourhood_volume_local_linear": True},
                "own_width": {"neighbourhood_volume_sigma": 0.15}}
    errors = {}
    for name, extra in variants.items():
        cfg = load_config(None, {**SMALL, "decoder": {"neighbourhood_volume_labels": [[2, 3]], **extra}})
        objective = stages.DecoderObjective(cfg, small_cohort, RegistrationNet(**cfg.architecture["registration"]), "cpu")
        errors[name] = objective.neighbourhood_volume(zero, cond)[1][0]
    assert cfg.decoder.sigma == 0.3
    w = stages.neighbourhood_weights(cond, small_cohort.conditions, cfg.decoder.sigma)
    weights = {"gaussian": w, "local_linear": w * stages.local_linear_factors(cond, small_cohort.conditions, w),
               "own_width": stages.neighbourhood_weights(cond, small_cohort.conditions, 0.15)}
    tmpl, subj = small_cohort.template_fractions.argmax(1), small_cohort.labels.argmax(1)
    inside = lambda labels: (labels == 2) | (labels == 3)
    ratios = inside(subj).sum(dim=(1, 2, 3)).float() / inside(tmpl).sum()
    for name, wt in weights.items():
        target = float((wt * ratios).sum() / wt.sum())
        assert errors[name] == pytest.approx(100 * (1 / target - 1), abs=1e-3)
    assert min(abs(errors[a] - errors[b]) for a, b in (("gaussian", "local_linear"), ("gaussian", "own_width"))) > 1e-3
