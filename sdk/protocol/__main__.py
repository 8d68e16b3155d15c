"""``python -m edgefleet.sdk.protocol write [--check]``: regenerate (or check) sdk/schemas/*.json and the generated
sections of docs/mqtt-protocol.md and docs/api.md."""

from __future__ import annotations

import sys

from .schemas import check, write


def main(argv: list[str]) -> int:
    """Entry point; returns the exit code."""
    if argv[:1] != ["write"] or len(argv) > 2 or (len(argv) == 2 and argv[1] != "--check"):
        print("usage: python -m edgefleet.sdk.protocol write [--check]", file=sys.stderr)
        return 2
    if argv[1:] == ["--check"]:
        stale = check()
        for p in stale:
            print(f"stale: {p} (run: python -m edgefleet.sdk.protocol write)", file=sys.stderr)
        return 1 if stale else 0
    for p in write():
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
