"""Shared fixtures: signing keys (objects and files), small models built with onnx.helper, real shipped models,
signed bundles, a real Mosquitto (plain, and TLS-only with client certificates). Plain helpers: tests/helpers.py."""

from __future__ import annotations

import importlib.util
import itertools
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import Mosquitto, remove_tls_files, tls_files_for_broker


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", default=False, help="run full-length hardening tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests whose flavour is not in this venv: openvino tests run only where the OpenVINO EP exists."""
    try:
        import onnxruntime as ort

        have_ov = "OpenVINOExecutionProvider" in ort.get_available_providers()
    except ImportError:
        have_ov = False
    for item in items:
        if "openvino" in item.keywords and not have_ov:
            item.add_marker(pytest.mark.skip(reason="needs onnxruntime-openvino (make test runs it in .venv-openvino)"))


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory: pytest.TempPathFactory):
    """A fresh Ed25519 key pair; the public key is in the same directory as ``<name>.pub``."""
    from edgefleet.sdk.keys import generate_keypair

    d = tmp_path_factory.mktemp("keys")
    return generate_keypair(d / "fleet.key")


@pytest.fixture(scope="session")
def trusted(signing_key):
    """TrustedKeys holding the session signing key."""
    from edgefleet.sdk.keys import TrustedKeys

    return TrustedKeys([signing_key.public])


def make_mlp(path: Path, in_dim: int = 16, hidden: int = 32, out_dim: int = 4, seed: int = 0) -> Path:
    """A small MatMul/Add/Relu/Softmax classifier with a symbolic batch dim, built with onnx.helper."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((in_dim, hidden)).astype(np.float32) * 0.3, "w1")
    b1 = numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32) * 0.1, "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((hidden, out_dim)).astype(np.float32) * 0.3, "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="mm1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="add1"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
        helper.make_node("MatMul", ["h2", "w2"], ["logits"], name="mm2"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", in_dim])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", out_dim])],
        [w1, b1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgefleet-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def make_padded_mlp(src: Path, path: Path, layers: int = 16, width: int = 384) -> Path:
    """The test MLP plus a heavy side branch multiplied by zero into its logits: exactly the same outputs, much more
    work (a real variant that passes its self-test and is slower)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.load(str(src))
    g = m.graph
    rng = np.random.default_rng(3)
    g.initializer.append(numpy_helper.from_array((rng.standard_normal((16, width)) * 0.1).astype(np.float32), "p_in"))
    g.initializer.append(numpy_helper.from_array(np.zeros((1,), np.float32), "p_zero"))
    nodes = [helper.make_node("MatMul", ["x", "p_in"], ["p0"])]
    for i in range(layers):
        g.initializer.append(numpy_helper.from_array(
            (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), f"pw{i}"))
        nodes += [helper.make_node("MatMul", [f"p{i}", f"pw{i}"], [f"pm{i}"]),
                  helper.make_node("Tanh", [f"pm{i}"], [f"p{i + 1}"])]
    nodes += [helper.make_node("ReduceSum", [f"p{layers}"], ["psum"], keepdims=1),
              helper.make_node("Mul", ["psum", "p_zero"], ["pnull"])]
    softmax = next(n for n in g.node if n.op_type == "Softmax")
    softmax.input[0] = "logits_padded"
    nodes.append(helper.make_node("Add", ["logits", "pnull"], ["logits_padded"]))
    idx = list(g.node).index(softmax)
    for k, n in enumerate(nodes):
        g.node.insert(idx + k, n)
    g.value_info.append(helper.make_tensor_value_info("psum", TensorProto.FLOAT, None))
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


@pytest.fixture(scope="session")
def mlp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path to the small test MLP."""
    return make_mlp(tmp_path_factory.mktemp("models") / "mlp.onnx")


def shipped_model(name: str) -> Path:
    """Path to a real pretrained ONNX model shipped inside a PyPI package (magika or silero-vad)."""
    if name == "magika":
        spec = importlib.util.find_spec("magika")
        assert spec is not None and spec.origin, "magika is a dev dependency"
        found = sorted(Path(spec.origin).parent.glob("models/*/model.onnx"))
        assert found, "magika ships models/<name>/model.onnx"
        return found[-1]
    if name == "silero-vad":
        spec = importlib.util.find_spec("silero_vad")
        assert spec is not None and spec.origin, "silero-vad is installed by make (with --no-deps)"
        return Path(spec.origin).parent / "data" / "silero_vad.onnx"
    raise ValueError(name)


BundleFactory = Callable[..., Path]


@pytest.fixture
def make_bundle(tmp_path: Path, signing_key) -> BundleFactory:
    """Build a signed bundle from an ONNX model with a validation set computed by a plain CPU session."""
    from edgefleet.sdk.testing import build_test_bundle

    def factory(model: Path, **kw) -> Path:
        return build_test_bundle(model, tmp_path / kw.pop("filename", "model.efb"), signing_key, **kw)

    return factory


# -- a real Mosquitto broker ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory):
    """One real Mosquitto per test module, on a free loopback port."""
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def tls_mosquitto(tmp_path_factory: pytest.TempPathFactory):
    """A TLS-only Mosquitto that requires a client certificate from the test CA (``.tls``: the PEM files)."""
    files = tls_files_for_broker()
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto-tls"), tls=files)
    yield broker
    broker.stop()
    remove_tls_files(files)


# -- keys as files --------------------------------------------------------------------------------------------------

@pytest.fixture
def trust_file(signing_key, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test signing key's public key as a file, for ``--trust``."""
    p = tmp_path_factory.mktemp("trust") / "fleet.pub"
    if not p.exists():
        p.write_bytes(signing_key.public.to_pem())
    return p


@pytest.fixture
def key_file(signing_key, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test signing key's private key as a file, for ``--key`` (controllers sign their commands with it)."""
    from cryptography.hazmat.primitives import serialization

    p = tmp_path_factory.mktemp("key") / "fleet.key"
    p.write_bytes(signing_key.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    return p


# -- a real PostgreSQL server ---------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def postgres():
    """One real PostgreSQL server per test session (Debian's binaries, a temporary directory, a free port).

    Durability is off (fsync, synchronous commits): the tests kill controllers, never the database server, and a
    test database is thrown away. The bench runs PostgreSQL with its default settings. Without the server binaries
    (or psycopg) the PostgreSQL tests skip and say why; with ``EDGEFLEET_REQUIRE_POSTGRES=1`` (CI: .ci/run) they
    fail instead, so a run that silently tested one backend cannot pass.
    """
    required = os.environ.get("EDGEFLEET_REQUIRE_POSTGRES", "") not in ("", "0")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        why = "psycopg is not installed (pip install 'edgefleet[postgres]'; make setup installs it)"
        pytest.fail(why) if required else pytest.skip(why)
    from tests.pg_server import PostgresServer, PostgresUnavailable

    try:
        server = PostgresServer({"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"})
    except PostgresUnavailable as exc:
        why = f"no PostgreSQL server here: {exc}"
        pytest.fail(why) if required else pytest.skip(why)
    yield server
    server.stop()


_pg_databases = itertools.count()


@pytest.fixture
def postgres_url(postgres) -> str:
    """A fresh, empty database on the session's PostgreSQL server (``CREATE DATABASE``, a few ms)."""
    return postgres.create_database(f"t{next(_pg_databases)}")
