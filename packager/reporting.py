"""Reporting: the text forms of budgets and session configs, and the human summary the CLI prints per bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgefleet.sdk.bundle import SessionConfig

from .accuracy import Budget

__all__ = ["budget_text", "human_lines", "session_dict", "unmeasured_line"]


def session_dict(s: SessionConfig) -> dict[str, Any]:
    """JSON form of a session config."""
    return {"graph_optimization_level": s.graph_optimization_level, "intra_op_num_threads": s.intra_op_num_threads,
            "inter_op_num_threads": s.inter_op_num_threads, "execution_mode": s.execution_mode,
            "config_entries": dict(s.config_entries)}


def budget_text(b: Budget) -> str:
    """The budget in one line, for error messages."""
    parts = [f"cosine >= {b.min_cosine} per sample", f"top1 >= {b.min_top1:.0%}",
             f"channel cosine >= {b.min_channel_cosine}", f"step agreement >= {b.min_step_agreement:.0%}",
             f"detection F1 >= {b.min_detection_f1}"]
    for k in ("max_abs", "max_rel", "mean_rel"):
        if getattr(b, k) is not None:
            parts.append(f"{k} <= {getattr(b, k)}")
    return ", ".join(parts)


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def unmeasured_line(report: dict[str, Any]) -> str | None:
    """The one line the CLI prints when a target could not be measured on its own runtime."""
    if report.get("measurement") != "unmeasured":
        return None
    return (f"{report['target']}: UNMEASURED: {report['runtime']['why']}; shipped the conservative "
            f"{report['chosen']['precision']} ({report['chosen']['name']})")


def human_lines(report: dict[str, Any], path: Path) -> list[str]:
    """What the CLI prints for one bundle: the choice, why, every candidate in one line, the notes."""
    chosen = report["chosen"]
    sizes = report["sizes"]
    lines = [f"{report['target']}: {path.name}  precision={chosen['precision']} ({chosen['name']})  "
             f"model {_size(sizes['original'])} -> {_size(sizes['bundle_model'])}  "
             f"[{report['measurement']}; {report.get('target_seconds', report['packaging_seconds']):.0f} s]",
             f"  why: {chosen['why']}",
             f"  runtime: {report['runtime']['why']}",
             f"  offline optimization: {report['offline_optimization']['level']} "
             f"({report['offline_optimization']['reason']})"]
    for c in report["candidates"]:
        if c["error"]:
            lines.append(f"  - {c['name']}: failed: {c['error']}")
            continue
        speed = f"{c['speed']['speedup']:.2f}x" if c.get("speed") else "not timed"
        acc = c["accuracy"]
        if acc is None:
            lines.append(f"  - {c['name']}: accuracy unverified ({c['accuracy_on']}), {speed}")
            continue
        worst = min(acc["outputs"], key=lambda o: o["min_sample_cosine"] if isinstance(o["min_sample_cosine"], float)
                    else 0.0)
        state = "ok" if c["within_budget"] else "over budget: " + "; ".join(acc["failures"])
        top1 = f", top1 {worst['top1']:.1%}" if worst.get("top1") is not None else ""
        lines.append(f"  - {c['name']}: {state}; worst sample cosine {worst['min_sample_cosine']} ({worst['name']})"
                     f"{top1}, {speed}")
    names = (report.get("variants") or {}).get("names") or []
    if len(names) > 1:
        lines.append(f"  variants: {', '.join(names)} (the device pins the fastest that passes its self-test)")
    for n in [*report["notes"], *report["not_measured"], *report["data"]["notes"]]:
        lines.append(f"  note: {n}")
    return lines
