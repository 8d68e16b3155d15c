"""The docs and the CLI name the same options.

Both directions: every ``--option`` the README or docs/*.md write after ``edgefleet <command>`` exists on that command
(a renamed or removed flag fails here, not in a user's terminal), and every visible option of every command is named
somewhere in the README or docs/ (a new flag gets documented).
"""

from __future__ import annotations

import re
from pathlib import Path

import click
from edgefleet.sdk.cli import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _commands() -> dict[str, set[str]]:
    """Every leaf command's path (``fleet token create``) and its visible long options."""
    out: dict[str, set[str]] = {}
    ctx = click.Context(cli)

    def walk(cmd: click.Command, path: list[str]) -> None:
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                if sub is not None and not sub.hidden:
                    walk(sub, [*path, name])
            return
        opts = {"--help"}
        for p in cmd.params:
            if isinstance(p, click.Option) and not p.hidden:
                opts.update(o for o in p.opts if o.startswith("--"))  # not --no-x: one name documents a flag pair
        out[" ".join(path)] = opts

    walk(cli, [])
    return out


def _doc_text(doc: Path) -> str:
    return re.sub(r"\\\n\s*", " ", doc.read_text(encoding="utf-8"))  # shell line continuations joined


def _uses(commands: dict[str, set[str]]) -> list[tuple[str, str, str]]:
    """(doc, command, option) for each option written after ``edgefleet <command>`` on one line of a doc."""
    found = []
    for doc in DOCS:
        # the command line ends at a comment, a closing code span or bracket, a table cell or the line's end
        for m in re.finditer(r"edgefleet ((?:[a-z][a-z-]*)(?: [a-z][a-z-]*){0,2})([^\n`|#)]*)", _doc_text(doc)):
            words = m.group(1).split()
            path = next((" ".join(words[:k]) for k in range(len(words), 0, -1) if " ".join(words[:k]) in commands),
                        None)
            if path is None:
                continue
            rest = " ".join(words[len(path.split()):]) + m.group(2)
            found += [(doc.name, path, o) for o in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest)]
    return found


def test_docs_name_only_options_the_cli_has() -> None:
    commands = _commands()
    uses = _uses(commands)
    assert len(uses) > 50, "the scan found too few documented command lines: is the pattern still right?"
    wrong = sorted({f"{doc}: edgefleet {cmd} {opt}" for doc, cmd, opt in uses if opt not in commands[cmd]})
    assert not wrong, "the docs name options these commands do not have:\n" + "\n".join(wrong)


def test_every_cli_option_is_documented() -> None:
    text = "\n".join(_doc_text(d) for d in DOCS)
    missing = sorted(f"edgefleet {cmd} {opt}" for cmd, opts in _commands().items() for opt in opts - {"--help"}
                     if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text))
    assert not missing, "options no doc names (README.md or docs/*.md):\n" + "\n".join(missing)
