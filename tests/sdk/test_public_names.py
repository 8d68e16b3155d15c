"""Every public name the sdk and devices packages list resolves (the sdk's names load lazily)."""

from __future__ import annotations

import importlib

import pytest

MODULES = ["edgefleet.sdk", "edgefleet.sdk.bundle", "edgefleet.sdk.errors", "edgefleet.sdk.keys",
           "edgefleet.sdk.protocol", "edgefleet.sdk.runtime", "edgefleet.sdk.sketch", "edgefleet.sdk.validation",
           "edgefleet.sdk.testing", "edgefleet.sdk.cli", "edgefleet.devices", "edgefleet.devices.profile",
           "edgefleet.devices.detect", "edgefleet.devices.cli"]


@pytest.mark.parametrize("module", MODULES)
def test_every_name_in_all_resolves_and_has_a_docstring(module: str) -> None:
    mod = importlib.import_module(module)
    assert mod.__doc__, f"{module} has no module docstring"
    for name in mod.__all__:
        obj = getattr(mod, name)
        if callable(obj) and not isinstance(obj, type(importlib)):
            assert getattr(obj, "__doc__", None), f"{module}.{name} has no docstring"


def test_sdk_unknown_attribute_is_attribute_error() -> None:
    import edgefleet.sdk

    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        _ = edgefleet.sdk.Nope


def test_error_codes_are_unique_and_every_error_derives_from_the_root() -> None:
    from edgefleet.sdk import errors

    classes = [getattr(errors, n) for n in errors.__all__]
    assert all(issubclass(c, errors.EdgefleetError) for c in classes)
    codes = [c.code for c in classes]
    assert len(codes) == len(set(codes)), codes
    for c in classes:  # a child's code extends its parent's ("bundle.format" under "bundle")
        parent = c.__mro__[1]
        if parent is not errors.EdgefleetError and issubclass(parent, errors.EdgefleetError):
            assert c.code.startswith(parent.code + "."), (c, parent)
