"""edgefleet.devices: target profiles (data, one TOML file per device class) and detection of this machine."""

from __future__ import annotations

from .profile import PRECISIONS, Profile, Quantization, builtin_dir, get_profile, load_profile, load_profiles

__all__ = ["PRECISIONS", "Profile", "Quantization", "builtin_dir", "get_profile", "load_profile", "load_profiles"]
