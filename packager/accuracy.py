"""The accuracy gate: every candidate against the FP32 original, per output tensor, at each output's own scale.

One cosine over a whole tensor hides collapse: a detector whose boxes (0-320) and class scores (0-1) share a tensor
keeps cosine 0.9996 while every class score falls to zero. So each output is judged on its own, and an output of
rank >= 3 also channel by channel (axis 1): a channel whose reference carries signal must keep its direction
(channel cosine) and its energy (norm ratio within [1/2, 2]), or it counts as collapsed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
from edgefleet.sdk.errors import ConfigError
from edgefleet.sdk.validation import cosine_similarity

__all__ = ["OUTPUT_KINDS", "Budget", "CandidateAccuracy", "OutputMetrics", "ctc_decode", "evaluate", "infer_kind",
           "is_classifier_output", "kinds_of", "parse_budget"]

_METRICS = {"cosine": "min_cosine", "top1": "min_top1", "channel_cosine": "min_channel_cosine",
            "channel_floor": "channel_floor", "max_abs": "max_abs", "max_rel": "max_rel", "mean_rel": "mean_rel",
            "step_agreement": "min_step_agreement", "detection_f1": "min_detection_f1",
            "detection_threshold": "detection_threshold", "detection_band": "detection_band",
            "mask_iou": "min_mask_iou", "mask_threshold": "mask_threshold", "variation": "min_variation"}

OUTPUT_KINDS = ("auto", "tensor", "classifier", "sequence", "detector", "mask")
"""How an output is judged beyond cosine and error: ``classifier`` (batch, classes): top-1 agreement; ``sequence``
(batch, steps, classes), e.g. CTC logits: per-step argmax agreement and the decoded (greedy CTC) sequence per
sample; ``detector`` (batch, 4 + classes, anchors), YOLO layout: detections after thresholding (F1 of the detected
anchors with their class); ``mask`` (batch, 1, H, W) probability map: IoU after thresholding; ``tensor``: cosine and
errors only. ``auto`` infers the kind from the reference's shape and values."""


@dataclass(frozen=True)
class Budget:
    """What a candidate must keep, per output; ``per_output`` overrides by output name.

    Defaults: cosine >= 0.99 per output, no collapsed channel, top-1 agreement >= 99% on classifier outputs. Absolute
    and relative error limits are off unless asked for (``max_rel`` is relative to the output's largest magnitude).
    Channels whose reference never reaches ``channel_floor`` in magnitude are not judged: measured on YOLOv8n, the
    classes that never fire on the validation photos peak at 0.0002-0.018 (below any detection threshold), where
    INT8's 1/255 step is noise; the classes that do fire peak at 0.17-0.82.

    Every limit holds per validation sample (the worst sample decides), not only pooled over all samples. An output
    that varies across the validation inputs must keep at least ``min_variation`` of that variation (a detector
    whose class scores are pinned at 0.5 keeps a fine cosine on its boxes and detects everything everywhere).
    """

    min_cosine: float = 0.99
    min_top1: float = 0.99
    min_channel_cosine: float = 0.9
    channel_floor: float = 0.05
    max_abs: float | None = None
    max_rel: float | None = None
    mean_rel: float | None = None
    min_step_agreement: float = 0.99
    min_detection_f1: float = 0.95
    detection_threshold: float = 0.25
    detection_band: float = 0.2
    min_mask_iou: float = 0.9
    mask_threshold: float = 0.3
    min_variation: float = 0.1
    per_output: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in ("min_cosine", "min_top1", "min_channel_cosine", "min_step_agreement", "min_detection_f1",
                  "min_mask_iou", "min_variation", "detection_threshold", "mask_threshold",
                  "detection_band"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or not -1.0 <= v <= 1.0:
                raise ConfigError(f"accuracy budget {f} must be in [-1, 1], got {v!r}")
        if not isinstance(self.channel_floor, (int, float)) or self.channel_floor < 0:
            raise ConfigError(f"accuracy budget channel_floor must be >= 0, got {self.channel_floor!r}")
        for f in ("max_abs", "max_rel", "mean_rel"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, (int, float)) or v < 0):
                raise ConfigError(f"accuracy budget {f} must be >= 0, got {v!r}")

    def for_output(self, name: str) -> Budget:
        """The budget that applies to one output (its overrides merged in)."""
        over = self.per_output.get(name)
        return replace(self, per_output={}, **over) if over else self

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        d = asdict(self)
        d["per_output"] = {k: dict(v) for k, v in self.per_output.items()}
        return d


def parse_budget(items: Sequence[str], base: Budget | None = None) -> Budget:
    """Parse ``METRIC=VALUE`` or ``OUTPUT:METRIC=VALUE`` items (metrics: cosine, top1, channel_cosine, max_abs,
    max_rel, mean_rel) into a Budget; unknown metrics and bad numbers are ConfigErrors."""
    budget = base or Budget()
    glob: dict[str, float] = {}
    per: dict[str, dict[str, float]] = {k: dict(v) for k, v in budget.per_output.items()}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"accuracy budget {item!r}: expected METRIC=VALUE, e.g. cosine=0.995")
        output, _, metric = key.strip().rpartition(":")
        if metric not in _METRICS:
            raise ConfigError(f"accuracy budget {item!r}: unknown metric {metric!r}; known: {', '.join(_METRICS)}")
        try:
            v = float(value)
        except ValueError:
            raise ConfigError(f"accuracy budget {item!r}: {value!r} is not a number") from None
        if not math.isfinite(v):
            raise ConfigError(f"accuracy budget {item!r}: value must be finite")
        if output:
            per.setdefault(output, {})[_METRICS[metric]] = v
        else:
            glob[_METRICS[metric]] = v
    return replace(budget, **glob, per_output=per)


@dataclass(frozen=True)
class OutputMetrics:
    """How one output of a candidate compares with the FP32 original over all validation samples."""

    name: str
    cosine: float
    min_sample_cosine: float
    max_abs: float
    mean_abs: float
    max_rel: float
    mean_rel: float
    scale: float
    top1: float | None = None
    worst_channel: int | None = None
    worst_channel_cosine: float | None = None
    collapsed_channels: tuple[int, ...] = ()
    failures: tuple[str, ...] = ()
    kind: str = "tensor"
    step_agreement: float | None = None
    decoded_agreement: float | None = None
    detection_f1: float | None = None
    mask_iou: float | None = None
    variation: float | None = None
    samples: int = 0

    @property
    def ok(self) -> bool:
        """True when the output is within its budget."""
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        """JSON form (floats rounded for reading)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = float(f"{v:.6g}") if math.isfinite(v) else str(v)
        d["collapsed_channels"] = list(self.collapsed_channels)
        d["failures"] = list(self.failures)
        return d

    def summary(self) -> str:
        """One short line of the numbers that matter."""
        parts = [f"cos {self.cosine:.5f} (worst sample {self.min_sample_cosine:.5f})", f"max_abs {self.max_abs:.3g}",
                 f"max_rel {self.max_rel:.3g}"]
        if self.top1 is not None:
            parts.append(f"top1 {self.top1:.1%}")
        if self.step_agreement is not None:
            parts.append(f"steps {self.step_agreement:.2%}")
        if self.decoded_agreement is not None:
            parts.append(f"decoded {self.decoded_agreement:.0%}")
        if self.detection_f1 is not None:
            parts.append(f"detections F1 {self.detection_f1:.3f}")
        if self.mask_iou is not None:
            parts.append(f"mask IoU {self.mask_iou:.3f}")
        if self.worst_channel_cosine is not None:
            parts.append(f"worst ch{self.worst_channel} cos {self.worst_channel_cosine:.4f}")
        if self.collapsed_channels:
            parts.append(f"{len(self.collapsed_channels)} collapsed channel(s)")
        return f"{self.name} [{self.kind}]: " + ", ".join(parts)


@dataclass(frozen=True)
class CandidateAccuracy:
    """All outputs of one candidate."""

    outputs: tuple[OutputMetrics, ...]

    @property
    def ok(self) -> bool:
        """True when every output is within budget."""
        return all(o.ok for o in self.outputs)

    @property
    def failures(self) -> list[str]:
        """Every broken limit, prefixed with its output."""
        return [f"{o.name}: {f}" for o in self.outputs for f in o.failures]

    def worst_cosine(self) -> float:
        """Lowest output cosine (a single number to rank candidates by)."""
        return min(o.cosine for o in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"ok": self.ok, "outputs": [o.to_dict() for o in self.outputs], "failures": self.failures}


def is_classifier_output(ref: np.ndarray) -> bool:
    """A ``(batch, classes)`` float output with at least two classes: top-1 agreement applies."""
    return ref.ndim == 2 and ref.shape[1] >= 2 and ref.dtype.kind == "f"


def infer_kind(refs: Sequence[np.ndarray]) -> str:
    """The output kind the reference's shape and values suggest (see :data:`OUTPUT_KINDS`)."""
    r = refs[0]
    if r.dtype.kind != "f":
        return "tensor"
    if is_classifier_output(r):
        # class probabilities (each row a distribution); an embedding or logits are judged as tensors unless the
        # user says --output-kind NAME=classifier (an embedding's argmax means nothing)
        rows = np.concatenate([x.reshape(-1, x.shape[-1]) for x in refs])
        if float(rows.min()) >= 0.0 and np.allclose(rows.sum(axis=-1), 1.0, atol=1e-3):
            return "classifier"
        return "tensor"
    if r.ndim == 4 and r.shape[1] == 1 and r.shape[2] > 1 and r.shape[3] > 1:
        lo = min(float(x.min()) for x in refs)
        hi = max(float(x.max()) for x in refs)
        if lo >= 0.0 and hi <= 1.0:
            return "mask"  # a probability map (e.g. a DBNet text detector)
    if r.ndim == 3 and r.shape[1] >= 2 and r.shape[2] >= 2:
        rows = np.concatenate([x.reshape(-1, x.shape[-1]) for x in refs])
        if float(rows.min()) >= 0.0 and np.allclose(rows.sum(axis=-1), 1.0, atol=1e-3):
            return "sequence"  # a distribution over classes at every step (CTC recognisers, taggers)
    if r.ndim == 3 and r.shape[1] >= 5 and r.shape[2] > 4 * r.shape[1]:
        scores = np.concatenate([x[:, 4:, :].ravel() for x in refs])
        if scores.size and float(scores.min()) >= 0.0 and float(scores.max()) <= 1.0:
            return "detector"  # (batch, 4 box coordinates + class scores, anchors): the YOLOv8 head layout
    return "tensor"


def ctc_decode(probs: np.ndarray, blank: int = 0) -> list[tuple[int, ...]]:
    """Greedy CTC decoding per batch row: argmax per step, repeats merged, blanks dropped."""
    out = []
    for row in np.argmax(probs.reshape(-1, probs.shape[-2], probs.shape[-1]), axis=-1):
        seq: list[int] = []
        prev = -1
        for s in row.tolist():
            if s != prev and s != blank:
                seq.append(int(s))
            prev = s
        out.append(tuple(seq))
    return out


def _detections(x: np.ndarray, threshold: float, keep: np.ndarray | None = None) -> set[tuple[int, int, int]]:
    """(batch row, anchor, class) of every anchor whose best class score reaches ``threshold`` (among ``keep``)."""
    scores = x[:, 4:, :]
    best = scores.max(axis=1)
    cls = scores.argmax(axis=1)
    hit = best >= threshold
    if keep is not None:
        hit &= keep
    rows, anchors = np.nonzero(hit)
    return {(int(b), int(a), int(cls[b, a])) for b, a in zip(rows, anchors, strict=True)}


def _detection_f1(got: np.ndarray, ref: np.ndarray, threshold: float, band: float) -> float:
    """F1 of the candidate's detections against the original's, leaving out anchors whose original score lies within
    ``band`` (relative) of the threshold: there a rounding flips the decision of the original itself."""
    best = ref[:, 4:, :].max(axis=1)
    keep = np.abs(best - threshold) > band * threshold
    return _f1(_detections(got, threshold, keep), _detections(ref, threshold, keep))


def _f1(got: set[Any], ref: set[Any]) -> float:
    if not got and not ref:
        return 1.0
    hit = len(got & ref)
    return 2.0 * hit / (len(got) + len(ref))


def _channels(got: list[np.ndarray], ref: list[np.ndarray],
              floor: float) -> tuple[int | None, float | None, tuple[int, ...], int]:
    """Per channel (axis 1) cosine and norm ratio over all samples, for channels whose reference peaks at >= floor;
    returns the worst channel, its cosine, the collapsed channels (energy lost or blown up) and the channel count."""
    c = ref[0].shape[1]
    g = np.concatenate([np.moveaxis(x, 1, 0).reshape(c, -1) for x in got], axis=1).astype(np.float64)
    r = np.concatenate([np.moveaxis(x, 1, 0).reshape(c, -1) for x in ref], axis=1).astype(np.float64)
    worst, worst_cos = None, None
    collapsed = []
    for ch in range(c):
        rn = float(np.linalg.norm(r[ch]))
        if rn == 0.0 or float(np.max(np.abs(r[ch]))) < floor or not np.any(np.abs(r[ch] - r[ch].mean()) > 0):
            continue  # a constant or never-firing reference channel carries no signal to lose
        cos = cosine_similarity(g[ch], r[ch])
        ratio = float(np.linalg.norm(g[ch])) / rn
        # energy lost or blown up, or the channel no longer moves with the input (pinned scores)
        spread_r = float(np.std(r[ch]))
        spread_g = float(np.std(g[ch]))
        if worst_cos is None or cos < worst_cos:
            worst, worst_cos = ch, cos
        if not 0.5 <= ratio <= 2.0 or (spread_r > 0 and spread_g < 0.1 * spread_r):
            collapsed.append(ch)
    return worst, worst_cos, tuple(collapsed), c


def _variation(gs: Sequence[np.ndarray], rs: Sequence[np.ndarray]) -> float | None:
    """How much of the reference's variation across samples the candidate keeps (None: the reference does not
    vary, or there is one sample)."""
    if len(rs) < 3:
        return None
    r = np.stack([x.astype(np.float64).ravel() for x in rs])
    g = np.stack([x.astype(np.float64).ravel() for x in gs])
    spread_r = float(np.mean(np.std(r, axis=0)))
    if spread_r <= 1e-9 * max(float(np.max(np.abs(r))), 1e-30):
        return None
    return float(np.mean(np.std(g, axis=0))) / spread_r


def evaluate(
    got: Sequence[Mapping[str, np.ndarray]], ref: Sequence[Mapping[str, np.ndarray]], budget: Budget,
    classifier_outputs: Sequence[str] | None = None, kinds: Mapping[str, str] | None = None,
) -> CandidateAccuracy:
    """Compare a candidate's outputs with the original's over the same samples, output by output, each judged as
    its kind says (``kinds``: output name -> kind; missing or ``auto``: inferred from the reference)."""
    if len(got) != len(ref) or not ref:
        raise ValueError(f"need the same non-zero number of samples, got {len(got)} and {len(ref)}")
    results = []
    for name in ref[0]:
        b = budget.for_output(name)
        rs = [np.asarray(r[name]) for r in ref]
        gs = [np.asarray(g[name]) for g in got]
        n = len(rs)
        if rs[0].dtype.kind not in "fc":
            same = [np.array_equal(x, y) for x, y in zip(gs, rs, strict=True)]
            share = float(np.mean(same))
            results.append(OutputMetrics(name, share, min(same) * 1.0, 0.0 if all(same) else math.inf, 0.0, 0.0, 0.0,
                                         0.0, kind="exact", samples=n, failures=() if all(same) else (
                                             f"{rs[0].dtype} output differs in {same.count(False)} of {n} samples "
                                             f"(compared exactly)",)))
            continue
        if any(x.shape != y.shape for x, y in zip(gs, rs, strict=True)):
            results.append(OutputMetrics(name, 0.0, 0.0, math.inf, math.inf, math.inf, math.inf, 0.0, samples=n,
                                         failures=("shape differs from the original",)))
            continue
        kind = (kinds or {}).get(name, "auto")
        if classifier_outputs is not None and kind == "auto":
            kind = "classifier" if name in classifier_outputs else "tensor"
        if kind == "auto":
            kind = infer_kind(rs)
        a = np.concatenate([x.astype(np.float64).ravel() for x in gs])
        r = np.concatenate([x.astype(np.float64).ravel() for x in rs])
        failures: list[str] = []
        if not np.all(np.isfinite(a)):
            failures.append("NaN or Inf in output")
            a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
            gs = [np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) for x in gs]
        diff = np.abs(a - r)
        scale = float(np.max(np.abs(r))) if r.size else 0.0
        mean_ref = float(np.mean(np.abs(r))) if r.size else 0.0
        max_abs = float(diff.max()) if diff.size else 0.0
        mean_abs = float(diff.mean()) if diff.size else 0.0
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
        mean_rel = mean_abs / mean_ref if mean_ref > 0 else (0.0 if mean_abs == 0 else math.inf)
        cosine = cosine_similarity(a, r)
        # A sample whose reference is (close to) zero everywhere has no direction: a DBNet map of a photo without
        # text. Its cosine means nothing; there the error must stay small against the output's scale instead.
        sample_cos = []
        for i, (x, y) in enumerate(zip(gs, rs, strict=True)):
            yd = y.astype(np.float64)
            if scale > 0 and float(np.max(np.abs(yd))) < 0.01 * scale:
                err = float(np.max(np.abs(x.astype(np.float64) - yd))) if yd.size else 0.0
                if err > 0.05 * scale:
                    failures.append(f"sample {i}: the original is ~0 everywhere, the candidate reaches {err:.3g} "
                                    f"(> 5% of the output's scale)")
                sample_cos.append(1.0)
            else:
                sample_cos.append(cosine_similarity(x.astype(np.float64).ravel(), yd.ravel()))
        min_sample = min(sample_cos)
        top1 = step = decoded = det_f1 = iou = None
        if kind == "classifier" and rs[0].ndim >= 2:
            gi = np.concatenate([np.argmax(x.reshape(-1, x.shape[-1]), axis=-1) for x in gs])
            ri = np.concatenate([np.argmax(y.reshape(-1, y.shape[-1]), axis=-1) for y in rs])
            top1 = float(np.mean(gi == ri))
            if len(rs) >= 4 and len(set(ri.tolist())) > 1 and len(set(gi.tolist())) == 1:
                failures.append(f"collapsed: class {int(gi[0])} on every input, where the original picks "
                                f"{len(set(ri.tolist()))} different classes")
        elif kind == "sequence" and rs[0].ndim >= 3:
            per_sample = [float(np.mean(np.argmax(x, axis=-1) == np.argmax(y, axis=-1)))
                          for x, y in zip(gs, rs, strict=True)]
            step = min(per_sample)
            decoded = float(np.mean([ctc_decode(x) == ctc_decode(y) for x, y in zip(gs, rs, strict=True)]))
            if step < b.min_step_agreement:
                failures.append(f"per-step argmax agreement {step:.2%} < {b.min_step_agreement:.2%} "
                                f"(worst sample)")
            if decoded < b.min_top1:
                failures.append(f"decoded sequence (greedy CTC) differs in {1 - decoded:.0%} of samples "
                                f"(agreement {decoded:.0%} < {b.min_top1:.0%})")
        elif kind == "detector" and rs[0].ndim == 3:
            f1s = [_detection_f1(x, y, b.detection_threshold, b.detection_band) for x, y in zip(gs, rs, strict=True)]
            det_f1 = min(f1s)
            if det_f1 < b.min_detection_f1:
                failures.append(f"detections at score >= {b.detection_threshold}: F1 {det_f1:.3f} < "
                                f"{b.min_detection_f1} (worst sample)")
        elif kind == "mask":
            ious = []
            for x, y in zip(gs, rs, strict=True):
                mg, mr = x >= b.mask_threshold, y >= b.mask_threshold
                union = int(np.sum(mg | mr))
                ious.append(1.0 if union == 0 else int(np.sum(mg & mr)) / union)
            iou = min(ious)
            if iou < b.min_mask_iou:
                failures.append(f"mask at >= {b.mask_threshold}: IoU {iou:.3f} < {b.min_mask_iou} (worst sample)")
        worst = worst_cos = None
        collapsed: tuple[int, ...] = ()
        if rs[0].ndim >= 3 and rs[0].shape[1] > 1 and kind != "sequence":
            worst, worst_cos, collapsed, _ = _channels(gs, rs, b.channel_floor)
            if worst_cos is not None and worst_cos < b.min_channel_cosine:
                low = sorted({*([] if worst is None else [worst]), *collapsed})
                failures.append(f"channel {worst} cosine {worst_cos:.4f} < {b.min_channel_cosine} (channels {low})")
            if collapsed:
                failures.append(f"channel(s) {list(collapsed)[:8]} collapsed (norm ratio outside [0.5, 2], or no "
                                f"longer varying with the input)")
        variation = _variation(gs, rs)
        if variation is not None and variation < b.min_variation:
            failures.append(f"collapsed: the output keeps {variation:.1%} of the original's variation across "
                            f"inputs (< {b.min_variation:.0%})")
        if cosine < b.min_cosine:
            failures.append(f"cosine {cosine:.5f} < {b.min_cosine}")
        elif min_sample < b.min_cosine:
            failures.append(f"sample {sample_cos.index(min_sample)} cosine {min_sample:.5f} < {b.min_cosine} "
                            f"(every sample must hold the budget, not only the pool)")
        if top1 is not None and top1 < b.min_top1:
            failures.append(f"top-1 agreement {top1:.1%} < {b.min_top1:.1%}")
        if b.max_abs is not None and max_abs > b.max_abs:
            failures.append(f"max abs error {max_abs:.4g} > {b.max_abs}")
        if b.max_rel is not None and max_rel > b.max_rel:
            failures.append(f"max rel error {max_rel:.4g} > {b.max_rel}")
        if b.mean_rel is not None and mean_rel > b.mean_rel:
            failures.append(f"mean rel error {mean_rel:.4g} > {b.mean_rel}")
        results.append(OutputMetrics(name, cosine, min_sample, max_abs, mean_abs, max_rel, mean_rel, scale, top1,
                                     worst, worst_cos, collapsed, tuple(failures), kind, step, decoded, det_f1, iou,
                                     variation, n))
    return CandidateAccuracy(tuple(results))


def kinds_of(refs: Sequence[Mapping[str, np.ndarray]], given: Mapping[str, str]) -> dict[str, str]:
    """Each output's kind: as given by the user, else inferred from the reference outputs."""
    out = {}
    for name in refs[0]:
        k = given.get(name, "auto")
        out[name] = infer_kind([np.asarray(r[name]) for r in refs]) if k == "auto" else k
    return out
