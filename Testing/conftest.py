"""Shared fixtures: a tiny bundle trained by the project's own pipeline (a few steps per stage, 8 mm grid)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = ROOT / "DiffDefTraining" / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """Run folder of a tiny end-to-end training on the synthetic cohort (about 10 s)."""
    from diffdef_training.config import load_config
    from diffdef_training.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("tiny_run")
    run_pipeline(load_config(TINY_CONFIG, {"output": str(out)}), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run) -> Path:
    return tiny_run / "bundle"


@pytest.fixture(scope="session")
def tiny_generator(tiny_bundle):
    from diffdef.generate import AtlasGenerator

    return AtlasGenerator(tiny_bundle, device="cpu")


@pytest.fixture(scope="session")
def tiny_conditional_template(tiny_bundle, tmp_path_factory) -> Path:
    """A conditional template network trained for a few steps on the tiny bundle's cohort (its run folder,
    ``ct-run``, beside it)."""
    from diffdef_training.conditional_template import run

    root = tmp_path_factory.mktemp("conditional_template")
    return run(tiny_bundle, root / "bundle", root / "ct-run", steps=3, batch_size=2, progress=False, device="cpu")
