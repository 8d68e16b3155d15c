"""Choosing a multi-variant bundle's variant on the device: self-test each, time the passing ones, pin the fastest.

The packager cannot measure every device (no Mac, no Jetson, a build host whose CPU differs from the device's), so a
bundle may carry several verified variants (docs/bundle-format.md, "Variants"). At install the agent opens every
variant on this device's ONNX Runtime, runs its self-test (a variant that fails is never pinned, whatever its
speed), times the passing ones against each other in interleaved rounds (``sdk.timing``, the packager's method)
within ``install.variant_budget_s``, and pins the one with the lowest median per-round time ratio when it is faster
than the first passing variant (the packager's own pick) with 95% confidence, else that first one (the data cannot
decide: the safe branch). The whole table
goes into the install event and the reply; the choice is written next to the bundle's provider caches
(``cache/<digest>/variant.json``, atomically) with the environment it was made in (ONNX Runtime version and
flavour, providers offered, profile, CPU model and architecture): at start it is reused when that environment is
unchanged, and made again when it changed (a new ORT, a driver that adds a provider, another detected profile).
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.sdk.errors import EdgefleetError, SelfTestError

if TYPE_CHECKING:
    from edgefleet.sdk.keys import TrustedKeys
    from edgefleet.sdk.runtime import Model

    from .store import Store

__all__ = ["CHOICE_FILE", "VariantChoice", "VariantChooser", "environment"]

log = logging.getLogger("edgefleet.agent.variants")
CHOICE_FILE = "variant.json"


def environment(profile: str, host: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a variant choice depends on: when any of it changes, the choice is made again."""
    from edgefleet.sdk.runtime import ort_info

    info = ort_info()
    host = host or {}
    return {"ort": info.version, "flavour": info.flavour, "providers": list(info.providers), "profile": profile,
            "cpu": host.get("cpu_model") or platform.processor() or "", "arch": host.get("arch") or platform.machine()}


@dataclass
class VariantChoice:
    """The pinned variant and the table it was chosen from (one row per variant, in the bundle's order)."""

    variant: str
    table: list[dict[str, Any]]
    env: dict[str, Any]
    seconds: float = 0.0
    why: str = ""
    reused: bool = False
    timing: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (persisted, and in the install reply and event)."""
        return {"variant": self.variant, "table": self.table, "env": self.env, "seconds": round(self.seconds, 3),
                "why": self.why, "reused": self.reused, "timing": self.timing}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VariantChoice:
        """Parse the persisted form (a file this agent wrote; a damaged one is a ValueError)."""
        if not isinstance(d.get("variant"), str) or not isinstance(d.get("table"), list) \
                or not isinstance(d.get("env"), dict):
            raise ValueError("not a variant choice")
        return cls(d["variant"], list(d["table"]), dict(d["env"]), float(d.get("seconds", 0.0)),
                   str(d.get("why", "")), False, dict(d.get("timing") or {}))


class VariantChooser:
    """Self-tests, times and pins variants of installed bundles; persists each choice with its environment."""

    def __init__(self, store: Store, trusted: TrustedKeys, env: Mapping[str, Any], *, budget_s: float = 20.0,
                 allow_fallback: bool = False) -> None:
        if not budget_s > 0:
            raise ValueError(f"install.variant_budget_s must be > 0, got {budget_s!r}")
        self.store = store
        self.trusted = trusted
        self.env = dict(env)
        self.budget_s = budget_s
        self.allow_fallback = allow_fallback

    def _path(self, digest: str) -> Path:
        return self.store.cache_dir(digest) / CHOICE_FILE

    def persisted(self, digest: str) -> VariantChoice | None:
        """The choice made for this bundle in this environment before, or None (none made, or the environment
        changed since: ORT, providers, profile or CPU)."""
        try:
            choice = VariantChoice.from_dict(json.loads(self._path(digest).read_text()))
        except (OSError, ValueError, TypeError):
            return None
        if choice.env != self.env:
            log.info("variant choice made again: the environment changed",
                     extra={"digest": digest, "was": choice.env, "now": self.env})
            return None
        choice.reused = True
        return choice

    def open_variant(self, digest: str, variant: str, *, verify_files: bool = True) -> Model:
        """A session on one variant, its provider cache in the bundle's cache dir (one folder per variant)."""
        from edgefleet.sdk.runtime import Model

        return Model.open(self.store.path(digest), self.trusted, verify_files=verify_files,
                          allow_fallback=self.allow_fallback, cache_dir=self.store.cache_dir(digest) / variant,
                          variant=variant)

    def choose(self, digest: str, *, verify_files: bool = True,
               progress: Callable[[str], None] | None = None) -> tuple[Model, VariantChoice]:
        """Self-test every variant, time the passing ones, pin the fastest; SelfTestError when none passes."""
        from edgefleet.sdk.bundle import read_installed
        from edgefleet.sdk.timing import TimingPolicy, interleaved_rounds

        say = progress or (lambda s: None)
        t0 = time.perf_counter()
        manifest = read_installed(self.store.path(digest), self.trusted, verify_files=verify_files).manifest
        rows: dict[str, dict[str, Any]] = {}
        passed: dict[str, Model] = {}
        for v in manifest.variants:
            row: dict[str, Any] = {"variant": v.name, "precision": v.precision,
                                   "requested": [p.name for p in v.providers], "passed": False}
            rows[v.name] = row
            say(f"self-test {v.name}")
            try:
                m = self.open_variant(digest, v.name, verify_files=False)
                m.warmup(1)
                row["providers"] = list(m.placement.serving)
                row["session_ms"] = round(m.session_ms, 3)
                report = m.self_test()
            except EdgefleetError as exc:
                row["error"] = f"{exc.code}: {str(exc)[:300]}"
                continue
            except Exception as exc:  # noqa: BLE001 - a variant ORT cannot run is a failed variant, not a crash
                row["error"] = f"model: {type(exc).__name__}: {str(exc)[:300]}"
                continue
            row["passed"] = report.ok
            if not report.ok:
                row["error"] = "selftest: " + "; ".join(report.to_dict()["failures"])[:300]
                continue
            passed[v.name] = m
        if not passed:
            raise SelfTestError("no variant passed its self-test on this device: " + "; ".join(
                f"{n}: {r.get('error', '?')}" for n, r in rows.items()))
        names = list(passed)
        reference = names[0]
        timing: dict[str, Any] = {}
        if len(names) == 1:
            winner = reference
            why = "the only variant that passed its self-test here"
        else:
            say(f"timing {len(names)} variants")
            runners = {}
            for n, m in passed.items():
                feed = m.example_inputs()
                outs = [o.name for o in m.manifest.outputs]
                runners[n] = (lambda s=m.session, o=outs, f=feed: s.run(o, f))
            policy = TimingPolicy(min_rounds=5, max_rounds=61, budget_s=self.budget_s, target_halfwidth=0.02,
                                  min_call_s=0.02)
            res = interleaved_rounds(runners, reference, policy)
            for n, e in res.estimates.items():
                rows[n].update({"p50_ms": round(e.median_ms, 4), "ratio": round(e.ratio, 4),
                                "ci": [round(e.low, 4), round(e.high, 4)]})
            fastest = min(names, key=lambda n: (res.estimates[n].ratio, names.index(n)))
            cmp = res.compare(fastest, reference)
            rounds = res.estimates[fastest].rounds
            if fastest == reference or cmp.faster():
                winner = fastest
                why = (f"fastest of {len(names)} passing variants over {rounds} interleaved rounds ({res.stopped})"
                       + ("" if fastest == reference else
                          f": {res.estimates[fastest].ratio:.3f}x the time of {reference} "
                          f"[{cmp.low:.3f}-{cmp.high:.3f}], faster with 95% confidence"))
            else:
                # the data cannot decide: the safe branch is the first passing variant (the packager's own pick)
                winner = reference
                why = (f"{fastest} measured {res.estimates[fastest].ratio:.3f}x the time of {reference} "
                       f"[{cmp.low:.3f}-{cmp.high:.3f}] over {rounds} interleaved rounds ({res.stopped}), not faster "
                       f"with 95% confidence: {reference}, the first that passed, stays")
            timing = {"rounds": res.estimates[winner].rounds, "seconds": round(res.seconds, 3),
                      "stopped": res.stopped, "reference": reference, "budget_s": self.budget_s}
        for n, row in rows.items():
            row["pinned"] = n == winner
        model = passed.pop(winner)
        passed.clear()  # the losers' sessions go now, not at the next collection
        choice = VariantChoice(winner, list(rows.values()), dict(self.env), time.perf_counter() - t0, why,
                               timing=timing)
        return model, choice

    def save(self, digest: str, choice: VariantChoice) -> None:
        """Persist the choice (atomically) next to the bundle's provider caches."""
        from edgefleet.sdk._fs import atomic_write_text

        path = self._path(digest)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(choice.to_dict(), sort_keys=True))
        except OSError as exc:  # e.g. a full disk: the choice stands for now and is made again at the next start
            log.warning("variant choice not persisted", extra={"digest": digest, "error": str(exc)})

    def open(self, digest: str, *, verify_files: bool = True) -> tuple[Model, VariantChoice]:
        """The bundle's pinned variant: the persisted choice when the environment is unchanged, else chosen again
        (and persisted)."""
        choice = self.persisted(digest)
        if choice is not None:
            try:
                return self.open_variant(digest, choice.variant, verify_files=verify_files), choice
            except EdgefleetError as exc:
                log.warning("pinned variant does not open; choosing again",
                            extra={"digest": digest, "variant": choice.variant, "error": str(exc)})
        model, choice = self.choose(digest, verify_files=verify_files)
        self.save(digest, choice)
        return model, choice
