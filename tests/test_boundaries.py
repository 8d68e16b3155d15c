"""The arrows of shared/ARCHITECTURE.md, checked on the source: every import statement of every module (also those
inside functions) is resolved and its component compared with what that component may import.

    sdk      imports no other component
    devices  imports sdk only
    packager imports sdk and devices
    agent    imports sdk and devices; never packager or fleet, never onnx, coremltools, torch or the
             quantization tools (devices are small)
    fleet    imports sdk only; never onnx or onnxruntime
    demo     (not a product component) may import anything; no component imports it

tests/test_imports.py checks the other half at run time: importing agent and fleet loads none of the heavy modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = ("sdk", "devices", "packager", "agent", "fleet", "demo")
ALLOWED: dict[str, set[str]] = {
    "sdk": {"sdk"},
    "devices": {"sdk", "devices"},
    "packager": {"sdk", "devices", "packager"},
    "agent": {"sdk", "devices", "agent"},
    "fleet": {"sdk", "fleet"},
    "demo": set(COMPONENTS),
}
FORBIDDEN_THIRD_PARTY: dict[str, tuple[str, ...]] = {
    "agent": ("onnx", "coremltools", "torch", "onnxruntime.quantization", "onnxconverter_common", "onnxscript"),
    "fleet": ("onnx", "onnxruntime", "coremltools", "torch", "onnxconverter_common", "onnxscript"),
}


def _imports(path: Path, component: str, root: Path | None = None) -> list[tuple[int, str]]:
    """Absolute module names imported by ``path`` (relative imports resolved against its package)."""
    rel = path.relative_to((root or ROOT) / component).with_suffix("")
    package = ["edgefleet", component, *rel.parts[:-1]]  # a module's package; an __init__ is its own
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]  # from edgefleet import fleet
    return out


def _sources(component: str) -> list[Path]:
    return sorted((ROOT / component).rglob("*.py"))


@pytest.mark.parametrize("component", COMPONENTS)
def test_component_imports_follow_the_architecture(component: str) -> None:
    files = _sources(component)
    if component != "demo":
        assert files, f"{component}/ has no modules"
    wrong = []
    for path in files:
        for line, mod in _imports(path, component):
            parts = mod.split(".")
            if parts[0] == "edgefleet" and len(parts) > 1 and parts[1] in COMPONENTS:
                if parts[1] not in ALLOWED[component] or (parts[1] == "demo" and component != "demo"):
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
            for bad in FORBIDDEN_THIRD_PARTY.get(component, ()):
                if mod == bad or mod.startswith(bad + "."):
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
    assert wrong == [], "\n".join(wrong)


def test_the_checker_sees_relative_and_nested_imports(tmp_path: Path) -> None:
    """The walk finds ``from ..fleet import x`` and imports inside functions (so a pass above means something)."""
    (tmp_path / "agent" / "sub").mkdir(parents=True)
    probe = tmp_path / "agent" / "sub" / "probe.py"
    probe.write_text("def f():\n    from ...fleet import store\n    import onnx\n")
    mods = {m for _, m in _imports(probe, "agent", tmp_path)}
    assert "edgefleet.fleet" in mods and "edgefleet.fleet.store" in mods and "onnx" in mods
