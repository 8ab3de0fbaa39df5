"""The benchmark scripts refuse what they cannot compare before any timed run."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench_generate():
    spec = importlib.util.spec_from_file_location("bench_generate", ROOT / "benchmarks" / "bench_generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_to_a_folder_that_is_not_a_checkout_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="no DiffDefSlicer/diffdef/cli.py there"):
        _bench_generate().main(["--compare-to", str(tmp_path), "--runs", "1"])


def test_compare_python_that_cannot_import_diffdef_is_refused(tmp_path):
    not_a_python = tmp_path / "python"
    not_a_python.write_text("not an interpreter")
    for python in (tmp_path / "missing" / "python", not_a_python):
        with pytest.raises(SystemExit, match="not a Python interpreter that imports diffdef"):
            _bench_generate().main(["--compare-python", str(python), "--runs", "1"])


def test_the_model_asked_for_is_the_one_run(tmp_path):
    """``--model`` reaches ``diffdef generate``: a folder without a bundle fails the first run with diffdef's own
    message about it."""
    with pytest.raises(SystemExit, match="run failed") as failure:
        _bench_generate().main(["--model", str(tmp_path / "no-bundle"), "--runs", "1"])
    assert "no-bundle" in str(failure.value)
