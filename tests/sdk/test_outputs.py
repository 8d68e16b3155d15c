"""Output statistics for drift: chosen from the output's kind, computed per sample, recorded by a real ORT session's
``Model.run`` in its own sketch, and compared by the documented quantile distance."""

from __future__ import annotations

import json

import numpy as np
import pytest
from edgefleet.sdk.bundle import extract_bundle
from edgefleet.sdk.outputs import (
    META_OUTPUT_REFERENCE,
    QUANTILES,
    OutputStat,
    choose_stat,
    quantile_distance,
    reference_from_metadata,
    reference_quantiles,
)
from edgefleet.sdk.runtime import Model
from edgefleet.sdk.testing import build_test_bundle, output_reference_metadata


def test_top1_of_probabilities_and_of_logits() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]], np.float32)
    assert OutputStat("p", "top1").values({"p": probs}) == pytest.approx([0.7, 0.4])
    logits = np.log(probs)
    assert OutputStat("p", "top1", softmax=True).values({"p": logits}) == pytest.approx([0.7, 0.4], rel=1e-5)


def test_top_score_reads_class_channels_of_a_yolo_layout_and_norm_is_l2() -> None:
    det = np.zeros((1, 4 + 3, 10), np.float32)
    det[0, :4] = 300.0  # box coordinates must not count as scores
    det[0, 5, 7] = 0.83
    assert OutputStat("d", "top_score").values({"d": det}) == pytest.approx([0.83])
    emb = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    assert OutputStat("e", "norm").values({"e": emb}) == pytest.approx([5.0, 0.0])


def test_choose_stat_from_kinds() -> None:
    refs = [{"probs": np.array([[0.9, 0.1]], np.float32), "emb": np.ones((1, 4), np.float32)}]
    outs = [("emb", "float32"), ("probs", "float32")]
    assert choose_stat(outs, {"probs": "classifier"}, refs) == OutputStat("probs", "top1", softmax=False)
    assert choose_stat(outs, {}, refs) == OutputStat("emb", "norm")
    assert choose_stat([("ids", "int64")], {}, refs) is None


def test_quantile_distance_is_zero_for_the_same_and_grows_with_a_shift() -> None:
    rng = np.random.default_rng(0)
    a = reference_quantiles(list(rng.uniform(0.4, 1.0, 5000)))
    same = reference_quantiles(list(rng.uniform(0.4, 1.0, 5000)))
    shifted = reference_quantiles(list(rng.uniform(0.25, 0.85, 5000)))
    assert len(a) == len(QUANTILES)
    assert quantile_distance(a, same) < 0.03
    # every quantile moved by 0.15 over a 5%-95% range of 0.54: 0.15 / 0.54
    assert quantile_distance(a, shifted) == pytest.approx(0.15 / 0.54, rel=0.05)
    with pytest.raises(ValueError):
        quantile_distance(a, a[:3])


def test_model_run_records_the_output_statistic_in_its_own_sketch(mlp_model, tmp_path, signing_key,
                                                                  trusted) -> None:
    x = np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32)
    samples = [{"x": x[i:i + 1]} for i in range(64)]
    meta = output_reference_metadata(mlp_model, "top1", "probs", samples)
    ref = reference_from_metadata(meta)
    assert ref is not None and ref[1] == 64 and all(0.25 <= q <= 1.0 for q in ref[0])
    bundle = build_test_bundle(mlp_model, tmp_path / "b.efb", signing_key, metadata=meta)
    extract_bundle(bundle, trusted, tmp_path / "x")
    m = Model.open(tmp_path / "x", trusted, cache_dir=tmp_path / "c")
    assert m.output_stat == OutputStat("probs", "top1")
    out = m.run({"x": x[:8]})
    snap = m.output_recorder.take(0.0)
    assert snap.count == 8  # one value per sample of the batch
    assert snap.sketch.max == pytest.approx(float(out["probs"].max()), rel=0.02)
    assert m.recorder.take(0.0).count == 1  # latency: one request


def test_malformed_reference_is_ignored() -> None:
    assert reference_from_metadata({META_OUTPUT_REFERENCE: "{"}) is None
    assert reference_from_metadata({META_OUTPUT_REFERENCE: json.dumps({"q": [1.0], "n": 3})}) is None
    with pytest.raises(ValueError):
        OutputStat.from_metadata({"output_stat": json.dumps({"output": "p", "stat": "mean"})})
