"""Device profiles: every built-in loads, user directories add and override, bad files are errors naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest
from edgefleet.devices import PRECISIONS, builtin_dir, get_profile, load_profile, load_profiles
from edgefleet.sdk.errors import ConfigError

BUILTINS = {"x86-cpu", "x86-cpu-vnni", "intel-openvino-cpu", "intel-openvino-gpu", "nvidia-gpu", "jetson-orin",
            "apple-silicon", "raspberry-pi-5"}

MINIMAL = """\
name = "{name}"
description = "a test board"
arch = "aarch64"
ort_flavour = "cpu"
rank = {rank}
precisions = ["int8", "fp32"]

[[providers]]
name = "CPUExecutionProvider"

[quantization]
reduce_range = true
reason = "test"
"""


def _top(line: str) -> str:
    """The minimal profile named 'bad' with one more top-level key."""
    return MINIMAL.format(name="bad", rank=1).replace("\n[[providers]]", f"{line}\n\n[[providers]]", 1)


@pytest.fixture(autouse=True)
def _no_env_profiles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEFLEET_PROFILES", raising=False)


def test_load_profiles_loads_every_builtin_profile() -> None:
    profiles = load_profiles()
    assert set(profiles) >= BUILTINS
    for name in BUILTINS:
        prof = profiles[name]
        assert prof.name == name and prof.description
        assert prof.providers and all(p.name.endswith("ExecutionProvider") for p in prof.providers)
        assert set(prof.precisions) <= set(PRECISIONS)
        assert prof.quantization.reason, f"{name}: quantization choice has no reason"
        assert prof.session_reason, f"{name}: session choice has no reason"
        assert Path(prof.source).parent == builtin_dir()
        d = prof.to_dict()
        assert d["name"] == name and d["providers"][0]["name"] == prof.primary_provider


@pytest.mark.parametrize(
    ("name", "chain"),
    [
        ("x86-cpu", ["CPUExecutionProvider"]),
        ("x86-cpu-vnni", ["CPUExecutionProvider"]),
        ("intel-openvino-cpu", ["OpenVINOExecutionProvider", "CPUExecutionProvider"]),
        ("nvidia-gpu", ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]),
        ("jetson-orin", ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]),
        ("apple-silicon", ["CoreMLExecutionProvider", "CPUExecutionProvider"]),
        ("raspberry-pi-5", ["CPUExecutionProvider"]),
    ],
)
def test_builtin_profile_lists_providers_in_priority_order(name: str, chain: list[str]) -> None:
    assert [p.name for p in get_profile(name).providers] == chain


def test_builtin_quantization_reduce_range_follows_the_isa() -> None:
    assert get_profile("x86-cpu").quantization.reduce_range is True  # AVX2 VPMADDUBSW saturates int16
    assert get_profile("x86-cpu-vnni").quantization.reduce_range is False  # VPDPBUSD accumulates in int32
    assert get_profile("jetson-orin").quantization.activation_type == "int8"  # TensorRT wants S8S8
    assert get_profile("apple-silicon").providers[0].options["ModelFormat"] == "MLProgram"
    assert "{cache_dir}" in get_profile("jetson-orin").providers[0].options["trt_engine_cache_path"]


def test_user_profile_dir_adds_a_profile(tmp_path: Path) -> None:
    (tmp_path / "my-board.toml").write_text(MINIMAL.format(name="my-board", rank=5))
    profiles = load_profiles([tmp_path])
    assert set(profiles) == BUILTINS | {"my-board"}
    assert profiles["my-board"].quantization.reduce_range is True
    assert profiles["my-board"].source == str(tmp_path / "my-board.toml")


def test_user_profile_dir_overrides_builtin_of_same_name(tmp_path: Path) -> None:
    (tmp_path / "x86-cpu.toml").write_text(MINIMAL.format(name="x86-cpu", rank=99))
    prof = load_profiles([tmp_path])["x86-cpu"]
    assert prof.rank == 99 and prof.arch == "aarch64"
    assert get_profile("x86-cpu").rank == 10  # the built-in itself is untouched


def test_env_profile_dir_is_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "env-board.toml").write_text(MINIMAL.format(name="env-board", rank=1))
    monkeypatch.setenv("EDGEFLEET_PROFILES", str(tmp_path))
    assert "env-board" in load_profiles()


def test_get_profile_unknown_name_lists_known_targets() -> None:
    with pytest.raises(ConfigError, match=r"unknown target 'nope'; known targets: apple-silicon, "):
        get_profile("nope")


def test_load_profiles_missing_directory_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_profiles([tmp_path / "absent"])


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('name = "bad"\ndescription = [unclosed', "is not valid TOML"),
        (_top('colour = "red"'), "unknown key(s) ['colour']"),
        (MINIMAL.format(name="other", rank=1), "profile name 'other' must match the file name 'bad'"),
        (MINIMAL.format(name="bad", rank=1).replace('["int8", "fp32"]', '["int4"]'), "precisions must be among"),
        (_top('preferred_precision = "fp16"'), "preferred_precision 'fp16'"),
        (MINIMAL.format(name="bad", rank=1).replace('"aarch64"', '"riscv64"'), "arch must be one of"),
        (MINIMAL.format(name="bad", rank=1).replace('ort_flavour = "cpu"', 'ort_flavour = "rocm"'), "ort_flavour"),
        (MINIMAL.format(name="bad", rank=1).replace('"CPUExecutionProvider"', '"CPU"'),
         "must end with 'ExecutionProvider'"),
        (MINIMAL.format(name="bad", rank=1).replace('name = "CPUExecutionProvider"',
                                                    'name = "CPUExecutionProvider"\noption = { a = "1" }'),
         "unknown key(s) ['option'] in provider"),
        (MINIMAL.format(name="bad", rank=1).replace("reduce_range = true", 'weight_type = "int4"'), "weight_type"),
        (MINIMAL.format(name="bad", rank=1).replace("reduce_range = true", "reduce_rang = true"),
         "unknown key(s) ['reduce_rang'] in [quantization]"),
        (MINIMAL.format(name="bad", rank=1) + '\n[session]\ngraph_optimization_level = "max"\n',
         "graph_optimization_level"),
        (MINIMAL.format(name="bad", rank=1) + '\n[session]\nthreads = 4\n', "unknown session option(s) ['threads']"),
        (MINIMAL.format(name="bad", rank=1).replace('arch = "aarch64"\n', ""), "missing key 'arch'"),
    ],
    ids=["toml", "unknown_key", "name_mismatch", "bad_precision", "preferred_not_listed", "bad_arch", "bad_flavour",
         "bad_provider", "unknown_provider_key", "bad_weight_type", "unknown_quant_key", "bad_opt_level",
         "unknown_session_key", "missing_key"],
)
def test_bad_profile_file_is_config_error_naming_the_file(tmp_path: Path, text: str, fragment: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    for load in (lambda: load_profile(f), lambda: load_profiles([tmp_path])):
        with pytest.raises(ConfigError) as err:
            load()
        assert str(f) in str(err.value)
        assert fragment in str(err.value)
