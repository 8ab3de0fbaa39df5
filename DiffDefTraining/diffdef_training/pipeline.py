"""Run the stages in order on a cohort (synthetic by default) and export a model bundle.

A stage whose ``done.json`` records the same configuration hash as now is skipped and its weights are
reloaded; ``resume`` continues an interrupted stage from its latest checkpoint.
"""
from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diffdef.bundle import save_bundle
from diffdef.conditions import Condition, ConditionSpec
from diffdef.io import atomic_path
from diffdef.networks import channels_last_on_cpu
from diffdef.template import NUM_LABELS, load_template

from . import held_volumes, stages
from .config import TrainConfig
from .engine import CheckpointError, RunContext, check_checkpoint, init_distributed

STAGES = ("autoencoder", "diffusion", "registration", "decoder")
SYNTHETIC_CONDITIONS = ("age", "ventricle_volume")  # the columns of SyntheticCohort's condition vectors
UNITS = {"age": "years", "ventricle_volume": "ml"}
# which config sections each stage's result depends on
_DEPENDS = {"autoencoder": ("cohort", "seed", "autoencoder"), "diffusion": ("cohort", "seed", "autoencoder", "diffusion"),
            "registration": ("cohort", "seed", "registration"),
            "decoder": ("cohort", "seed", "autoencoder", "diffusion", "registration", "decoder", "sampling")}
# which stages' trained networks each stage reads
_REQUIRES = {"autoencoder": (), "diffusion": ("autoencoder",), "registration": (),
             "decoder": ("autoencoder", "diffusion", "registration")}


def load_cohort(cfg: TrainConfig, split: str = "train", progress: bool = True) -> tuple[stages.CohortTensors, np.ndarray]:
    """The cohort on the working grid as tensors, plus the raw conditions (N, K) (NaN = missing)."""
    template = load_template()
    t1, frac = template.on_working_grid(cfg.cohort.factor)
    grid = template.working_grid(cfg.cohort.factor).grid
    if cfg.cohort.source == "synthetic":
        from .synthetic import SyntheticCohort

        size, offset = (cfg.cohort.size, 0) if split == "train" else (cfg.cohort.held_out, cfg.cohort.size)
        ds = SyntheticCohort(size, cfg.cohort.seed, cfg.cohort.factor, offset=offset)
        from tqdm import tqdm

        items = [ds[i] for i in tqdm(range(len(ds)), desc=f"synthesising {split} cohort", disable=not progress)]
        cols = [SYNTHETIC_CONDITIONS.index(c) for c in cfg.cohort.conditions]  # the configured ones, in order
        items = [{**it, "conditions": it["conditions"][cols]} for it in items]
    else:
        from .cohort import PreprocessOptions, preprocess_cohort

        cache = cfg.cohort.cache or str(Path(cfg.output) / "cohort_cache")
        ds, _ = preprocess_cohort(cfg.cohort.source, cache, options=PreprocessOptions(factor=cfg.cohort.factor),
                                  conditions=cfg.cohort.conditions, progress=progress)
        items = [ds[i] for i in range(len(ds))]
        if not items:
            raise ValueError(f"No subject of {cfg.cohort.source} could be preprocessed; see the report in {cache}.")
    images = torch.stack([it["image"] for it in items]).float()
    have_labels = all(it.get("labels") is not None for it in items)
    labels = None
    if have_labels:
        lab = torch.stack([it["labels"] for it in items]).long()
        labels = torch.nn.functional.one_hot(lab[:, 0], NUM_LABELS).permute(0, 4, 1, 2, 3).float()
    raw = torch.stack([it["conditions"] for it in items]).float()
    if cfg.cohort.native_volumes:
        raw = to_template_space(cfg, raw, torch.tensor([it["affine_determinant"] for it in items]))
    volumes = torch.stack([it["label_volumes_ml"] for it in items]).double() \
        if all("label_volumes_ml" in it for it in items) else None
    if cfg.cohort.source != "synthetic" and volumes is not None:
        for message in volume_condition_mismatches(cfg, raw.numpy(), volumes.numpy()):
            print(f"warning: {message}", file=sys.stderr)
    return stages.CohortTensors(images, labels, raw, None, t1, frac, grid, volumes), raw.numpy()


def to_template_space(cfg: TrainConfig, raw: torch.Tensor, determinants: torch.Tensor) -> torch.Tensor:
    """The conditions ``raw`` (N, K) with each of ``cohort.native_volumes`` (ml in the subject's own space) divided
    by the subject's affine determinant ``determinants`` (N,) (template -> subject), i.e. in template space; NaN
    (missing) stays NaN."""
    raw = raw.clone()
    for name in cfg.cohort.native_volumes:
        k = cfg.cohort.conditions.index(name)
        raw[:, k] = raw[:, k] / determinants.to(raw)
    return raw


def volume_condition_mismatches(cfg: TrainConfig, raw: np.ndarray, volumes_ml: np.ndarray,
                                tolerance: float = 0.1) -> list[str]:
    """For each volume condition (``decoder.volume_labels``), a message when the manifest's values differ from the
    subjects' template-space volumes of its label (``volumes_ml`` (N, NUM_LABELS), as preprocessing records them)
    by more than ``tolerance`` in median ratio: a column of native volumes, most likely. The decoder meets a volume
    condition in template space, so such a model would read every request as a template-space volume."""
    messages = []
    for name, label in cfg.decoder.volume_labels.items():
        given = raw[:, cfg.cohort.conditions.index(name)]
        rows = np.isfinite(given) & (volumes_ml[:, label] > 0)
        if not rows.any():
            continue
        ratio = float(np.median(given[rows] / volumes_ml[rows, label]))
        if abs(ratio - 1) > tolerance:
            messages.append(
                f"the manifest's {name} is a median {abs(ratio - 1) * 100:.0f} % {'below' if ratio < 1 else 'above'} "
                f"the subjects' template-space volume of label {label} ({int(rows.sum())} subjects with both). DiffDef "
                f"meets {name} in template space, where the atlas lives: if the column holds native volumes, add "
                f"{name} to cohort.native_volumes (each is then divided by the subject's affine determinant), or give "
                "the subjects' volumes after their affine to the template (each cache entry's meta.json records "
                "them as info.label_volumes_ml); else the model reads every request as a template-space volume.")
    return messages


def condition_spec(cfg: TrainConfig, raw: np.ndarray) -> ConditionSpec:
    conds = []
    for k, name in enumerate(cfg.cohort.conditions):
        col = raw[:, k][np.isfinite(raw[:, k])]
        if len(col) < 2:
            raise ValueError(f"Condition {name!r} has fewer than two known values in the cohort.")
        conds.append(Condition(name, UNITS.get(name, ""), float(col.mean()), float(col.std() or 1.0),
                               float(col.min()), float(col.max())))
    return ConditionSpec(conds)


def prepared_cohort(cfg: TrainConfig, progress: bool = True) -> stages.CohortTensors:
    """The training cohort as the stages take it: conditions normalised by the cohort's own :class:`ConditionSpec`,
    which it keeps as ``spec`` (the decoder's volume terms read their condition's mean and sd from it). A cohort
    that the decoder cannot use (``decoder.log_conditions`` with a non-positive value, label terms without label
    maps) is refused here, before any stage runs."""
    cohort, raw = load_cohort(cfg, progress=progress)
    cohort.spec = condition_spec(cfg, raw)
    cohort.conditions = cohort.spec.normalise_tensor(cohort.conditions)
    stages.NeighbourhoodSpace(cohort.spec, cohort.conditions, cfg.decoder.log_conditions)
    stages.check_label_maps(cfg, cohort)
    return cohort


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip()
    except Exception:
        return "unknown"


def _save_state(path: Path, net: torch.nn.Module):
    from safetensors.torch import save_file

    with atomic_path(path, overwrite=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp))


def _load_state(path: Path, net: torch.nn.Module) -> torch.nn.Module:
    from safetensors.torch import load_file

    net.load_state_dict(load_file(str(path)))
    return net.eval()


def _checkpoint_seconds(stage_dir: Path) -> float:
    """Seconds of training held by the stage's checkpoint (``engine.train``'s count, across resumed runs); 0 without
    a checkpoint or for one written before the count existed."""
    latest = stage_dir / "checkpoints" / "latest.pt"
    if not latest.exists():
        return 0.0
    return float(torch.load(latest, map_location="cpu", weights_only=True).get("seconds", 0.0))


def _last_losses(stage_dir: Path) -> dict:
    log = stage_dir / "log.csv"
    if not log.exists():
        return {}
    import csv

    last = {}  # per column, the last finite value (a column can be NaN in a step, e.g. no volume was asked)
    for row in csv.DictReader(open(log)):
        values = {k: float(v) for k, v in row.items() if v not in (None, "")}
        last.update({k: v for k, v in values.items() if math.isfinite(v)})
    return last


def stages_needed(only) -> tuple:
    """The stages a run of ``only`` touches: those listed plus the ones their training reads, in order."""
    needed = set(only)
    for s in only:
        needed |= set(_REQUIRES[s])
    return tuple(s for s in STAGES if s in needed)


def check_inputs(cfg: TrainConfig) -> None:
    """Checks that need no training: a real cohort's manifest header and rows against ``cohort.conditions``
    (raises :class:`diffdef_training.cohort.ManifestError`, a ValueError, listing every problem)."""
    if cfg.cohort.source == "synthetic":
        unknown = [c for c in cfg.cohort.conditions if c not in SYNTHETIC_CONDITIONS]
        if unknown or not cfg.cohort.conditions:
            raise ValueError(f"cohort.conditions {cfg.cohort.conditions} do not fit the synthetic cohort, whose "
                             f"conditions are {list(SYNTHETIC_CONDITIONS)} (a non-empty subset of them).")
    else:
        from .cohort import read_manifest

        read_manifest(cfg.cohort.source, cfg.cohort.conditions)


def check_checkpoints(cfg: TrainConfig, out: Path, builders: dict, names, resume: bool) -> None:
    """Before any training, the checkpoints of the stages in ``names`` (raises
    :class:`diffdef_training.engine.CheckpointError`). With ``resume`` each must fit its network and settings.
    Without, a stage that never finished and whose checkpoint ``--resume`` would continue is refused, as step 0
    would overwrite its steps; a checkpoint of other settings, or of a stage that finished before its settings
    changed, is a retraining the user asked for and is replaced as documented."""
    for name in names:
        d = out / name
        latest = d / "checkpoints" / "latest.pt"
        if not latest.exists() or (not resume and (d / "done.json").exists()):
            continue
        try:
            with torch.random.fork_rng(devices=[]):  # building a network must not move the run's random stream
                state = check_checkpoint(latest, name, builders[name](), cfg.stage(name))
        except CheckpointError:
            if resume:
                raise
            continue
        if not resume:
            raise CheckpointError(f"{latest} holds {int(state['step'])} of {cfg.stage(name).steps} steps of this "
                                  f"{name} training, which a start from step 0 would overwrite. Add --resume to "
                                  f"continue it, or delete {d} to train the stage from the start.")


def stage_builders(cfg: TrainConfig) -> dict:
    """Per stage, a function that builds its untrained network from the config."""
    arch, k = cfg.architecture, len(cfg.cohort.conditions)
    return {"autoencoder": lambda: stages.build_autoencoder(arch["autoencoder"]),
            "diffusion": lambda: stages.ConditionalDiffusion(arch, k),
            "registration": lambda: stages.build_registration(cfg),
            "decoder": lambda: stages.build_decoder(cfg)}


def stage_hash(cfg: TrainConfig, name: str) -> str:
    """The hash of the config sections stage ``name``'s result depends on (recorded in its ``done.json``)."""
    return cfg.hash("architecture", *_DEPENDS[name])


def stage_current(cfg: TrainConfig, out: Path, name: str) -> bool:
    """Whether ``out/name`` holds the stage's weights and a ``done.json`` recording the config's hash for it."""
    marker, weights = out / name / "done.json", out / name / f"{name}.safetensors"
    return marker.exists() and json.loads(marker.read_text()).get("hash") == stage_hash(cfg, name) and weights.exists()


def _finish_stage(cfg: TrainConfig, d: Path, name: str, net: torch.nn.Module, record: dict) -> None:
    """Write a finished stage: its weights, then ``done.json`` (the config's hash for the stage + ``record``)."""
    d.mkdir(parents=True, exist_ok=True)
    _save_state(d / f"{name}.safetensors", net)
    with atomic_path(d / "done.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps({"hash": stage_hash(cfg, name), **record}))


# the stages a bundle holds: per stage, its network's state-dict prefix -> the bundle network under that prefix
BUNDLED_STAGES = {"autoencoder": {"": "image_decoder"},
                  "diffusion": {"unet.": "diffusion", "embedding.": "condition_embedding"},
                  "registration": {"": "registration"}}
UNPACKABLE = tuple(BUNDLED_STAGES)


def recorded_config(bundle, advice: str = "retrain it with diffdef-train pipeline") -> TrainConfig:
    """The training configuration bundle ``bundle`` records (``provenance.config``); :class:`BundleError` naming
    ``advice`` when it records none this version can read."""
    from diffdef.bundle import BundleError

    from .config import ConfigError, from_dict

    try:
        return from_dict(bundle.meta["provenance"]["config"])
    except (KeyError, TypeError, ConfigError) as exc:
        raise BundleError(f"{bundle.path}/model.json does not record a training configuration this version can "
                          f"read ({exc}); {advice}.") from exc


def unpack_bundle(bundle_path, cfg: TrainConfig, names=UNPACKABLE) -> list[Path]:
    """Write the stages ``names`` (of autoencoder, diffusion, registration) of an exported bundle into the run
    folder ``cfg.output`` as finished stages, so that ``--stages decoder`` trains a deformation decoder on a
    shipped model's networks without retraining them (``scripts/sweep.sh`` with a bundle as UPSTREAM).

    The bundle's recorded configuration must give the same hash as ``cfg`` for every section each stage depends
    on (the same cohort, seed, architecture and stage settings); stage folders that already exist are refused,
    and nothing is written unless every check passes. Each ``done.json`` keeps the bundle's recorded training
    time and machine, so a bundle exported from the run still reports how its stages were trained."""
    from diffdef.bundle import BundleError, load_bundle

    bad = [n for n in names if n not in UNPACKABLE]
    if bad or not names:
        raise ValueError(f"Cannot unpack stage {(bad or [names])[0]!r}: a bundle holds the stages "
                         f"{', '.join(UNPACKABLE)} (the decoder is what a run trains on them).")
    bundle = load_bundle(bundle_path, [part for n in names for part in BUNDLED_STAGES[n].values()])
    if "autoencoder" in names and "image_decoder" not in bundle.nets:
        raise BundleError(f"{bundle_path} has no autoencoder weights (image_decoder.safetensors): it cannot "
                          "give the autoencoder stage. Use a bundle exported by diffdef-train pipeline.")
    provenance = bundle.meta["provenance"]
    recorded = recorded_config(bundle, "retrain the upstream stages instead")
    differ = {n: [s for s in ("architecture", *_DEPENDS[n]) if recorded.hash(s) != cfg.hash(s)] for n in names}
    differ = {n: sections for n, sections in differ.items() if sections}
    if differ:
        raise ValueError("The bundle was trained with other settings than the config for stage(s) "
                         + "; ".join(f"{n} (section(s) {', '.join(s)})" for n, s in differ.items())
                         + ". Unpack only the stages that agree (--stages), or train the others.")
    out = Path(cfg.output)
    existing = [str(out / n) for n in names if (out / n).exists()]
    if existing:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); nothing was written. Choose a new run "
                              "folder or remove them.")
    builders = stage_builders(cfg)
    for n in names:
        net = builders[n]()  # the bundle's networks were checked against its architecture, the same as the config's
        net.load_state_dict({prefix + k: v for prefix, part in BUNDLED_STAGES[n].items()
                             for k, v in bundle.nets[part].state_dict().items()})
        _finish_stage(cfg, out / n, n, net, {
            "seconds": provenance.get("stage_seconds", {}).get(n),
            "machine": provenance.get("stage_machines", {}).get(n, "not recorded"),
            "losses": provenance.get("final_losses", {}).get(n, {}), "unpacked_from": str(bundle.path)})
    return [out / n for n in names]


def cpu_name() -> str:
    """The machine's architecture and, where the platform reports one, its processor name ("x86_64")."""
    return " ".join(part for part in (platform.machine(), platform.processor()) if part)


def _machine(ctx: RunContext) -> str:
    """Where this process trains: architecture, threads, GPU name or CPU, process count."""
    device = "GPU " + torch.cuda.get_device_name() if ctx.device.type == "cuda" else "CPU"
    return f"{cpu_name()} {torch.get_num_threads()} threads, {device}" + \
        (f", {ctx.world} processes" if ctx.world > 1 else "")


def run_pipeline(cfg: TrainConfig, resume: bool = False, progress: bool = True, only: tuple = STAGES,
                 ctx: RunContext | None = None) -> Path | None:
    """Train every stage in ``only`` (skipping current ones; the stages they read must be current or listed)
    and, when the decoder is among them, export ``<output>/bundle``. Returns the bundle path (rank 0 of a run
    that exports) or None (other ranks, or a run of a subset that stops after its last stage)."""
    bad = [s for s in only if s not in STAGES]
    if bad:
        raise ValueError(f"Unknown stage {bad[0]!r}; stages: {', '.join(STAGES)}.")
    needed = stages_needed(only)
    check_inputs(cfg)
    ctx = ctx or init_distributed(cfg.device)
    ctx.seed, ctx.amp = cfg.seed, cfg.amp
    for s in only:
        if cfg.stage(s).batch_size % ctx.world:
            raise ValueError(f"{s}.batch_size {cfg.stage(s).batch_size} is the global batch and must divide by the "
                             f"{ctx.world} processes.")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    arch = cfg.architecture
    timings = {}
    builders = stage_builders(cfg)

    def current(name):
        return stage_current(cfg, out, name)

    # everything that can be refused is refused here, before the cohort is loaded and any step is taken
    stale = [s for s in needed if s not in only and not current(s)]
    if stale:
        raise ValueError(f"Stage {stale[0]} is not current in {out}; run it first (or list it in --stages).")
    to_train = [s for s in only if not current(s)]
    check_checkpoints(cfg, out, builders, to_train, resume)
    cohort = prepared_cohort(cfg, progress=progress and ctx.is_main)

    def stage(name, train_fn):
        d = out / name
        if current(name):  # in the layout training gives it, so that a loaded stage computes as a trained one
            return channels_last_on_cpu(_load_state(d / f"{name}.safetensors", builders[name]()), ctx.device)
        # each stage starts from its own seed: its initial weights do not depend on which stages ran before
        torch.manual_seed(cfg.seed * 1009 + STAGES.index(name))
        # a resumed stage's time counts the seconds its checkpoint had already trained
        t = time.time() - (_checkpoint_seconds(d) if resume else 0.0)
        net = train_fn(d)
        timings[name] = time.time() - t
        if ctx.is_main:
            _finish_stage(cfg, d, name, net, {"seconds": timings[name], "machine": _machine(ctx),
                                              "losses": _last_losses(d)})
        return net

    def finished(name):  # a subset run ends after its last stage, without export
        if name == needed[-1] and name != "decoder":
            if ctx.world > 1:
                torch.distributed.barrier()
            return True
        return False

    ae = diffusion = registration = latents = None
    if "autoencoder" in needed:
        ae = stage("autoencoder", lambda d: stages.train_autoencoder(cfg, ctx, cohort, d, resume, progress=progress))
        if finished("autoencoder"):
            return None
    if "diffusion" in needed:
        latents = stages.encode_latents(ae, cohort.images, ctx.device)
        scale = float(1.0 / latents.std())
        diffusion = stage("diffusion", lambda d: stages.train_diffusion(cfg, ctx, cohort, d, latents * scale, resume,
                                                                        progress=progress))
        if finished("diffusion"):
            return None
    if "registration" in needed:
        registration = stage("registration",
                             lambda d: stages.train_registration(cfg, ctx, cohort, d, resume, progress=progress))
        if finished("registration"):
            return None

    def train_dec(d):
        bank = stages.latent_bank(cfg, cohort, diffusion, tuple(latents.shape[1:]), ctx.device, progress and ctx.is_main)
        return stages.train_decoder(cfg, ctx, cohort, d, ae, registration, bank, resume, progress=progress)

    decoder = stage("decoder", train_dec)
    if not ctx.is_main:
        return None
    template = load_template()
    working = template.working_grid(cfg.cohort.factor)
    done = {s: json.loads((out / s / "done.json").read_text()) for s in STAGES}
    meta = {
        "template": {},
        "working_grid": {**working.grid.to_dict(), **working.to_dict()},
        "conditions": cohort.spec.to_list(),
        "architecture": {**arch, "registration": stages.registration_architecture(cfg),
                         "decoder": stages.decoder_architecture(cfg)},
        "latent": {"shape": list(latents.shape[1:]), "scale_factor": scale},
        "sampling": {"steps": cfg.sampling.steps, "guidance": cfg.sampling.generation_guidance or cfg.sampling.guidance,
                     "integration_steps": cfg.sampling.integration_steps, "samples": cfg.sampling.samples,
                     "smoothing_mm": cfg.sampling.smoothing_mm},
        "provenance": {
            "cohort": cfg.cohort.source, "cohort_size": len(cohort), "cohort_seed": cfg.cohort.seed,
            "steps": {s: cfg.stage(s).steps for s in STAGES},
            # from each stage's done.json, which a stage unpacked from a bundle (no log.csv) carries over too
            "final_losses": {s: done[s].get("losses", {}) for s in STAGES},
            "stage_seconds": {s: done[s].get("seconds") for s in STAGES},
            "stage_machines": {s: done[s].get("machine", "not recorded") for s in STAGES},
            "morphology_preservation_loss": cfg.decoder.mp_loss,
            "neighbours": cfg.decoder.neighbours, "sigma": cfg.decoder.sigma,
            "config": cfg.to_dict(), "git_commit": _git_commit(), "processes": ctx.world,
            "machine": _machine(ctx),
            "torch": torch.__version__, "wall_seconds_this_run": time.time() - t_start,
        },
    }
    held = held_volumes.fit(cohort, cfg)
    if held is not None:
        meta["held_volumes"] = held
    image_decoder = ae  # the full autoencoder: its decoder is the "direct intensity generation" baseline
    return save_bundle(out / "bundle", meta, {"diffusion": diffusion.unet, "condition_embedding": diffusion.embedding,
                                             "decoder": decoder, "registration": registration,
                                             "image_decoder": image_decoder}, overwrite=True)
