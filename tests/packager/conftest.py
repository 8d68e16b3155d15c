"""Fixtures for packager tests: small models built with onnx.helper, real photos, real shipped models."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from packager_models import encoder_samples, make_convnet, make_encoder, photo_samples


@pytest.fixture(scope="session")
def convnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64x64 RGB conv classifier (opset 17)."""
    return make_convnet(tmp_path_factory.mktemp("convnet") / "convnet.onnx")


@pytest.fixture(scope="session")
def photos() -> list[dict[str, np.ndarray]]:
    """44 real photos (skimage.data, crops and mirror images) as convnet inputs: 12 to calibrate, 32 to validate."""
    return photo_samples(44, 64)


@pytest.fixture(scope="session")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-layer BERT-style encoder."""
    return make_encoder(tmp_path_factory.mktemp("encoder") / "encoder.onnx")


@pytest.fixture(scope="session")
def encoder_data() -> list[dict[str, np.ndarray]]:
    """Embedding-like encoder inputs: 10 to calibrate, 32 to validate."""
    return encoder_samples(42)
