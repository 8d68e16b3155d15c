"""The accuracy gate: per output, per channel, top-1, and the budget parser."""

from __future__ import annotations

import numpy as np
import pytest
from edgefleet.packager.accuracy import Budget, evaluate, parse_budget
from edgefleet.sdk.errors import ConfigError


def _detector(rng: np.random.Generator) -> np.ndarray:
    """A YOLO-style (1, 22, 300) output: 4 box rows in pixels (0-320), 18 class-score rows (0-1)."""
    boxes = rng.uniform(0, 320, (1, 4, 300))
    scores = rng.beta(0.3, 3.0, (1, 18, 300))
    return np.concatenate([boxes, scores], axis=1).astype(np.float32)


def test_gate_catches_class_scores_collapsing_under_a_high_global_cosine() -> None:
    rng = np.random.default_rng(0)
    ref = [{"output0": _detector(rng)} for _ in range(3)]
    got = []
    for r in ref:
        g = r["output0"].copy()
        g[:, 4:, :] = 0.0  # every class score falls to zero, boxes stay right
        got.append({"output0": g})
    acc = evaluate(got, ref, Budget())
    out = acc.outputs[0]
    assert out.cosine > 0.999  # the single number that hides the collapse...
    assert not acc.ok  # ...and the per-channel check that catches it
    assert out.collapsed_channels == tuple(range(4, 22))
    assert any("collapsed" in f for f in out.failures)


def test_gate_passes_small_noise_on_every_channel() -> None:
    rng = np.random.default_rng(1)
    ref = [{"output0": _detector(rng)} for _ in range(3)]
    got = [{"output0": r["output0"] * (1 + 0.002 * rng.standard_normal(r["output0"].shape)).astype(np.float32)}
           for r in ref]
    acc = evaluate(got, ref, Budget())
    assert acc.ok, acc.failures
    assert acc.outputs[0].worst_channel_cosine > 0.99


def test_gate_measures_top1_agreement_for_classifier_outputs() -> None:
    ref = [{"probs": np.array([[0.6, 0.4]], np.float32)}, {"probs": np.array([[0.2, 0.8]], np.float32)}]
    got = [{"probs": np.array([[0.45, 0.55]], np.float32)}, {"probs": np.array([[0.2, 0.8]], np.float32)}]
    acc = evaluate(got, ref, Budget(min_cosine=0.5))
    assert acc.outputs[0].top1 == 0.5
    assert acc.failures == ["probs: top-1 agreement 50.0% < 99.0%"]


def test_gate_reports_abs_and_rel_errors_at_each_outputs_scale() -> None:
    ref = [{"big": np.array([[100.0, 200.0, 300.0]], np.float32), "small": np.array([[0.01, 0.02, 0.03]], np.float32)}]
    got = [{"big": np.array([[101.0, 200.0, 300.0]], np.float32), "small": np.array([[0.02, 0.02, 0.03]], np.float32)}]
    acc = evaluate(got, ref, Budget(min_cosine=0.0, max_rel=0.1))
    big, small = acc.outputs
    assert big.max_abs == pytest.approx(1.0) and big.max_rel == pytest.approx(1 / 300)
    assert small.max_abs == pytest.approx(0.01, rel=1e-4) and small.max_rel == pytest.approx(1 / 3, rel=1e-4)
    assert big.ok and not small.ok


def test_gate_fails_nan_outputs() -> None:
    ref = [{"y": np.ones((1, 3), np.float32)}]
    got = [{"y": np.array([[1.0, np.nan, 1.0]], np.float32)}]
    assert "NaN or Inf in output" in evaluate(got, ref, Budget()).outputs[0].failures


def test_parse_budget_sets_global_and_per_output_limits() -> None:
    b = parse_budget(["cosine=0.995", "top1=0.98", "scores:max_abs=0.05"])
    assert (b.min_cosine, b.min_top1, b.max_abs) == (0.995, 0.98, None)
    assert b.for_output("scores").max_abs == 0.05
    assert b.for_output("boxes").max_abs is None


@pytest.mark.parametrize("item, message", [
    ("cosine", "expected METRIC=VALUE"),
    ("speed=2", "unknown metric 'speed'"),
    ("cosine=high", "not a number"),
    ("cosine=1.5", r"min_cosine must be in \[-1, 1\]"),
    ("max_abs=-1", "max_abs must be >= 0"),
])
def test_parse_budget_refuses_bad_items(item: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_budget([item])


def test_gate_skips_channels_that_never_fire() -> None:
    ref = np.zeros((1, 3, 50), np.float32)
    ref[0, 0] = np.linspace(0, 300, 50)  # boxes
    ref[0, 1] = np.linspace(0, 0.9, 50)  # a class that fires
    ref[0, 2] = np.linspace(0, 0.004, 50)  # a class that never does: below the 0.01 floor
    got = ref.copy()
    got[0, 2] = 0.0
    assert evaluate([{"o": got}], [{"o": ref}], Budget()).ok
    assert not evaluate([{"o": got}], [{"o": ref}], Budget(channel_floor=0.0)).ok
