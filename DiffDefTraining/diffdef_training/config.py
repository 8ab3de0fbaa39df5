"""Training configuration: one schema for every stage, read from YAML or JSON and validated before any work.

Unknown keys, wrong types and out-of-range values are refused with the key's dotted path.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from diffdef.networks import DEFAULT_ARCH
from diffdef.template import LABEL_NAMES


class ConfigError(ValueError):
    """A configuration problem, naming the key."""


#: Field metadata of an option added after models were trained, whose default keeps the earlier behaviour: at its
#: default it is left out of run hashes and checkpoint keys, so stages finished before it existed stay current.
ADDED = {"added": True}
#: Field metadata of an option read only when atlases are generated from the exported bundle: never part of a run
#: hash or checkpoint key, so changing it re-exports the bundle and retrains nothing.
GENERATION_ONLY = {"generation_only": True}


@dataclass
class CohortConfig:
    source: str = "synthetic"  # "synthetic" or a manifest CSV path (real cohort, preprocessed on first use)
    conditions: list = field(default_factory=lambda: ["age", "ventricle_volume"])  # condition names (manifest columns; synthetic: a subset of age, ventricle_volume)
    size: int = 400  # synthetic: training subjects
    held_out: int = 60  # synthetic: held-out subjects (indices after the training ones)
    seed: int = 0  # synthetic: cohort seed
    factor: int = 4  # working grid = 1 mm crop downsampled by this factor
    cache: str = ""  # real cohort: preprocessing cache folder (default <output>/cohort_cache)
    native_volumes: list = field(default_factory=list, metadata=ADDED)  # real cohort: conditions whose manifest values are volumes (ml) measured in each subject's own space (e.g. FreeSurfer's aseg stats); each is divided by the subject's affine determinant (template -> subject) when loaded, so the model is trained, and asked, in template space, where the atlas lives


@dataclass
class StageConfig:
    steps: int = 100  # optimizer steps
    batch_size: int = 4  # global batch (split across ranks)
    lr: float = 1e-3  # peak learning rate (AdamW; linear warm-up, then cosine down to 0.1 x)
    warmup: int = 20  # warm-up steps
    accumulate: int = 1  # gradient accumulation (micro-batches per step)
    ema: float = 0.0  # EMA decay of the weights (0: off)
    checkpoint_every: int = 50  # steps between checkpoints (checkpoints/latest.pt)
    log_every: int = 10  # steps between rows of log.csv / TensorBoard points


@dataclass
class AutoencoderConfig(StageConfig):
    kl_weight: float = 1e-6  # weight of the KL term (L1 + kl_weight * KL)


@dataclass
class DiffusionConfig(StageConfig):
    condition_dropout: float = 0.15  # per condition
    unconditional: float = 0.1  # all conditions missing (classifier-free guidance)


@dataclass
class RegistrationConfig(StageConfig):
    lncc_kernel: int = 5  # local NCC window (voxels)
    smooth_weight: float = 1.0  # diffusion regulariser weight on the velocity
    dice_weight: float = 0.5  # Dice term weight (when labels exist)
    template_moving: float = 0.5  # probability that the moving image is the template
    template_fixed: float = field(default=0.0, metadata=ADDED)  # probability that the fixed image is the template (a subject moving): the direction the symmetric centrality also runs, atlas <- subject; the rest of the pairs are subject -> subject
    warp_pairs: float = field(default=0.0, metadata=ADDED)  # probability that a pair's fixed image is its moving image warped by a random smooth field (known-warp self-supervision, usable on any cohort); the network's displacement is then also pulled to that field
    warp_weight: float = field(default=1.0, metadata=ADDED)  # weight of the known-warp term, per mm^2 of mean squared displacement error
    warp_sigma_mm: float = field(default=12.0, metadata=ADDED)  # Gaussian smoothing (mm) of the random velocity's white noise
    warp_rms_mm: float = field(default=2.0, metadata=ADDED)  # RMS (mm) of the random velocity's norm over the grid
    antisymmetric: bool = field(default=False, metadata=ADDED)  # velocity (f(m, x) - f(x, m)) / 2: an image registered to itself gives 0, no pair-independent field for the MP loss to cancel (twice the compute); recorded in the bundle's architecture


def identity_fields(section) -> list:
    """The fields of a config section that identify a run: all but :data:`ADDED` options at their default and
    :data:`GENERATION_ONLY` options."""
    return [f for f in dataclasses.fields(section) if not f.metadata.get("generation_only")
            and not (f.metadata.get("added") and getattr(section, f.name) == _default(f))]


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def settings_key(section) -> str:
    """The settings a checkpoint records and a resume compares: the section's repr without :data:`ADDED`
    options at their default (equal to the repr written before those options existed)."""
    return f"{type(section).__name__}(" + ", ".join(f"{f.name}={getattr(section, f.name)!r}"
                                                    for f in identity_fields(section)) + ")"


@dataclass
class DecoderConfig(StageConfig):
    neighbours: int = 10  # N: neighbourhood size
    sigma: float = 0.3  # Gaussian width on the normalised condition distance
    mp_loss: bool = True  # morphology-preservation (centrality) term; False = ablation
    mp_weight: float = 1.0  # weight of the centrality term
    symmetric_centrality: bool = field(default=False, metadata=ADDED)  # centrality from both registration directions, (u(atlas->n) - u(n->atlas)) / 2: cancels the network's direction-independent bias (a forward pass more per neighbour)
    local_linear: bool = field(default=False, metadata=ADDED)  # weight the neighbours in the centrality by local-linear regression's kernel, so their weighted mean condition is the asked one also at the cohort's edges (Gaussian weights alone pull it inwards)
    velocity_smoothing_mm: float = field(default=0.0, metadata=ADDED)  # sigma (mm) of a fixed Gaussian filter on the decoder's velocity output, part of the network (recorded in the bundle's architecture); 0 = none
    log_conditions: list = field(default_factory=list, metadata=ADDED)  # conditions whose distance in the Gaussian neighbourhood is measured on the log scale (standardised over the cohort), e.g. [ventricle_volume]: a volume varies by a factor, and on the linear scale the neighbourhood of a small volume is skewed towards larger ones
    sim_weight: float = 1.0  # weight of the LNCC similarity to the neighbours
    smooth_weight: float = 0.5  # diffusion regulariser weight on the generated velocity
    bank_size: int = 256  # (condition, latent) pairs sampled once from the diffusion model
    condition_dropout: float = 0.15  # per condition, for the latent bank
    bank_mixing: float = 0.0  # fraction of the bank whose conditions are drawn independently of each other (covers combinations the cohort lacks)
    bank_uniform: float = field(default=0.0, metadata=ADDED)  # fraction of the bank (after the bank_mixing one) drawn uniformly between the cohort's extremes of each condition (log-uniform for log_conditions), so the cohort's sparse edges are trained as often as its middle
    bank_volume_margin: float = field(default=0.0, metadata=ADDED)  # the bank_uniform draw of each volume_labels condition extends past the cohort's extremes by this fraction of its range on each side on the log scale (each such condition must be in log_conditions, so the range stays positive): a requested volume is its own target, so the volume term supervises the decoder beyond the cohort, where the command line extrapolates (0.1 with the synthetic cohort's 6.7-83.6 ml: 5.2-108 ml)
    volume_labels: dict = field(default_factory=dict)  # condition that is the volume (ml) of a template label -> that label's value, e.g. {ventricle_volume: 4}
    neighbourhood_volume_labels: list = field(default_factory=list)  # template labels, or lists of labels counted together, whose atlas volume keeps the neighbourhood's weighted mean (needs cohort label maps), e.g. [2, 3] or [[2, 3]] (brain tissue, GM + WM: the majority-vote GM/WM miscount cancels); majority-vote labels on a coarse grid bias thin structures (GM), so the shipped model counts GM and WM together ([[2, 3]])
    volume_on_template_grid: bool = field(default=False, metadata=ADDED)  # measure volume_labels on the 1 mm template grid (a box around each label) instead of the working grid's block-averaged fractions, which read large changes short (60 ml asked: 61.8 ml at 4 mm, 67.2 ml at 1 mm)
    volume_weight: float = 1.0  # weight of the requested-volume term (squared log ratio of atlas to requested volume, volume_labels)
    neighbourhood_volume_weight: float = field(default=1.0, metadata=ADDED)  # weight of the neighbourhood-volume term (squared log ratio of atlas to neighbourhood volume, neighbourhood_volume_labels)
    neighbourhood_volume_local_linear: bool = field(default=False, metadata=ADDED)  # the neighbourhood-volume target is local-linear regression's estimate at the condition (the Gaussian weights times local_linear_factors) instead of the Gaussian mean, which the cohort's edges pull inwards (brain tissue B(a) at 80 y, sigma 0.45: +0.51 %)
    neighbourhood_volume_sigma: float = field(default=0.0, metadata=ADDED)  # Gaussian width of the neighbourhood-volume target's weights, 0 = decoder.sigma: a scalar mean needs fewer neighbours than the centrality's field mean, so it can keep a narrower kernel when the neighbour draws widen (with sigma 0.45 a target at 0.3 moved the brain tissue's by under 0.4 points and did not keep it within 2 %: docs/decoder-sweep.md, ninth round)
    neighbourhood_shape_labels: list = field(default_factory=list, metadata=ADDED)  # template labels whose fraction map in the atlas is pulled towards the Gaussian-weighted mean of the cohort's label maps (needs cohort label maps): a centrality measured on the labels themselves, without the registration network; suits large structures such as the ventricles ([4]), not thin ones (cortex), whose mean the subjects' own variation blurs below one half
    neighbourhood_shape_weight: float = field(default=1.0, metadata=ADDED)  # weight of the neighbourhood-shape term (squared difference of the atlas's and the neighbourhood's label fractions, summed over the grid and divided by the template label's volume, neighbourhood_shape_labels)


@dataclass
class SamplingConfig:
    steps: int = 20  # DDIM steps
    guidance: float = 1.5  # classifier-free guidance weight of the latent bank the decoder trains on, and of generation unless generation_guidance is set
    generation_guidance: float = field(default=0.0, metadata=GENERATION_ONLY)  # guidance weight recorded in the bundle as the generation default, 0 = guidance; 1 runs the diffusion U-Net on half the batch (no unconditional pass): a decoder that receives the condition itself gave the same atlases with 1 as with the bank's 1.5 (docs/decoder-sweep.md, twenty-first round)
    integration_steps: int = 7  # scaling-and-squaring steps
    samples: int = field(default=8, metadata=GENERATION_ONLY)  # diffusion draws whose decoded velocities are averaged into one atlas (their log-Euclidean mean, an estimate of the condition's expected atlas rather than one draw of it); recorded in the bundle as the generation default, not used in training (docs/decoder-sweep.md, tenth round)
    smoothing_mm: float = field(default=0.0, metadata=GENERATION_ONLY)  # sigma (mm) of a Gaussian on the averaged velocity at generation, before the volume calibration; recorded in the bundle as the generation default, not used in training; 0 = none (docs/decoder-sweep.md, twenty-fifth round)


@dataclass
class TrainConfig:
    output: str = "runs/default"  # run folder (stage folders, checkpoints, logs, bundle/)
    seed: int = 0  # run seed (weights init, data order, per-sample draws)
    device: str = "auto"  # auto (GPU when available), cpu or cuda
    amp: bool = True  # mixed precision (bf16) on GPU; ignored on CPU
    threads: int = 0  # torch CPU threads (0: torch's default)
    cohort: CohortConfig = field(default_factory=CohortConfig)
    autoencoder: AutoencoderConfig = field(default_factory=lambda: AutoencoderConfig(steps=600, lr=2e-3))
    diffusion: DiffusionConfig = field(default_factory=lambda: DiffusionConfig(steps=2000, batch_size=16, lr=1e-3, ema=0.999))
    registration: RegistrationConfig = field(default_factory=lambda: RegistrationConfig(steps=800, lr=1e-3))
    decoder: DecoderConfig = field(default_factory=lambda: DecoderConfig(steps=600, batch_size=2, lr=2e-4))
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    architecture: dict = field(default_factory=lambda: copy.deepcopy(DEFAULT_ARCH))

    def stage(self, name: str) -> StageConfig:
        return getattr(self, name)

    def hash(self, *sections: str) -> str:
        """Hash of the named sections (all without names), :data:`ADDED` options at their default left out."""
        d = dataclasses.asdict(self)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                kept = {g.name for g in identity_fields(value)}
                d[f.name] = {k: v for k, v in d[f.name].items() if k in kept}
        d = {k: d[k] for k in sections} if sections else d
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def schema_table() -> str:
    """The config schema as a Markdown table (key, type, default, meaning from the fields' comments)."""
    import inspect
    import re

    def note(cls, name):
        for c in cls.__mro__:
            if dataclasses.is_dataclass(c):
                m = re.search(rf"^    {name}: [^\n]*?#\s*(.*)$", inspect.getsource(c), re.M)
                if m:
                    return m.group(1).strip()
        return ""

    def row(key, cls, f, value):
        typ = typing.get_type_hints(cls)[f.name]
        return f"| `{key}` | {getattr(typ, '__name__', typ)} | `{json.dumps(value)}` | {note(cls, f.name)} |"

    cfg, lines = TrainConfig(), ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            lines += [row(f"{f.name}.{g.name}", type(value), g, getattr(value, g.name)) for g in dataclasses.fields(value)]
        elif f.name == "architecture":
            lines.append(f"| `architecture.<part>.<arg>` | mapping | `diffdef.networks.DEFAULT_ARCH` | network arguments "
                         f"merged onto the defaults; parts: {', '.join(f'`{k}`' for k in value)} |")
        else:
            lines.append(row(f.name, TrainConfig, f, value))
    return "\n".join(lines)


def _check(value, typ, path: str):
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {type(value).__name__}.")
        return _build(typ, value, path)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    expected = origin or typ
    if typ is bool and not isinstance(value, bool) or typ is not bool and isinstance(value, bool) \
            or not isinstance(value, expected):
        raise ConfigError(f"{path} must be {getattr(expected, '__name__', expected)}, got {value!r}.")
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"Unknown key {prefix}{unknown[0]}; valid keys{' of ' + prefix[:-1] if prefix else ''}: "
                          f"{', '.join(names)}.")
    obj = cls()
    for k, v in data.items():
        if k == "architecture":
            merged = copy.deepcopy(DEFAULT_ARCH)
            for part, args in _check(v, dict, prefix + k).items():
                if part not in merged:
                    raise ConfigError(f"Unknown key {prefix}architecture.{part}; valid: {', '.join(merged)}.")
                merged[part].update(_check(args, dict, f"{prefix}architecture.{part}"))
            v = merged
        else:
            default = getattr(obj, k)
            if dataclasses.is_dataclass(default):  # merge onto the field's own defaults
                v = _build_onto(default, _check(v, dict, prefix + k), prefix + k + ".")
            else:
                v = _check(v, hints[k], prefix + k)
        setattr(obj, k, v)
    return obj


def _build_onto(default, data: dict, prefix: str):
    base = dataclasses.asdict(default)
    unknown = [k for k in data if k not in base]
    if unknown:
        raise ConfigError(f"Unknown key {prefix}{unknown[0]}; valid keys of {prefix[:-1]}: {', '.join(base)}.")
    hints = typing.get_type_hints(type(default))
    for k, v in data.items():
        base[k] = _check(v, hints[k], prefix + k)
    return type(default)(**base)


def neighbourhood_volume_groups(decoder: DecoderConfig) -> list[list]:
    """``decoder.neighbourhood_volume_labels`` as groups of label values whose volumes count together: a label
    alone is a group of one."""
    return [list(e) if isinstance(e, list) else [e] for e in decoder.neighbourhood_volume_labels]


def _check_label(label, what: str) -> None:
    """Refuse anything but the value of a template label other than background."""
    if isinstance(label, bool) or not isinstance(label, int) or label not in LABEL_NAMES or label == 0:
        raise ConfigError(f"{what}, one of " + ", ".join(f"{v} ({n})" for v, n in LABEL_NAMES.items() if v)
                          + f"; got {label!r}.")


def _validate(cfg: TrainConfig) -> TrainConfig:
    for name in ("autoencoder", "diffusion", "registration", "decoder"):
        s = cfg.stage(name)
        for key in ("steps", "batch_size", "accumulate", "checkpoint_every", "log_every"):
            if getattr(s, key) < 1:
                raise ConfigError(f"{name}.{key} must be >= 1, got {getattr(s, key)}.")
        if s.lr <= 0 or not 0 <= s.ema < 1:
            raise ConfigError(f"{name}.lr must be > 0 and {name}.ema in [0, 1).")
    for key in ("steps", "samples"):
        if getattr(cfg.sampling, key) < 1:
            raise ConfigError(f"sampling.{key} must be >= 1, got {getattr(cfg.sampling, key)}.")
    if not 0 <= cfg.sampling.smoothing_mm < math.inf:
        raise ConfigError(f"sampling.smoothing_mm must be a finite number >= 0 (0 = none), got {cfg.sampling.smoothing_mm}.")
    if cfg.sampling.guidance < 0 or cfg.sampling.generation_guidance < 0:
        raise ConfigError(f"sampling.guidance and sampling.generation_guidance must be >= 0 (1: no guidance; "
                          f"generation_guidance 0: the same as guidance), got {cfg.sampling.guidance} and "
                          f"{cfg.sampling.generation_guidance}.")
    if cfg.decoder.neighbours < 1 or cfg.decoder.sigma <= 0:
        raise ConfigError("decoder.neighbours must be >= 1 and decoder.sigma > 0.")
    for name, label in cfg.decoder.volume_labels.items():
        if name not in cfg.cohort.conditions:
            raise ConfigError(f"decoder.volume_labels names {name!r}, which is not in cohort.conditions {cfg.cohort.conditions}.")
        _check_label(label, f"decoder.volume_labels.{name} must be a template label value")
    for name in cfg.decoder.log_conditions:
        if name not in cfg.cohort.conditions:
            raise ConfigError(f"decoder.log_conditions names {name!r}, which is not in cohort.conditions {cfg.cohort.conditions}.")
    groups = neighbourhood_volume_groups(cfg.decoder)
    for group in groups:
        if not group:
            raise ConfigError("decoder.neighbourhood_volume_labels has an empty group; list its labels, e.g. [[2, 3]].")
        for label in group:
            _check_label(label, "decoder.neighbourhood_volume_labels must list template label values (or lists of them)")
    for label in cfg.decoder.neighbourhood_shape_labels:
        _check_label(label, "decoder.neighbourhood_shape_labels must list template label values")
    clash = {label for group in groups for label in group} & set(cfg.decoder.volume_labels.values())
    if clash:
        raise ConfigError(f"Label {sorted(clash)[0]} is in both decoder.volume_labels (its volume is a condition) "
                          "and decoder.neighbourhood_volume_labels; keep it in one.")
    d = cfg.decoder
    if not (0 <= d.bank_mixing <= 1 and 0 <= d.bank_uniform <= 1 and d.bank_mixing + d.bank_uniform <= 1):
        raise ConfigError(f"decoder.bank_mixing and decoder.bank_uniform must each be in [0, 1] and add up to at most 1, "
                          f"got {d.bank_mixing} and {d.bank_uniform}.")
    if not d.bank_volume_margin >= 0:
        raise ConfigError(f"decoder.bank_volume_margin must be 0 or more (a fraction of each volume condition's cohort "
                          f"range), got {d.bank_volume_margin}.")
    linear = [name for name in d.volume_labels if name not in d.log_conditions]
    if d.bank_volume_margin and (not d.bank_uniform or linear):
        # on the linear scale a widened range can reach a negative volume, whose log ratio is undefined
        raise ConfigError(f"decoder.bank_volume_margin widens the uniform draw (decoder.bank_uniform, now "
                          f"{d.bank_uniform}) of volume conditions on the log scale; set decoder.bank_uniform above 0 "
                          f"and add {linear or list(d.volume_labels)} to decoder.log_conditions, or set the margin to 0.")
    r = cfg.registration
    if not (0 <= r.template_moving <= 1 and 0 <= r.template_fixed <= 1 and r.template_moving + r.template_fixed <= 1):
        raise ConfigError(f"registration.template_moving and registration.template_fixed must each be in [0, 1] and add "
                          f"up to at most 1, got {r.template_moving} and {r.template_fixed}.")
    if not (0 <= r.warp_pairs <= 1 and r.warp_weight >= 0 and r.warp_sigma_mm > 0 and r.warp_rms_mm >= 0):
        raise ConfigError(f"registration.warp_pairs must be in [0, 1], registration.warp_weight and warp_rms_mm >= 0 and "
                          f"registration.warp_sigma_mm > 0, got {r.warp_pairs}, {r.warp_weight}, {r.warp_rms_mm} and "
                          f"{r.warp_sigma_mm}.")
    for key in ("volume_weight", "neighbourhood_volume_weight", "neighbourhood_volume_sigma", "neighbourhood_shape_weight"):
        if not getattr(cfg.decoder, key) >= 0:  # also refuses NaN
            raise ConfigError(f"decoder.{key} must be >= 0, got {getattr(cfg.decoder, key)}.")
    if cfg.cohort.factor not in (2, 4, 8):
        raise ConfigError(f"cohort.factor must be 2, 4 or 8 (the 1 mm crop 160x192x160 divides), got {cfg.cohort.factor}.")
    conds = cfg.cohort.conditions
    if not conds or not all(isinstance(c, str) and c for c in conds) or len(set(conds)) != len(conds):
        raise ConfigError(f"cohort.conditions must be a non-empty list of distinct names, got {conds!r}.")
    for name in cfg.cohort.native_volumes:
        if name not in conds:
            raise ConfigError(f"cohort.native_volumes names {name!r}, which is not in cohort.conditions {conds}.")
    if cfg.cohort.native_volumes and cfg.cohort.source == "synthetic":
        raise ConfigError("cohort.native_volumes converts a manifest's volumes to template space with each subject's "
                          "affine; the synthetic cohort's are already there: leave it empty, or set cohort.source "
                          "to a manifest CSV.")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {cfg.device!r}.")
    return cfg


def from_dict(data: dict) -> TrainConfig:
    return _validate(_build(TrainConfig, data or {}))


def load_config(path: str | Path | None, overrides: dict | None = None, settings: list | None = None) -> TrainConfig:
    """Read a YAML/JSON config (None: defaults), apply ``overrides`` (same nesting; a section given replaces the
    file's keys it names) and then ``settings``, (dotted key, value) pairs from :func:`parse_setting`."""
    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file not found: {path}")
        text = path.read_text()
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text) or {}
        except Exception as exc:
            raise ConfigError(f"Cannot parse {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping at the top level.")
    for k, v in (overrides or {}).items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k] = {**data[k], **v}
        else:
            data[k] = v
    for key, value in settings or []:
        *parents, last = key.split(".")
        node = data
        for p in parents:  # copy each level on the way down: the value replaces one key, its siblings stay
            node[p] = dict(node[p]) if isinstance(node.get(p), dict) else {}
            node = node[p]
        node[last] = value
    return from_dict(data)


def parse_setting(item: str) -> tuple[str, object]:
    """``"decoder.mp_weight=3"`` -> ``("decoder.mp_weight", 3)``: a dotted key and its value read as YAML (numbers,
    booleans, lists, mappings; a mapping replaces the key's whole value). Keys are checked when the config is built."""
    import yaml

    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise ConfigError(f"Cannot read setting {item!r}: give KEY=VALUE with a dotted key, e.g. decoder.mp_weight=3")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"Cannot read the value of setting {item!r}: {exc}") from exc
