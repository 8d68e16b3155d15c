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
  ``load_config`` file path and ``context`` pointer, are refused;
* session config entries that name files or formats to load or save (``ep.context_*``, ``session.*_file*``,
  ``*folder*``, ``*path*``, ``*dump*``, ``session.load_model_format`` / ``save_model_format``,
  ``session.debug_layout_transformation``) are refused.

A refusal is :class:`~edgefleet.sdk.errors.UnsafeArchiveError` (``bundle.unsafe``) naming the key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .errors import UnsafeArchiveError

__all__ = ["check_ort_options"]

_CACHE = "{cache_dir}"
_CODE_WORDS = ("plugin", "lib", "backend_path", "dump")
_OPTION_DENY = {"load_config", "context"}  # OpenVINO: a config file to read; a raw OpenCL context pointer
_ENTRY_DENY = {"session.load_model_format", "session.save_model_format", "session.debug_layout_transformation"}
_ENTRY_WORDS = ("file", "path", "folder", "dump", "ep.context")


def _looks_like_path(value: str) -> bool:
    return "/" in value or "\\" in value or value.startswith(("~", "."))


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
            if _CACHE in value or _looks_like_path(value):
                rest = value[len(_CACHE):] if value.startswith(_CACHE) else None
                if rest is None or (rest and not rest.startswith("/")) or ".." in rest.split("/") or "\\" in rest \
                        or "\x00" in value or _CACHE in rest:
                    raise UnsafeArchiveError(f"{what}: {name} option {key}={value[:80]!r} is a path outside the "
                                             "bundle's cache directory (only '{cache_dir}/...' is allowed)")
    for key in config_entries:
        low = key.lower()
        if key in _ENTRY_DENY or any(w in low for w in _ENTRY_WORDS):
            raise UnsafeArchiveError(f"{what}: session config entry {key!r} names files ONNX Runtime would read or "
                                     "write; refused (set no file paths in a bundle)")
