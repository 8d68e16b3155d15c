"""Commands to devices, sent until they are answered or expire — every kind, not only deploy.

The broker queues a QoS 1 command for an offline device in its persistent session, but a broker that loses its
state (killed before its next autosave, a replaced node, a lost disk; Mosquitto 2.0.11 also forgets a session that
began with clean start) loses the command with it. So every command a controller sends is tracked in the store with
its expiry (:meth:`Store.add_command`), and one whose device came back online (a status received after the command
last went out, more than ``grace_s`` ago) without replying is sent again: same id, signed again (new counter and
nonce, same expiry). The agent runs an id once, so a copy it already had is ignored; a reply, or the expiry, ends
it. With several controllers sharing a store, :meth:`Store.claim_resend` lets exactly one of them send each copy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from edgefleet.sdk.protocol import Command, command

from .store import Store

__all__ = ["RESEND_GRACE_S", "Commander"]

log = logging.getLogger(__name__)

RESEND_GRACE_S = 5.0
"""A device that connected again this long ago and has not answered did not get the command: send it again."""


class Commander:
    """Sends commands (signed by ``publish`` when the controller has the fleet key) and resends the lost ones."""

    def __init__(self, store: Store, fleet: str, publish: Callable[[str, Command], None], *, ttl_s: float,
                 grace_s: float = RESEND_GRACE_S) -> None:
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.store = store
        self.fleet = fleet
        self.publish = publish
        self.ttl_s = ttl_s
        self.grace_s = grace_s
        self.sent = 0
        self.resent = 0

    def new(self, kind: str, args: Mapping[str, Any] | None = None, *, cmd_id: str | None = None) -> Command:
        """A new command of ``kind`` that expires after this controller's command TTL."""
        return command(kind, args, cmd_id=cmd_id, ttl_s=self.ttl_s)

    def send(self, device: str, cmd: Command) -> Command:
        """Track ``cmd`` for ``device`` (given an expiry if it has none), then publish it. Returns what is tracked."""
        if cmd.expires is None:
            cmd = Command.from_dict({**cmd.to_dict(), "expires": cmd.ts + self.ttl_s})
        # Tracked before it is published, so a fast reply always finds it.
        self.store.add_command(self.fleet, device, cmd, time.time())
        self.publish(device, cmd)
        self.sent += 1
        return cmd

    def resend_due(self) -> int:
        """Send again every command whose device came back without answering it; returns how many."""
        now = time.time()
        n = 0
        for tc in self.store.commands_due(self.fleet, now, self.grace_s):
            if not self.store.claim_resend(tc.command.id, tc.sent, now):
                continue  # another controller of the group sent it a moment ago
            log.warning("%s reconnected without answering %s command %s (sent %d times); sending it again",
                        tc.device, tc.command.kind, tc.command.id, tc.sends)
            try:
                self.publish(tc.device, tc.command)
            except Exception:  # the next reconnect tries again; other commands must still go
                log.exception("resending command %s to %s failed", tc.command.id, tc.device)
                continue
            n += 1
        self.resent += n
        return n
