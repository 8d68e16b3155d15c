"""Paths a bundle's manifest hands to ONNX Runtime must stay inside what the bundle owns on the device.

The model file is checked for file references by :mod:`edgefleet.sdk._onnx_external`. The signed manifest passes
strings to ONNX Runtime too — provider options and session config entries — and some of them are paths ORT or an
execution provider reads, writes or loads code from: ``ep.context_file_path`` with ``ep.context_enable`` writes a
model file wherever it points, TensorRT's ``trt_extra_plugin_lib_paths`` loads shared libraries, OpenVINO's
``load_config`` reads a file, ``trt_dump_subgraphs`` writes into the working directory. The built-in profiles only
ever use ``{cache_dir}/...`` (the bundle's own cache directory on the device). So:

* a provider option value that looks like a path (``/``, ``\\``, a leading ``~`` or ``.``) must be ``{cache_dir}`` or
  start with ``{cache_dir}/``, with no ``..`` segment;
* options that load code (a key naming a plugin, a library or a backend path) or dump files, and OpenVINO's
  ``context`` pointer, are refused; OpenVINO's ``load_config`` must be a JSON object (onnxruntime-openvino 1.24 takes
  a JSON string, older builds a file path — what the packager writes is the JSON), whose string values obey the path
  rule above;
* session config entries that name files or formats to load or save (``ep.context_*``, ``session.*_file*``,
  ``*folder*``, ``*path*``, ``*dump*``, ``session.load_model_format`` / ``save_model_format``,
  ``session.debug_layout_transformation``) are refused.

A refusal is :class:`~edgefleet.sdk.errors.UnsafeArchiveError` (``bundle.unsafe``) naming the key.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from .errors import UnsafeArchiveError

__all__ = ["check_ort_options"]

_CACHE = "{cache_dir}"
_CODE_WORDS = ("plugin", "lib", "backend_path", "dump")
_OPTION_DENY = {"context"}  # OpenVINO: a raw OpenCL context pointer
_ENTRY_DENY = {"session.load_model_format", "session.save_model_format", "session.debug_layout_transformation"}
_ENTRY_WORDS = ("file", "path", "folder", "dump", "ep.context")


def _looks_like_path(value: str) -> bool:
    return "/" in value or "\\" in value or value.startswith(("~", "."))


def _path_ok(value: str) -> bool:
    """A value that is no path at all, or ``{cache_dir}`` / ``{cache_dir}/...`` without ``..``."""
    if _CACHE not in value and not _looks_like_path(value):
        return True
    if not value.startswith(_CACHE):
        return False
    rest = value[len(_CACHE):]
    return (not rest or rest.startswith("/")) and ".." not in rest.split("/") and "\\" not in rest \
        and "\x00" not in value and _CACHE not in rest


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def check_ort_options(providers: Iterable[tuple[str, Mapping[str, str]]], config_entries: Mapping[str, str],
                      what: str = "manifest") -> None:
    """Refuse provider options or session config entries that would make ONNX Runtime touch a file the bundle does
    not own (see the module docstring). ``providers``: (name, options) pairs."""
    for name, options in providers:
        for key, value in options.items():
            low = key.lower()
            if key in _OPTION_DENY or any(w in low for w in _CODE_WORDS):
                if value not in ("", "0", "false", "False"):
                    raise UnsafeArchiveError(f"{what}: {name} option {key!r} would make ONNX Runtime load or write "
                                             "files outside the bundle; refused")
                continue
            if key == "load_config":
                try:
                    config = json.loads(value)
                except ValueError:
                    config = None
                if not isinstance(config, dict):
                    raise UnsafeArchiveError(f"{what}: {name} option load_config must be a JSON object (a file path "
                                             f"would be read from outside the bundle), got {value[:80]!r}")
                bad = next((v for v in _strings(config) if not _path_ok(v)), None)
                if bad is not None:
                    raise UnsafeArchiveError(f"{what}: {name} load_config holds the path {bad[:80]!r} outside the "
                                             "bundle's cache directory")
                continue
            if not _path_ok(value):
                raise UnsafeArchiveError(f"{what}: {name} option {key}={value[:80]!r} is a path outside the "
                                         "bundle's cache directory (only '{cache_dir}/...' is allowed)")
    for key in config_entries:
        low = key.lower()
        if key in _ENTRY_DENY or any(w in low for w in _ENTRY_WORDS):
            raise UnsafeArchiveError(f"{what}: session config entry {key!r} names files ONNX Runtime would read or "
                                     "write; refused (set no file paths in a bundle)")
