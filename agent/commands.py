"""Commands from the controller: deploy, rollback, remove, benchmark, describe, configure.

Each command is journaled by id before it is acknowledged to the broker, executed once on a single worker thread (so
installs never overlap), and answered by exactly one reply stored in the outbox in the same transaction that marks it
done. A command id seen before is neither executed nor answered again. Errors are translated here, once: the reply
carries the error's stable ``code``, the ``step`` that failed and a message a person can act on.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from edgefleet.sdk import protocol
from edgefleet.sdk.errors import (
    CommandError,
    CommandReplayError,
    CommandSignatureError,
    EdgefleetError,
    ProtocolError,
)
from edgefleet.sdk.protocol import (
    BenchmarkArgs,
    Command,
    DeployArgs,
    Description,
    RemoveArgs,
    Reply,
    RollbackArgs,
)

from .failpoints import failpoint
from .installer import Installer, InstallError
from .journal import MAX_REFUSED_PAYLOAD, Journal, JournalEntry
from .registry import Registry
from .spool import Spool
from .storage import StorageFullError

if TYPE_CHECKING:
    from edgefleet.sdk.keys import TrustedKeys

__all__ = ["MAX_ATTEMPTS", "CommandFailed", "Dispatcher"]

log = logging.getLogger("edgefleet.agent.commands")
MAX_ATTEMPTS = 3  # executions of one command interrupted by the agent dying, before it is answered with an error


class CommandFailed(EdgefleetError):
    """A command that cannot be carried out as asked; ``step`` says where."""

    def __init__(self, code: str, step: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.step = step


def _props_of(message: Any) -> dict[str, Any]:
    props: dict[str, Any] = {}
    p = getattr(message, "properties", None)
    corr = getattr(p, "CorrelationData", None) if p is not None else None
    if corr:
        props["correlation"] = bytes(corr).hex()
    rt = getattr(p, "ResponseTopic", None) if p is not None else None
    if isinstance(rt, str) and rt and not any(ch in rt for ch in "+#") and len(rt) <= 256:
        props["response_topic"] = rt
    return props


class Dispatcher:
    """Receives, journals, executes and answers commands."""

    def __init__(self, device: str, journal: Journal, spool: Spool, installer: Installer, registry: Registry, *,
                 reply_topic: str, wake_sender: Callable[[], None], describe: Callable[[], Description],
                 configure: Callable[[Mapping[str, Any]], dict[str, Any]],
                 event: Callable[..., None], changed: Callable[[], None],
                 trusted: TrustedKeys | None = None, require_signed: bool = True, fleet: str | None = None,
                 require_bound: bool = True) -> None:
        self.device = device
        self.fleet = fleet
        self.trusted = trusted
        self.require_signed = require_signed
        self.require_bound = require_bound
        if require_signed and (trusted is None or not len(trusted)):
            raise ValueError("require_signed needs trusted keys to verify commands against")
        self.journal = journal
        self.spool = spool
        self.installer = installer
        self.registry = registry
        self.reply_topic = reply_topic
        self.wake_sender = wake_sender
        self.describe = describe
        self.configure = configure
        self.event = event
        self.changed = changed
        self._queue: queue.Queue[JournalEntry | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="commands", daemon=True)

    # -- receiving (MQTT network thread) ------------------------------------------------------------------------------

    def receive(self, message: Any) -> None:
        """Validate, journal and queue one ``cmd`` message.

        Never raises because of what the message holds — malformed, oversized, nested past any parser, unsigned,
        expired, replayed, for another device or fleet: such a command is refused at once, with an error reply when
        it carries a usable id and a ``command.refused`` event, so the caller acknowledges it and junk can never
        occupy the broker's in-flight window (issue 18). Raises only when the journal cannot be written at all: then
        it stays unacknowledged and the broker delivers it again.
        """
        payload = bytes(message.payload)
        props = _props_of(message)
        try:
            cmd = Command.from_json(payload)
        except Exception as exc:  # noqa: BLE001 - whatever a hostile payload provokes is a refusal, never a crash
            err = exc if isinstance(exc, EdgefleetError) else ProtocolError(f"cmd: unreadable: {type(exc).__name__}")
            self._refuse(_salvage_id(payload), "invalid", payload, props, err, "parse")
            return
        first: EdgefleetError | None = self._authenticate(cmd, payload) or self.journal.check_room()
        for attempt in (0, 1):  # a full disk fails the first attempt and releases the ballast (agent/storage.py)
            refusal = first
            try:
                with self.spool.db.tx(hold=False) as c:
                    # A refused command keeps no payload in the journal (issue 18: junk was journaled whole).
                    kept = payload if refusal is None else payload[:MAX_REFUSED_PAYLOAD]
                    if not self.journal.receive(cmd.id, cmd.kind, kept, props, c):
                        log.info("duplicate command ignored", extra={"id": cmd.id, "kind": cmd.kind})
                        return
                    if refusal is None:
                        refusal = self._check_replay(cmd, c)
                    if refusal is not None:
                        # Answered, never executed: the reply and the "done" mark commit with the journal entry.
                        self._store_reply(c, cmd.id, props, None, CommandFailed(refusal.code, "receive",
                                                                                   str(refusal)))
                break
            except StorageFullError as exc:
                if attempt == 0:
                    continue
                # Not even the journal entry fits on the disk: answer at once (the outbox holds the reply in memory
                # if it must); a redelivery of this id is answered again.
                self._reply_from_memory(cmd.id, props, refusal or exc)
                return
        if refusal is not None:
            log.warning("command refused", extra={"id": cmd.id, "kind": cmd.kind, "code": refusal.code,
                                                  "error": str(refusal)})
            self.event("command.refused", f"{cmd.kind} command refused: {refusal}", level="warning",
                       data={"command": cmd.id, "code": refusal.code})
            self.wake_sender()
            return
        failpoint("journal:received")
        self._queue.put(JournalEntry(cmd.id, cmd.kind, payload, props, "pending"))

    def _check_replay(self, cmd: Command, c: Any) -> CommandError | None:
        """Counter above the last accepted one and a nonce not seen before; both stored when accepted, in the
        journal entry's transaction, so a restart never forgets them (a captured older command stays refused)."""
        if cmd.counter is not None:
            last = self.journal.last_counter(c)
            if cmd.counter <= last:
                return CommandReplayError(f"command {cmd.id!r}: counter {cmd.counter} is not above the last "
                                          f"accepted {last}: a replayed or reordered command")
        if cmd.nonce is not None and cmd.signature is not None:
            if self.journal.nonce_seen(cmd.nonce, c):
                return CommandReplayError(f"command {cmd.id!r}: nonce {cmd.nonce} was accepted before: a replayed "
                                          "command")
            self.journal.accept_nonce(cmd.nonce, cmd.expires if cmd.expires is not None else time.time() + 86400, c)
        if cmd.counter is not None:
            self.journal.accept_counter(cmd.counter, c)
        return None

    def _refuse(self, cmd_id: str | None, kind: str, payload: bytes, props: dict[str, Any], error: EdgefleetError,
                step: str) -> None:
        """Answer a command that will never run: journaled (at most MAX_REFUSED_PAYLOAD bytes of it, none once
        answered) with its error reply in one transaction, plus a ``command.refused`` event. Without a usable id
        there is nothing to answer: only the event and the log."""
        why = str(error).splitlines()[0][:500] if str(error) else type(error).__name__
        code = getattr(error, "code", "protocol")
        log.warning("command refused", extra={"id": cmd_id, "code": code, "bytes": len(payload), "error": why})
        data: dict[str, Any] = {"code": code, "bytes": len(payload)}
        if cmd_id is not None:
            data["command"] = cmd_id
            for attempt in (0, 1):
                try:
                    with self.spool.db.tx(hold=False) as c:
                        if not self.journal.receive(cmd_id, kind, payload[:MAX_REFUSED_PAYLOAD], props, c):
                            return  # this id was seen before (a redelivery): answered then, or it ran
                        self._store_reply(c, cmd_id, props, None, CommandFailed(code, step, why))
                    break
                except StorageFullError:
                    if attempt == 1:
                        self._reply_from_memory(cmd_id, props, CommandFailed(code, step, why))
                        return
        self.event("command.refused", f"command refused at {step}: {why}", level="warning", data=data)
        self.wake_sender()

    def _reply_from_memory(self, cmd_id: str, props: Mapping[str, Any], why: EdgefleetError) -> None:
        self.spool.add("reply", self.reply_topic,
                       Reply.failed(cmd_id, self.device, why.code, str(why), "receive").to_json(),
                       {"correlation": props["correlation"]} if props.get("correlation") else {}, ref=cmd_id)
        self.wake_sender()

    def _authenticate(self, cmd: Command, payload: bytes) -> CommandError | None:
        """Signature (required unless relaxed for development), expiry and target (this device and fleet); None
        when the command may run."""
        try:
            if cmd.signature is not None or self.require_signed:
                if self.trusted is None or not len(self.trusted):
                    raise CommandSignatureError(f"command {cmd.id!r} is signed but no keys are trusted")
                # Over the bytes received: a field this agent's model does not know is covered all the same.
                protocol.verify_command(cmd, self.trusted, payload=payload, device=self.device, fleet=self.fleet,
                                        require_bound=self.require_bound)
            else:
                protocol.check_expiry(cmd)
                protocol.check_target(cmd, self.device, self.fleet, require_bound=False)
        except CommandError as exc:
            return exc
        return None

    # -- executing (worker thread) ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Queue commands left pending by a previous run (it died while executing them), then start the worker.

        Call before the MQTT link starts: a pending command received again from the broker after this point is a
        duplicate id and is ignored by :meth:`receive`.
        """
        for entry in self.journal.pending():
            log.info("resuming a command interrupted by a restart", extra={"id": entry.id, "kind": entry.kind})
            self._queue.put(entry)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the current command (up to ``timeout``); queued ones stay pending in the journal for next time."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)
        self._thread.join(timeout)

    def _work(self) -> None:
        while True:
            entry = self._queue.get()
            if entry is None:
                return
            try:
                self._execute(entry)
            except Exception:
                log.exception("command worker error", extra={"id": entry.id})

    def _execute(self, entry: JournalEntry) -> None:
        if self.journal.state(entry.id) != "pending":
            return  # already answered (defence in depth: each id is queued once)
        t0 = time.perf_counter()
        try:
            attempts = self.journal.start(entry.id)
        except StorageFullError as exc:  # not even the attempt count fits: answer instead of running it
            self._reply(entry.id, entry.props, None, CommandFailed(exc.code, entry.kind, str(exc)))
            return
        failpoint("journal:started")
        try:
            if attempts > MAX_ATTEMPTS:
                # The agent died every time it ran this command (e.g. a model that crashes ONNX Runtime): answer
                # instead of crash-looping; the old bundle is still what serves.
                raise CommandFailed("crashloop", entry.kind, f"the agent stopped {attempts - 1} times while running "
                                                             "this command; not trying again")
            cmd = Command.from_json(entry.payload)
            try:
                protocol.check_expiry(cmd)  # e.g. resumed after a restart long after it was received
            except CommandError as exc:
                raise CommandFailed(exc.code, "receive", str(exc)) from None
            result = self._run(cmd, entry.id)
            error: EdgefleetError | None = None
        except InstallError as exc:
            result, error = None, CommandFailed(exc.code, exc.step, str(exc.cause))
        except CommandFailed as exc:
            result, error = None, exc
        except EdgefleetError as exc:
            result, error = None, CommandFailed(exc.code, entry.kind, str(exc))
        except Exception as exc:
            log.exception("command raised", extra={"id": entry.id})
            result, error = None, CommandFailed("edgefleet", entry.kind, f"{type(exc).__name__}: {exc}")
        level = "info" if error is None else "error"
        step = getattr(error, "step", "")
        ms = round((time.perf_counter() - t0) * 1e3, 1)
        log.log(logging.INFO if error is None else logging.ERROR, "command done",
                extra={"id": entry.id, "kind": entry.kind, "ok": error is None, "ms": ms,
                       **({"error": str(error), "step": step} if error else {})})
        if entry.kind in ("deploy", "rollback", "remove"):
            data = dict(result or {}) if error is None else {"step": step, "code": error.code}
            msg = f"{entry.kind} ok" if error is None else f"{entry.kind} failed at {step}: {error}"
            self.event(entry.kind, msg, level=level, data={"command": entry.id, **data})
            if error is None:
                self.changed()
        self._reply(entry.id, entry.props, result, error)

    def _run(self, cmd: Command, cmd_id: str) -> dict[str, Any]:
        kind = cmd.kind
        if kind == "deploy":
            args = cmd.args_as(DeployArgs)

            def progress(state: str) -> None:
                self.event("deploy.progress", f"deploy {state}", data={"command": cmd_id, "state": state})

            return self.installer.install(args.url, args.sha256, args.size, progress, split_pct=args.split_pct,
                                          split_s=args.split_s).to_dict()
        if kind == "rollback":
            name = self._model_name(cmd.args_as(RollbackArgs).name, "rollback")
            # Which bundle this command rolls back to is fixed at its first attempt: resumed after a crash that
            # came after the pointer swap, it must not swap again (and serve the bundle it rolled back from).
            key = f"rollback.{cmd_id}"
            target = self.journal.db.get_meta(key)
            if target is None:
                ptr = self.installer.store.pointers().get(name)
                if ptr is not None and ptr.previous is not None:
                    target = ptr.previous
                    self.journal.db.set_meta(key, target)
            return self.installer.rollback(name, target=target).to_dict()
        if kind == "remove":
            name = cmd.args_as(RemoveArgs).name
            return {"name": name, "removed": self.installer.remove(name)}
        if kind == "benchmark":
            bench = cmd.args_as(BenchmarkArgs)
            name = self._model_name(bench.name, "benchmark")
            model = self.registry.get(name)
            if model is None:
                raise CommandFailed("not_found", "benchmark", f"no model named {name!r} is serving")
            res = model.benchmark(bench.runs)
            return {"name": name, "version": model.version, "providers": list(model.placement.serving),
                    **res.to_dict()}
        if kind == "describe":
            return self.describe().to_dict()
        if kind == "configure":
            return self.configure(cmd.args)
        raise CommandFailed("protocol", "parse", f"unknown command kind {kind!r}")

    def _model_name(self, name: str | None, step: str) -> str:
        if name:
            return name
        names = [n for n, _ in self.registry.items()]
        if len(names) == 1:
            return names[0]
        raise CommandFailed("protocol", step, f"args.name is required when {len(names)} models are installed "
                                              f"({', '.join(names) or 'none'})")

    # -- replying -----------------------------------------------------------------------------------------------------

    def _reply(self, cmd_id: str, props: Mapping[str, Any], result: Mapping[str, Any] | None,
               error: EdgefleetError | None) -> None:
        # The reply and the "done" mark commit together: after a crash a command is either still pending (and runs
        # again) or answered, never answered twice and never silently dropped.
        # Tried twice: a full disk releases the ballast on the first failure (agent/storage.py). If the second fails
        # too, the outbox holds the reply in memory and sends it; the command stays pending in the journal.
        try:
            self.spool.db.write(lambda c: self._store_reply(c, cmd_id, props, result, error))
        except StorageFullError as exc:
            log.error("disk full: reply sent from memory, command left pending", extra={"id": cmd_id,
                                                                                      "error": str(exc)})
        failpoint("journal:replied")
        self.wake_sender()

    def _store_reply(self, c: Any, cmd_id: str, props: Mapping[str, Any], result: Mapping[str, Any] | None,
                     error: EdgefleetError | None) -> None:
        if error is None:
            try:
                msg = Reply.ok(cmd_id, self.device, result or {})
            except ProtocolError as exc:
                # The command ran, but its result cannot be carried (say a NaN): still exactly one reply.
                msg = Reply.failed(cmd_id, self.device, exc.code, f"the result is not representable: {exc}",
                                   "reply")
        else:
            msg = Reply.failed(cmd_id, self.device, error.code, str(error), getattr(error, "step", ""))
        payload = msg.to_json()
        out_props = {"correlation": props["correlation"]} if props.get("correlation") else {}
        self.spool.add("reply", self.reply_topic, payload, out_props, c, ref=cmd_id)
        rt = props.get("response_topic")
        if rt and rt != self.reply_topic:
            self.spool.add("reply", rt, payload, out_props, c)
        self.journal.finish(cmd_id, c)
        c.execute("DELETE FROM meta WHERE key=?", (f"rollback.{cmd_id}",))


# The command id of a payload that does not parse, for its refusal reply: a top-level "id" before any nested value
# (where edgefleet's encoder puts it), read with a bounded regex over the first bytes only — no JSON parser, so no
# nesting depth or size can make salvaging fail (issue 18: a deeply nested command was never acknowledged).
_ID_AT_TOP = re.compile(rb'^\s*\{[^{}\[\]]*?"id"\s*:\s*"([A-Za-z0-9_.-]{1,64})"')


def _salvage_id(payload: bytes) -> str | None:
    m = _ID_AT_TOP.match(payload[:2048])
    return m.group(1).decode("ascii") if m else None
