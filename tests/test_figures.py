"""What the report's figures draw: the choice of convergence targets (their data is checked end to end)."""

from __future__ import annotations

from psa.analysis.figures import convergence_targets


def test_convergence_targets_default_and_explicit():
    curves = {("1*32", "none"): [], ("4*8", "none"): [], ("2*16", "hidden"): [], ("18*18", "full"): []}
    assert convergence_targets(None, curves, ["1*32", "2*16", "4*8", "18*18"]) == (["18*18"], [])
    assert convergence_targets(None, curves, ["1*32", "2*16", "4*8"]) == (["1*32", "4*8"], [])
    assert convergence_targets(None, {("1*32", "none"): []}, ["1*32"]) == (["1*32"], [])
    assert convergence_targets(None, {}, ["1*32"]) == ([], [])
    assert convergence_targets(("4*8", "1*2048"), curves, ["1*32", "4*8"]) == (["4*8"], ["1*2048"])
