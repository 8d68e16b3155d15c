"""Output drift: one statistic per model output, its reference distribution, and the distance between two.

The packager picks a **statistic** from the output's kind (``packager/accuracy.py`` infers it, ``--output-kind``
overrides): ``top1`` for classifiers (the top-1 probability; a softmax is applied first when the output is not
already one), ``top_score`` for detectors (the highest class score of a YOLO-style ``[batch, 4 + classes, boxes]``
output, or the highest value otherwise), ``norm`` for anything else (the L2 norm of each sample's output: an
embedding's length, a mask's energy). It records the statistic's **reference distribution** over the validation
data (the FP32 model's own outputs) in the signed manifest's ``metadata`` (so every v1 agent still reads the
bundle). On the device, the runtime adds each request's statistic to a DDSketch (the latency sketch's code), sent
in every telemetry window; the controller merges them and compares them with the reference or with the previous
version (:func:`quantile_distance`).

Imports only the standard library at module level (the controller uses the distance; numpy is loaded by
:meth:`OutputStat.values`, which only the runtime calls).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["META_OUTPUT_REFERENCE", "META_OUTPUT_STAT", "QUANTILES", "STATS", "OutputStat", "choose_stat",
           "quantile_distance", "reference_from_metadata", "reference_quantiles"]

STATS = ("top1", "top_score", "norm")
META_OUTPUT_STAT = "output_stat"
"""Manifest metadata key: ``{"output": name, "stat": one of STATS, "softmax": bool}`` as JSON."""
META_OUTPUT_REFERENCE = "output_reference"
"""Manifest metadata key: ``{"q": [19 quantiles at 5%..95%], "n": values}`` of the statistic on validation data."""
QUANTILES = tuple(round(0.05 * i, 2) for i in range(1, 20))
"""The quantiles a distribution is summarised by: 5%, 10%, ..., 95%."""


@dataclass(frozen=True)
class OutputStat:
    """Which output, which statistic, and whether a softmax comes first (a classifier that outputs logits)."""

    output: str
    stat: str
    softmax: bool = False

    def __post_init__(self) -> None:
        if self.stat not in STATS:
            raise ValueError(f"output statistic must be one of {STATS}, got {self.stat!r}")
        if not isinstance(self.output, str) or not self.output:
            raise ValueError(f"output statistic needs an output name, got {self.output!r}")

    def to_json(self) -> str:
        """The manifest metadata value."""
        return json.dumps({"output": self.output, "stat": self.stat, "softmax": self.softmax}, sort_keys=True)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> OutputStat | None:
        """The statistic a manifest names, or None (absent; a malformed one is a ValueError)."""
        raw = metadata.get(META_OUTPUT_STAT)
        if raw is None:
            return None
        try:
            d = json.loads(raw)
            return cls(str(d["output"]), str(d["stat"]), bool(d.get("softmax", False)))
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"manifest metadata {META_OUTPUT_STAT} is malformed: {exc}") from exc

    def values(self, outputs: Mapping[str, Any]) -> list[float]:
        """The statistic of each sample (axis 0) of one inference's outputs; non-finite results are left out.
        Vectorised over the batch: it runs on every request."""
        import numpy as np

        arr = np.asarray(outputs[self.output])
        if arr.dtype.kind != "f":
            arr = arr.astype(np.float32)
        if arr.ndim == 0:
            arr = arr.reshape(1, 1)
        elif arr.ndim == 1:
            arr = arr.reshape(1, -1)
        b = arr.shape[0]
        if self.stat == "top1":
            # the top softmax probability is 1 / sum(exp(x - max)); a [batch, classes] output (the common case)
            # needs no averaging over positions (numpy's mean costs several µs on small arrays)
            rows = arr if arr.ndim == 2 else arr.reshape(b, -1, arr.shape[-1])
            top = (1.0 / np.exp(rows - rows.max(axis=-1, keepdims=True)).sum(axis=-1) if self.softmax
                   else rows.max(axis=-1))
            vals = top if top.ndim == 1 else top.sum(axis=-1) / top.shape[-1]
        elif self.stat == "top_score":
            if arr.ndim == 3 and min(arr.shape[1:]) > 4:
                ch = arr if arr.shape[1] < arr.shape[2] else arr.transpose(0, 2, 1)  # [batch, 4 + classes, boxes]
                vals = ch[:, 4:].reshape(b, -1).max(axis=1)
            else:
                vals = arr.reshape(b, -1).max(axis=1)
        else:
            flat = arr.reshape(b, -1).astype(np.float64)
            vals = np.sqrt(np.einsum("ij,ij->i", flat, flat))
        return [v for v in vals.tolist() if math.isfinite(v) and v >= 0.0]


def choose_stat(outputs: Sequence[tuple[str, str]], kinds: Mapping[str, str],
                refs: Sequence[Mapping[str, Any]]) -> OutputStat | None:
    """The statistic for a model: ``outputs`` are (name, dtype) in order, ``kinds`` each output's kind, ``refs``
    the reference outputs of the validation samples. The first classifier output, else the first detector output,
    else the first float output; None when the model has no float output."""
    import numpy as np

    floats = [n for n, dt in outputs if dt in ("float32", "float16", "float64", "bfloat16")]
    if not floats:
        return None
    for kind, stat in (("classifier", "top1"), ("detector", "top_score")):
        name = next((n for n in floats if kinds.get(n) == kind), None)
        if name is not None:
            if stat != "top1":
                return OutputStat(name, stat)
            probs = all(float(np.min(r[name])) >= 0.0 and np.allclose(np.sum(r[name], axis=-1), 1.0, atol=1e-3)
                        for r in refs)
            return OutputStat(name, stat, softmax=not probs)
    return OutputStat(floats[0], "norm")


def reference_quantiles(values: Sequence[float]) -> list[float]:
    """The 19 quantiles (5%..95%) of ``values``, linear interpolation between order statistics."""
    xs = sorted(v for v in values if math.isfinite(v))
    if not xs:
        raise ValueError("no values to take quantiles of")
    out = []
    for q in QUANTILES:
        pos = q * (len(xs) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(xs) - 1)
        out.append(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))
    return out


def reference_from_metadata(metadata: Mapping[str, str]) -> tuple[list[float], int] | None:
    """The reference quantiles and their sample count a manifest records, or None (absent or malformed)."""
    raw = metadata.get(META_OUTPUT_REFERENCE)
    if raw is None:
        return None
    try:
        d = json.loads(raw)
        q = [float(x) for x in d["q"]]
        n = int(d["n"])
    except (ValueError, TypeError, KeyError):
        return None
    if len(q) != len(QUANTILES) or not all(math.isfinite(x) for x in q) or n < 1:
        return None
    return q, n


def quantile_distance(reference: Sequence[float], observed: Sequence[float]) -> float:
    """How far ``observed`` lies from ``reference`` (both the 19 quantiles of :data:`QUANTILES`), as a share of the
    reference's spread: the mean absolute difference of the quantiles (a discretised Wasserstein-1 distance between
    the two distributions, over their central 90%) divided by the reference's 5%-95% range (floored at 1% of its
    median's magnitude, and at 1e-6, so a near-constant reference does not turn rounding into drift).

    0 is the same distribution; 0.25 means the quantiles moved, on average, by a quarter of the reference's range
    (e.g. a classifier's typical top-1 confidence falling from 0.9 to 0.75 where the validation data spread over
    0.4..1.0). Scale-free, so one threshold serves confidences, scores and norms.
    """
    if len(reference) != len(QUANTILES) or len(observed) != len(QUANTILES):
        raise ValueError(f"need {len(QUANTILES)} quantiles on both sides, got {len(reference)} and {len(observed)}")
    spread = max(reference[-1] - reference[0], 0.01 * abs(reference[len(reference) // 2]), 1e-6)
    return sum(abs(a - b) for a, b in zip(reference, observed, strict=True)) / len(reference) / spread
