"""Detection: this machine picks the right profile for its ORT flavour, and fake hosts pick theirs, with reasons.

Jetson, Mac and Raspberry Pi are not at hand: those cases run detection on ``Host`` values that describe them (CPU
flags, markers and the providers their ONNX Runtime offers), which is what ``read_host`` reads on the real device.
"""

from __future__ import annotations

import pytest
from edgefleet.devices import load_profiles
from edgefleet.devices.detect import Host, detect, read_host
from edgefleet.sdk.runtime import OrtInfo, ort_info

X86_FLAGS = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"})
VNNI_FLAGS = X86_FLAGS | {"avx512f", "avx512bw", "avx512_vnni"}


@pytest.fixture(autouse=True)
def _no_env_profiles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEFLEET_PROFILES", raising=False)


def _host(arch: str, flags: frozenset[str] = frozenset(), markers: frozenset[str] = frozenset(),
          providers: tuple[str, ...] = ("CPUExecutionProvider",), flavour: str = "cpu", system: str = "Linux") -> Host:
    return Host(arch=arch, system=system, cpu_model="test cpu", cpu_flags=flags, cores=4, memory_bytes=8 << 30,
                markers=markers, ort=OrtInfo("1.20.0", flavour, providers))


def test_detect_on_this_machine_picks_profile_for_installed_ort_flavour() -> None:
    host = read_host()
    if host.arch != "x86_64" or "avx512_vnni" not in host.cpu_flags:
        pytest.skip("expects the x86-64 AVX-512 VNNI development machine")
    det = detect(load_profiles(), host)
    assert det.profile is not None
    reasons = " | ".join(det.reasons)
    assert "avx512_vnni" in reasons and "x86_64" in reasons
    if "OpenVINOExecutionProvider" in ort_info().providers:
        assert det.profile.name == "intel-openvino-cpu"
        assert "OpenVINOExecutionProvider" in reasons and "(openvino)" in reasons
        assert det.rejected["x86-cpu-vnni"].startswith("fits, but ranks below intel-openvino-cpu")
    else:
        assert det.profile.name == "x86-cpu-vnni"
        assert "(cpu)" in reasons
        assert "does not offer OpenVINOExecutionProvider" in det.rejected["intel-openvino-cpu"]
    assert det.rejected["jetson-orin"] == "needs aarch64, this machine is x86_64"
    assert "x86-cpu" in det.fitting and det.fitting[0] == det.profile.name
    d = det.to_dict()
    assert d["profile"] == det.profile.name and d["host"]["ort"]["version"] == ort_info().version
    assert "avx512_vnni" in d["host"]["cpu_flags"]


@pytest.mark.openvino
def test_detect_picks_intel_openvino_cpu_in_the_openvino_venv() -> None:
    det = detect(load_profiles())
    assert det.profile is not None and det.profile.name == "intel-openvino-cpu"
    assert any("OpenVINOExecutionProvider" in r for r in det.reasons)


def test_detect_picks_jetson_orin_on_jetson_with_tensorrt_and_cuda() -> None:
    host = _host("aarch64", frozenset({"asimd", "asimddp"}), frozenset({"jetson"}),
                 ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"), "cuda")
    det = detect(load_profiles(), host)
    assert det.profile is not None and det.profile.name == "jetson-orin"
    assert "found jetson" in det.reasons
    assert any("TensorrtExecutionProvider" in r for r in det.reasons)
    assert det.rejected["raspberry-pi-5"] == "no raspberry-pi found on this machine"
    assert det.rejected["nvidia-gpu"] == "needs x86_64, this machine is aarch64"


def test_detect_rejects_jetson_orin_when_ort_lacks_tensorrt() -> None:
    host = _host("aarch64", frozenset({"asimd"}), frozenset({"jetson"}), ("CPUExecutionProvider",))
    det = detect(load_profiles(), host)
    assert "does not offer TensorrtExecutionProvider, CUDAExecutionProvider" in det.rejected["jetson-orin"]
    assert det.profile is None  # no generic aarch64 CPU profile: the Pi profile needs the Pi marker


def test_detect_picks_apple_silicon_on_macos_arm64_with_coreml() -> None:
    host = _host("arm64", frozenset(), frozenset({"macos"}), ("CoreMLExecutionProvider", "CPUExecutionProvider"),
                 system="Darwin")
    det = detect(load_profiles(), host)
    assert det.profile is not None and det.profile.name == "apple-silicon"
    assert "found macos" in det.reasons


def test_detect_picks_raspberry_pi_5_on_pi() -> None:
    host = _host("aarch64", frozenset({"fp", "asimd", "asimddp"}), frozenset({"raspberry-pi"}))
    det = detect(load_profiles(), host)
    assert det.profile is not None and det.profile.name == "raspberry-pi-5"
    assert "CPU has asimddp" in det.reasons


def test_detect_picks_x86_cpu_when_avx2_without_vnni() -> None:
    det = detect(load_profiles(), _host("x86_64", X86_FLAGS))
    assert det.profile is not None and det.profile.name == "x86-cpu"
    assert det.rejected["x86-cpu-vnni"] == "CPU lacks avx512f, avx512_vnni"


def test_detect_picks_x86_cpu_vnni_when_avx512_vnni() -> None:
    det = detect(load_profiles(), _host("x86_64", VNNI_FLAGS))
    assert det.profile is not None and det.profile.name == "x86-cpu-vnni"
    assert det.fitting == ["x86-cpu-vnni", "x86-cpu"]


def test_detect_picks_nvidia_gpu_on_x86_with_gpu_and_tensorrt() -> None:
    host = _host("x86_64", VNNI_FLAGS, frozenset({"nvidia-gpu"}),
                 ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"), "cuda")
    det = detect(load_profiles(), host)
    assert det.profile is not None and det.profile.name == "nvidia-gpu"


def test_detect_finds_nothing_without_onnxruntime() -> None:
    host = Host("x86_64", "Linux", "cpu", X86_FLAGS, 2, 1 << 30, frozenset(), None)
    det = detect(load_profiles(), host)
    assert det.profile is None
    assert det.rejected["x86-cpu"] == "ONNX Runtime is not installed"
    assert det.to_dict()["profile"] is None
