"""Model bundles: a folder with ``model.json`` and one ``.safetensors`` file per network.

``model.json`` records the format version, the architectures and their arguments, the condition spec, the
working-grid geometry, the template id and checksums, the latent shape and scale, sampling defaults, the
weight files with their SHA-256, and training provenance. Loading validates all of it and never unpickles.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import networks
from .conditions import ConditionSpec
from .geometry import Grid
from .template import TEMPLATE_DIR, TEMPLATE_FILES, TEMPLATE_ID

FORMAT = "diffdef-bundle"
FORMAT_VERSION = 1
NETWORKS = ("diffusion", "condition_embedding", "decoder", "registration")
OPTIONAL_NETWORKS = ("image_decoder",)
DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent / "Resources" / "Models" / "default"
REQUIRED_KEYS = ("format", "format_version", "template", "working_grid", "conditions", "architecture", "latent",
                 "sampling", "weights", "provenance")


class BundleError(ValueError):
    """The folder is not a valid DiffDef model bundle; the message says what is wrong and what to do."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def template_checksums() -> dict:
    return {kind: sha256(TEMPLATE_DIR / name) for kind, name in TEMPLATE_FILES.items()}


def build_network(name: str, arch: dict, num_conditions: int) -> torch.nn.Module:
    """Instantiate network ``name`` from the bundle's architecture section."""
    if name == "diffusion":
        return networks.build_diffusion(arch["diffusion"])
    if name == "condition_embedding":
        return networks.ConditionEmbedding(num_conditions, **arch["condition_embedding"])
    if name == "decoder":
        return networks.DeformationDecoder(arch["autoencoder"], num_conditions,
                                           float(arch.get("decoder", {}).get("velocity_smoothing", 0.0)))
    if name == "registration":
        return networks.RegistrationNet(**arch["registration"])
    if name == "image_decoder":
        return networks.build_autoencoder(arch["autoencoder"])
    raise BundleError(f"Unknown network {name!r} in bundle.")


@dataclass
class Bundle:
    path: Path
    meta: dict
    spec: ConditionSpec
    working_grid: Grid
    nets: dict

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["latent"]["shape"])

    @property
    def uses_latents(self) -> bool:
        """Whether the decoder decodes a diffusion latent; False for a conditional template network, whose
        conditions are all it sees (``architecture.decoder.latent_input``, written by diffdef-train
        conditional-template): it is given a zero latent and makes one deterministic atlas per condition."""
        return bool(self.meta["architecture"].get("decoder", {}).get("latent_input", True))

    @property
    def scale_factor(self) -> float:
        return float(self.meta["latent"]["scale_factor"])

    def to(self, device) -> "Bundle":
        """Move every network to ``device`` (channels-last on a CPU, :func:`~diffdef.networks.channels_last_on_cpu`)."""
        for net in self.nets.values():
            networks.channels_last_on_cpu(net.to(device), device)
        return self


def load_weights(net: torch.nn.Module, file: Path, name: str, expected_sha: str | None = None) -> None:
    """Load safetensors weights into ``net`` (no pickle), checking the checksum when one is given and that every
    tensor matches the architecture. Raises :class:`BundleError`."""
    from safetensors.torch import load_file

    file = Path(file)
    if not file.is_file():
        raise BundleError(f"Weight file {file.name} for {name!r} is missing from {file.parent}.")
    if expected_sha is not None and sha256(file) != expected_sha:
        raise BundleError(f"Checksum mismatch for {file.name}: the file is corrupt or was replaced. "
                          "Re-copy the bundle or re-export it from training.")
    try:
        state = load_file(str(file))
    except Exception as exc:
        raise BundleError(f"Cannot read {file.name} as safetensors ({exc}).") from exc
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or extra or wrong:
        detail = "; ".join(filter(None, [
            f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else "",
            f"wrong shape {wrong[0]}: {tuple(state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)}" if wrong else ""]))
        raise BundleError(f"Weights in {file} do not match the architecture in model.json ({detail}).")
    net.load_state_dict(state)
    net.eval()


def _read_from_elsewhere(entry: dict) -> bool:
    """Whether a model.json weights entry names a file outside its bundle's folder (see :func:`share_weights`)."""
    return Path(entry["file"]).parent != Path(".")


def read_meta(path) -> dict:
    """The model.json of bundle folder ``path``, as read (not validated beyond being a JSON object)."""
    meta_file = Path(path) / "model.json"
    if not meta_file.is_file():
        raise BundleError(f"{path} is not a DiffDef model bundle: it has no model.json. Choose the folder that "
                          "holds model.json and the .safetensors files (made by diffdef-train export).")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{meta_file} is not valid JSON ({exc}).") from exc
    if not isinstance(meta, dict):
        raise BundleError(f"{meta_file} must hold a JSON object.")
    return meta


def write_meta(path, meta: dict) -> None:
    """Write ``meta`` as bundle folder ``path``'s model.json, atomically, as strict JSON (NaN is not JSON)."""
    from .io import atomic_path

    with atomic_path(Path(path) / "model.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(meta, indent=1, allow_nan=False))


def load_bundle(path=None, networks_wanted=NETWORKS + OPTIONAL_NETWORKS, check_template: bool = True) -> Bundle:
    """Load and validate a bundle folder (default: the shipped model). Raises :class:`BundleError`."""
    path = Path(path) if path is not None else DEFAULT_BUNDLE
    meta_file = path / "model.json"
    meta = read_meta(path)
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise BundleError(f"{meta_file} lacks required key(s) {', '.join(missing)}.")
    if meta["format"] != FORMAT:
        raise BundleError(f"{meta_file} is not a DiffDef bundle (format {meta['format']!r}).")
    if meta["format_version"] != FORMAT_VERSION:
        raise BundleError(f"Bundle format version {meta['format_version']} is not supported by this DiffDef "
                          f"(supports {FORMAT_VERSION}); update DiffDef or re-export the bundle.")
    if meta["template"].get("id") != TEMPLATE_ID:
        raise BundleError(f"The bundle was trained on template {meta['template'].get('id')!r}, not {TEMPLATE_ID}.")
    if check_template and meta["template"].get("sha256") != template_checksums():
        raise BundleError("The bundle's template checksum does not match this installation's template files.")
    try:
        spec = ConditionSpec.from_list(meta["conditions"])
        grid = Grid.from_dict(meta["working_grid"])
    except (TypeError, KeyError, ValueError) as exc:
        raise BundleError(f"Invalid conditions or working_grid in {meta_file} ({exc}).") from exc
    nets = {}
    for name in networks_wanted:
        if name not in meta["weights"]:
            if name in OPTIONAL_NETWORKS:
                continue
            raise BundleError(f"The bundle has no weights for {name!r}.")
        net = build_network(name, meta["architecture"], len(spec))
        entry = meta["weights"][name]
        file = path / entry["file"]
        if _read_from_elsewhere(entry) and not file.is_file():
            raise BundleError(f"The bundle reads {name!r} from another bundle ({entry['file']}, see share_weights), "
                              f"which is not at {file.parent}: keep the two bundles where they were, or copy the "
                              f"file into {path} and give its name in model.json.")
        load_weights(net, file, name, entry["sha256"])
        nets[name] = net
    return Bundle(path, meta, spec, grid, nets)


def save_bundle(path, meta: dict, nets: dict, overwrite: bool = False) -> Path:
    """Write ``nets`` as safetensors and ``meta`` (weights section filled in) as model.json, atomically per file."""
    from safetensors.torch import save_file

    from .io import atomic_path

    path = Path(path)
    if (path / "model.json").exists() and not overwrite:
        raise FileExistsError(f"{path} already holds a bundle; pass overwrite to replace it.")
    path.mkdir(parents=True, exist_ok=True)
    meta = dict(meta, format=FORMAT, format_version=FORMAT_VERSION, weights={})
    meta.setdefault("template", {}).update(id=TEMPLATE_ID, sha256=template_checksums())
    for name, net in nets.items():
        file = path / f"{name}.safetensors"
        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        with atomic_path(file, overwrite=True) as tmp:
            save_file(state, str(tmp))
        meta["weights"][name] = {"file": file.name, "sha256": sha256(file)}
    write_meta(path, meta)
    return path


def share_weights(path, base) -> list[str]:
    """Make the bundle at ``path`` read each weight file that is byte-identical to one of bundle ``base``'s from
    ``base``: its model.json ``file`` becomes a path relative to ``path`` (e.g. ``../default/diffusion.safetensors``,
    checked by SHA-256 at every load like any weight file) and its own copy is deleted. For a bundle that shares
    networks with another, e.g. a decoder retrained on another bundle's upstream stages. model.json is rewritten
    (atomically) before any copy is deleted. Returns the names of the networks now shared."""
    path, base = Path(path), Path(base)
    meta, theirs = read_meta(path), read_meta(base)
    shared = {}
    for name, entry in meta["weights"].items():
        other = theirs["weights"].get(name)
        if other is None or other["sha256"] != entry["sha256"] or _read_from_elsewhere(entry):
            continue  # a different network, or one this bundle already reads from elsewhere
        target = base / other["file"]
        if sha256(target) != other["sha256"]:
            raise BundleError(f"{target} does not match {base}/model.json's checksum: the base bundle is damaged.")
        shared[name] = os.path.relpath(target.resolve(), path.resolve())
    if shared:
        own = {name: path / meta["weights"][name]["file"] for name in shared}
        meta["weights"] = {n: dict(e, file=shared.get(n, e["file"])) for n, e in meta["weights"].items()}
        write_meta(path, meta)
        for file in own.values():
            file.unlink()
    return sorted(shared)
