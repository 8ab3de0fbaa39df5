"""Smoke test of the registration report (issue 5): tiny bundle, 2 held-out pairs, few demons iterations."""
from __future__ import annotations

import math


def test_eval_registration_smoke(tiny_bundle, tmp_path, capsys):
    from diffdef_training.eval_registration import main

    out = tmp_path / "registration.md"
    assert main(["--model", str(tiny_bundle), "--pairs", "2", "--demons-iterations", "5", "--bspline-iterations", "3",
                 "--out", str(out)]) == 0
    text = out.read_text()
    assert "ANTs is not installed" in text
    for method in ("before registration", "network", "SimpleITK demons", "SimpleITK BSpline"):
        assert f"| all | {method} | 2 |" in text
    assert "| template->subject | network | 1 |" in text and "| subject->subject | network | 1 |" in text
    assert "| all | network |" in capsys.readouterr().out


def test_eval_registration_values(tiny_bundle):
    from diffdef_training.eval_registration import evaluate

    result = evaluate(tiny_bundle, pairs=2, demons_iterations=5, bspline=False, log=None)
    rows = {(r["pairs"], r["method"]): r for r in result["rows"]}
    assert set(m for _, m in rows) == {"before registration", "network", "SimpleITK demons"}
    for r in rows.values():
        assert all(0.0 <= d <= 1.0 for d in r["dice"].values() if not math.isnan(d))
        assert 0.0 <= r["folding"] <= 100.0
    assert rows[("all", "network")]["folding"] == 0.0  # scaling and squaring of a smooth velocity
