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


def _ctc(rng: np.random.Generator, steps: int = 40, classes: int = 30) -> np.ndarray:
    logits = rng.standard_normal((1, steps, classes)) * 4
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def test_gate_judges_ctc_outputs_per_step_and_by_decoded_sequence() -> None:
    from edgefleet.packager.accuracy import ctc_decode, infer_kind

    rng = np.random.default_rng(3)
    ref = [{"probs": _ctc(rng)} for _ in range(6)]
    assert infer_kind([r["probs"] for r in ref]) == "sequence"
    got = [{"probs": r["probs"].copy()} for r in ref]
    p = got[2]["probs"]
    step = int(np.argmax(p[0].max(axis=-1) < 0.9)) if (p[0].max(axis=-1) < 0.9).any() else 0
    p[0, step] = np.roll(p[0, step], 1)  # one time step now decodes to another symbol: a different text
    acc = evaluate(got, ref, Budget())
    out = acc.outputs[0]
    assert out.kind == "sequence" and out.cosine > 0.97
    assert out.step_agreement is not None and out.step_agreement < 1.0
    assert any("per-step argmax agreement" in f for f in out.failures)
    assert ctc_decode(got[2]["probs"]) != ctc_decode(ref[2]["probs"]) or out.decoded_agreement == 1.0


def test_gate_holds_the_budget_for_every_sample_not_only_the_pool() -> None:
    rng = np.random.default_rng(4)
    ref = [{"y": rng.standard_normal((1, 64)).astype(np.float32)} for _ in range(20)]
    got = [{"y": r["y"].copy()} for r in ref]
    got[7]["y"] = (got[7]["y"] + 0.2 * rng.standard_normal((1, 64))).astype(np.float32)  # one sample off
    acc = evaluate(got, ref, Budget(), kinds={"y": "tensor"})
    out = acc.outputs[0]
    assert out.cosine >= 0.99 > out.min_sample_cosine  # the pooled number passes, the worst sample does not
    assert any("sample 7 cosine" in f for f in out.failures)


def test_gate_compares_detections_after_thresholding_and_catches_pinned_scores() -> None:
    rng = np.random.default_rng(5)
    ref = [{"output0": _detector(rng)} for _ in range(6)]
    pinned = [{"output0": np.concatenate([r["output0"][:, :4], np.full_like(r["output0"][:, 4:], 0.5)], axis=1)}
              for r in ref]
    acc = evaluate(pinned, ref, Budget())
    out = acc.outputs[0]
    assert out.kind == "detector" and out.detection_f1 is not None and out.detection_f1 < 0.5
    assert any("detections at score" in f for f in out.failures)
    assert any("collapsed" in f for f in out.failures)


def test_gate_compares_integer_outputs_exactly() -> None:
    ref = [{"label": np.array([3], np.int64)}, {"label": np.array([1], np.int64)}]
    got = [{"label": np.array([3], np.int64)}, {"label": np.array([2], np.int64)}]
    acc = evaluate(got, ref, Budget())
    assert not acc.ok and "compared exactly" in acc.failures[0]


def test_gate_judges_a_sample_whose_reference_is_zero_by_error_not_cosine() -> None:
    """A text detector's map of a photo without text is ~0 everywhere: a tiny deviation there has cosine 0, which
    is no accuracy loss; a real blob where the original has none is."""
    rng = np.random.default_rng(6)
    maps = [rng.uniform(0, 1, (1, 1, 16, 16)).astype(np.float32) for _ in range(3)]
    maps.append(np.zeros((1, 1, 16, 16), np.float32))
    ref = [{"m": m} for m in maps]
    tiny = [{"m": m + (1e-4 if i == 3 else 0.0)} for i, m in enumerate(maps)]
    assert evaluate([{"m": x["m"].astype(np.float32)} for x in tiny], ref, Budget()).ok
    blob = [{"m": m.copy()} for m in maps]
    blob[3]["m"][0, 0, :4, :4] = 0.9
    acc = evaluate(blob, ref, Budget())
    assert not acc.ok and any("~0 everywhere" in f for f in acc.failures)
