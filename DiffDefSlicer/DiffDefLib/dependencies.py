"""Python packages the core needs inside Slicer, installed on first use with the user's consent.

Nothing here runs at import time. :func:`missing` reads installed versions from package metadata (no import of
torch); :func:`install` installs torch first -- through the PyTorch extension's helper (``PyTorchUtils``) when that
extension is installed, since it picks the CUDA build that matches the driver -- with an explicit minimum version
(an old torch breaks the MONAI install), then the pinned rest with ``slicer.util.pip_install``. SimpleITK and
numpy ship with Slicer and are never reinstalled.
"""
from __future__ import annotations

import re
from importlib import metadata

#: torch is the one range: the PyTorch helper chooses the build (CPU / CUDA) that fits the machine.
TORCH_MINIMUM = "2.2"
#: (distribution, import name, pinned requirement): the versions the tests run with.
PINNED = (
    ("monai", "monai", "monai==1.6.1"),
    ("einops", "einops", "einops==0.8.2"),
    ("nibabel", "nibabel", "nibabel==5.4.2"),
    ("safetensors", "safetensors", "safetensors==0.8.0"),
)
#: Minimum versions accepted when a package is already there (the pins are only what gets installed).
MINIMUM = {"monai": "1.4", "einops": "0.7", "nibabel": "5.0", "safetensors": "0.4"}


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])


def installed_version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def missing() -> list[str]:
    """Requirements to install (torch first), empty when everything is present and recent enough."""
    out = []
    torch_version = installed_version("torch")
    if torch_version is None or _version_tuple(torch_version) < _version_tuple(TORCH_MINIMUM):
        out.append(f"torch>={TORCH_MINIMUM}")
    for dist, _, pin in PINNED:
        v = installed_version(dist)
        if v is None or _version_tuple(v) < _version_tuple(MINIMUM[dist]):
            out.append(pin)
    return out


def describe(requirements: list[str]) -> str:
    return ("DiffDef needs these Python packages, which are not installed yet (or too old):\n\n  "
            + "\n  ".join(requirements)
            + "\n\nInstall them now? This downloads about 1-3 GB (PyTorch) and can take several minutes; "
              "Slicer may look busy meanwhile.")


def install(requirements: list[str] | None = None, confirm=None, log=print) -> bool:
    """Install ``requirements`` (default: :func:`missing`) inside Slicer after ``confirm(text) -> bool`` says yes.
    Returns True when everything is installed, False when the user declined."""
    import slicer

    requirements = missing() if requirements is None else requirements
    if not requirements:
        return True
    if confirm is not None and not confirm(describe(requirements)):
        return False
    torch_req = [r for r in requirements if r.startswith("torch")]
    if torch_req:
        log(f"Installing PyTorch ({torch_req[0]})")
        try:
            import PyTorchUtils  # the PyTorch extension

            torch_logic = PyTorchUtils.PyTorchUtilsLogic()
            if not torch_logic.torchInstalled() or installed_version("torch") is None or \
                    _version_tuple(installed_version("torch")) < _version_tuple(TORCH_MINIMUM):
                torch = torch_logic.installTorch(askConfirmation=False, torchVersionRequirement=f">={TORCH_MINIMUM}")
                if torch is None:
                    raise RuntimeError("The PyTorch extension could not install torch; install it from the "
                                       "PyTorch module, then try again.")
        except ImportError:
            slicer.util.pip_install(torch_req[0])
    rest = [r for r in requirements if not r.startswith("torch")]
    if rest:
        log(f"Installing {' '.join(rest)}")
        slicer.util.pip_install(" ".join(rest))  # a string: older Slicer versions take no list
    still = missing()
    if still:
        raise RuntimeError(f"These packages are still missing after the installation: {', '.join(still)}. "
                           "Restart Slicer and try again.")
    return True
