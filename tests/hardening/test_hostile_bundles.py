"""Hostile bundle corpus, generated here, each case installed through the agent's real installer on a device that is
already serving a bundle.

Every case must be refused with its stable error code at the step that should catch it, leave the device's whole
directory tree byte-for-byte as it was (nothing written outside staging, staging removed), create no ONNX Runtime
session before the signature and every hash have passed (``onnxruntime.InferenceSession`` is wrapped to observe each
call: at that moment the bundle directory it loads from must re-verify), and leave the active bundle serving.
Durations are recorded (``$EDGEFLEET_HARDENING_REPORT``) rather than asserted tightly: the bound is a generous 10 s.

The sdk-level tamper table in tests/sdk/test_bundle.py checks messages of ``verify_bundle``/``extract_bundle``; this
corpus goes through the installer (download → verify → compatibility → extract → session → selftest) instead.
"""

from __future__ import annotations

import io
import tarfile
import time
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest
from _hardening_util import sdk_bundle_tools, tree_snapshot
from _hostile_onnx import HOSTILE, MALFORMED
from edgefleet.agent.installer import Installer, InstallError
from edgefleet.agent.registry import Registry
from edgefleet.agent.store import Store
from edgefleet.sdk.bundle import canonical_json, read_installed
from edgefleet.sdk.errors import EdgefleetError
from edgefleet.sdk.keys import PrivateKey, TrustedKeys, generate_keypair
from edgefleet.sdk.testing import build_test_bundle

MODEL = "model/model.onnx"
X = np.ones((2, 16), np.float32)
ACTIVE_VERSION = "5.0.0"
GIB = 1 << 30

_bt = sdk_bundle_tools()
Member = _bt.Member
manifest_of, member, read_members, write_members = _bt.manifest_of, _bt.member, _bt.read_members, _bt.write_members


# -- the device -----------------------------------------------------------------------------------------------------

@dataclass
class Device:
    """An installer with a store under ``root``, already serving ``testmodel`` ACTIVE_VERSION."""

    root: Path
    installer: Installer
    active_digest: str
    trusted: TrustedKeys


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory, signing_key: PrivateKey, trusted: TrustedKeys,
           mlp_model: Path) -> Device:
    root = tmp_path_factory.mktemp("device")
    inst = Installer(Store(root / "data"), Registry(), trusted, targets=("x86-cpu",))
    b = build_test_bundle(mlp_model, tmp_path_factory.mktemp("active") / "active.efb", signing_key,
                          version=ACTIVE_VERSION)
    res = inst.install(b.as_uri(), *_sha_size(b))
    return Device(root, inst, res.digest, trusted)


def _sha_size(path: Path) -> tuple[str, int]:
    import hashlib

    data = path.read_bytes()
    return hashlib.sha256(data).hexdigest(), len(data)


@dataclass
class SessionSpy:
    """Wraps the real ``InferenceSession``: records, per call, whether the bundle it loads from verifies right now."""

    real: Any
    trusted: TrustedKeys
    calls: list[tuple[str, bool, str]] = field(default_factory=list)

    def __call__(self, path: Any, *args: Any, **kwargs: Any) -> Any:
        p = Path(str(path))
        root = next((d for d in p.parents if (d / "manifest.json").exists()), None)
        verified, why = False, "no manifest.json above the model"
        if root is not None:
            try:
                read_installed(root, self.trusted, verify_files=True)
                verified, why = True, ""
            except EdgefleetError as exc:
                why = str(exc)
        self.calls.append((str(p), verified, why))
        return self.real(path, *args, **kwargs)


# -- building hostile bundles ---------------------------------------------------------------------------------------

@dataclass
class Kit:
    """What a case builder gets: the good members of a newer (9.0.0) bundle, the fleet key, where to write."""

    members: list[Member]
    key: PrivateKey
    out: Path
    root: Path  # the device root: escape targets are placed under it so the tree snapshot would see them
    mlp: Path

    def data(self, name: str) -> bytes:
        return dict((i.name, d) for i, d in self.members)[name]

    def payload(self) -> dict[str, bytes]:
        return {i.name: d for i, d in self.members[2:]}

    def write(self, members: list[Member]) -> Path:
        return write_members(self.out, members)

    def with_member(self, extra: Member, at: int = 2) -> Path:
        """The good bundle (untouched signed manifest) with one more member inserted."""
        return self.write([*self.members[:at], extra, *self.members[at:]])

    def signed(self, payload: dict[str, bytes], mutate: Callable[[dict[str, Any]], None] | None = None,
               extra: list[Member] | None = None, key: PrivateKey | None = None, raw: bytes | None = None,
               listed: dict[str, bytes] | None = None) -> Path:
        """A validly signed bundle: ``payload`` members written and listed with their real sizes and hashes.

        ``listed`` overrides what the manifest lists (when it must differ from what is written).
        """
        import hashlib

        d = manifest_of(self.members)
        d["files"] = {n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)}
                      for n, b in (listed if listed is not None else payload).items()}
        if mutate is not None:
            mutate(d)
        body = canonical_json(d) if raw is None else raw
        sigs = canonical_json([(key or self.key).sign(body)])
        members = [member("manifest.json", body), member("signatures.json", sigs),
                   *(member(n, b) for n, b in payload.items()), *(extra or [])]
        return self.write(members)


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0x10
    return bytes(b)


def _good_bytes(k: Kit) -> bytes:
    return write_members(k.out.with_name("full.efb"), k.members).read_bytes()


def _offset_of(k: Kit, name: str) -> int:
    """Offset of member ``name``'s data in the good archive."""
    with tarfile.open(k.out.with_name("full.efb") if k.out.with_name("full.efb").exists() else
                      write_members(k.out.with_name("full.efb"), k.members), "r:") as tf:
        return next(i.offset_data for i in tf if i.name == name)


def _raw_header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.type = kind
    return info.tobuf(format=tarfile.GNU_FORMAT)


# -- ONNX models with external data ------------------------------------------------------------------------------

def _external_model(mlp: Path, location: str | None, offset: int | None = None, length: int | None = None,
                    where: str = "initializer", tensor: str = "w1") -> bytes:
    """The test MLP with one weight stored as external data at ``location`` (in the main graph, a subgraph or a
    sparse initializer)."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load(str(mlp))
    init = {t.name: t for t in m.graph.initializer}

    def externalize(t: onnx.TensorProto) -> None:
        t.ClearField("raw_data")
        t.ClearField("float_data")
        t.data_location = TensorProto.EXTERNAL
        for key, v in (("location", location), ("offset", offset), ("length", length)):
            if v is not None:
                e = t.external_data.add()
                e.key, e.value = key, str(v)

    if where == "initializer":
        externalize(init[tensor])
    elif where == "subgraph":
        # an If whose branches each hold their own initializer: only a walk into subgraphs finds it
        c = helper.make_tensor("c", TensorProto.FLOAT, [1], [1.0])
        externalize(c)
        then_g = helper.make_graph([helper.make_node("Identity", ["c"], ["o1"])], "then", [],
                                   [helper.make_tensor_value_info("o1", TensorProto.FLOAT, [1])], [c])
        else_g = helper.make_graph([helper.make_node("Identity", ["c2"], ["o2"])], "else", [],
                                   [helper.make_tensor_value_info("o2", TensorProto.FLOAT, [1])],
                                   [helper.make_tensor("c2", TensorProto.FLOAT, [1], [2.0])])
        m.graph.initializer.append(helper.make_tensor("cond", TensorProto.BOOL, [], [True]))
        m.graph.node.append(helper.make_node("If", ["cond"], ["branch_out"], then_branch=then_g,
                                             else_branch=else_g))
    elif where == "sparse":
        values = helper.make_tensor("sp_values", TensorProto.FLOAT, [1], [1.0])
        externalize(values)
        indices = helper.make_tensor("sp_indices", TensorProto.INT64, [1], [0])
        m.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4]))
    elif where == "attribute":
        t = helper.make_tensor("attr_t", TensorProto.FLOAT, [1], [1.0])
        externalize(t)
        m.graph.node.append(helper.make_node("Constant", [], ["const_out"], value=t))
    return m.SerializeToString()


def _w1_bytes(mlp: Path) -> bytes:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(mlp))
    return numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "w1")).tobytes()


def _ext(k: Kit, location: str | None, *, offset: int | None = None, length: int | None = None,
         where: str = "initializer", data_name: str | None = "model/w1.bin", data: bytes | None = None,
         extra: list[Member] | None = None) -> Path:
    payload = {n: b for n, b in k.payload().items() if n != MODEL}
    payload[MODEL] = _external_model(k.mlp, location, offset, length, where)
    if data_name is not None:
        payload[data_name] = data if data is not None else _w1_bytes(k.mlp)
    return k.signed(payload, extra=extra)


# -- pickles and bombs inside the validation set --------------------------------------------------------------------

def _npz(arrays: dict[str, Any], compress: bool = False) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compress else np.savez)(buf, **arrays)
    return buf.getvalue()


def _npz_object_array(k: Kit) -> Path:
    obj = np.empty(1, dtype=object)
    obj[0] = {"evil": "pickle"}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        with z.open("s0/in/x.npy", "w") as fh:
            np.lib.format.write_array(fh, obj, allow_pickle=True)
    return k.signed({**k.payload(), "validation.npz": buf.getvalue()})


def _npz_pickle_member(k: Kit) -> Path:
    import pickle

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("s0/in/x.pkl", pickle.dumps({"evil": 1}))
    return k.signed({**k.payload(), "validation.npz": buf.getvalue()})


def _pkl_member(k: Kit) -> Path:
    import pickle

    return k.signed({**k.payload(), "extra/weights.pkl": pickle.dumps({"evil": 1})})


def _npz_ratio_bomb(k: Kit) -> Path:
    # 1 GiB of zeros deflates to ~1 MiB: decompressing it on a 1 GiB device is the attack
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        with z.open("s0/in/x.npy", "w", force_zip64=True) as fh:
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                          "shape": (GIB // 4,)})
            fh.write(header.getvalue())
            zeros = bytes(16 << 20)
            for _ in range(GIB // len(zeros)):
                fh.write(zeros)
    return k.signed({**k.payload(), "validation.npz": buf.getvalue()})


def _npz_shape_claim(k: Kit) -> Path:
    # a .npy header claiming 2**40 floats over 16 bytes of data
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (1 << 40,)})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("s0/in/x.npy", header.getvalue() + bytes(16))
    return k.signed({**k.payload(), "validation.npz": buf.getvalue()})


# -- the corpus -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    build: Callable[[Kit], Path]
    code: str
    step: str
    bomb: bool = False


def _slip(name: str) -> Case:
    """An unlisted member named ``name`` inserted after the signed header."""
    return Case(lambda k: k.with_member(member(name.replace("{root}", str(k.root)), b"owned")),
                "bundle.unsafe", "extract")


def _slip_listed(name: str) -> Case:
    """A validly signed manifest that lists ``name`` (and the member is there)."""
    return Case(lambda k: k.signed({**k.payload(), name.replace("{root}", str(k.root)): b"owned"}),
                "bundle.unsafe", "verify")


def _link(kind: bytes, linkname: str, name: str = "report.json") -> Case:
    """A listed name replaced by a link or special member."""
    def build(k: Kit) -> Path:
        rest = [x for x in k.members[2:] if x[0].name != name]
        info, _ = member(name, kind=kind, linkname=linkname.replace("{root}", str(k.root)))
        if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            info.devmajor, info.devminor = 1, 3
        return k.write([*k.members[:2], (info, b""), *rest])
    return Case(build, "bundle.unsafe", "extract")


def _truncate(at: Callable[[Kit], int], code: str = "bundle.format", step: str = "verify") -> Case:
    def build(k: Kit) -> Path:
        full = _good_bytes(k)
        k.out.write_bytes(full[: at(k)])
        return k.out
    return Case(build, code, step)


def _bitflip(at: Callable[[Kit], int], code: str, step: str) -> Case:
    def build(k: Kit) -> Path:
        full = _good_bytes(k)
        k.out.write_bytes(_flip(full, at(k)))
        return k.out
    return Case(build, code, step)


def _spliced_signature(k: Kit) -> Path:
    """manifest of this bundle, signatures.json of another validly signed bundle (a real signature, other bytes)."""
    other = build_test_bundle(k.mlp, k.out.with_name("other.efb"), k.key, name="othermodel", version="9.0.0")
    other_sig = read_members(other)[1]
    return k.write([k.members[0], other_sig, *k.members[2:]])


def _spliced_header(k: Kit) -> Path:
    """manifest and signature of another bundle (both valid) over this bundle's payload."""
    other = build_test_bundle(k.mlp, k.out.with_name("other.efb"), k.key, version="9.0.1",
                              report={"other": "report"})
    return k.write([*read_members(other)[:2], *k.members[2:]])


def _untrusted(k: Kit) -> Path:
    return k.signed(k.payload(), key=generate_keypair(k.out.with_name("rogue.key")))


def _two_signatures_one_forged(k: Kit) -> Path:
    rogue = generate_keypair(k.out.with_name("rogue.key"))
    body = canonical_json(manifest_of(k.members))
    forged = rogue.sign(body)
    forged["keyid"] = k.key.public.key_id
    return k.write([k.members[0], member("signatures.json", canonical_json([forged])), *k.members[2:]])


def _hash_mismatch_same_size(k: Kit) -> Path:
    data = k.data("report.json")
    return k.signed({**k.payload(), "report.json": data[:-1] + b"!"}, listed=k.payload())


def _version(v: str) -> Case:
    """The good payload signed as version ``v``, rebuilt (other metadata, so another manifest digest)."""
    return Case(lambda k: k.signed(k.payload(), lambda d: d.update(version=v, metadata={"rebuild": "2"})),
                "bundle.compat", "compatibility")


def _many_tiny_unlisted(k: Kit) -> Path:
    tiny = [member(f"t/{i:05d}", b"x") for i in range(20000)]
    return k.write([*k.members, *tiny])


def _members_over_cap(k: Kit) -> Path:
    payload = {**k.payload(), **{f"t/{i:04d}": b"x" for i in range(1001)}}
    return k.signed(payload)


def _size_claim_file(k: Kit) -> Path:
    def mutate(d: dict[str, Any]) -> None:
        d["files"]["report.json"]["size"] = 9 * GIB
    return k.signed(k.payload(), mutate)


def _size_claim_total(k: Kit) -> Path:
    def mutate(d: dict[str, Any]) -> None:
        for i in range(3):
            d["files"][f"big{i}.bin"] = {"sha256": "0" * 64, "size": 6 * GIB}
    return k.signed(k.payload(), mutate)


def _lying_header_size(k: Kit) -> Path:
    """A listed 4 GiB file (signed: the claim is consistent) whose tar header says 4 GiB but the archive ends."""
    def mutate(d: dict[str, Any]) -> None:
        d["files"]["huge.bin"] = {"sha256": "0" * 64, "size": 4 * GIB}
    good = k.signed(k.payload(), mutate)
    with tarfile.open(good, "r:") as tf:
        end = max(i.offset_data + i.size for i in tf)
    raw = good.read_bytes()[: end + (-end % 512)] + _raw_header("huge.bin", 4 * GIB) + bytes(4096)
    k.out.write_bytes(raw)
    return k.out


def _pax_long_name(k: Kit) -> Path:
    return k.with_member(member("a/" * 5000 + "evil", b"x"))


def _duplicate_other_content(k: Kit) -> Path:
    """The listed report, then a second 'report.json' with other bytes (which copy would an extractor keep?)."""
    return k.write([*k.members, member("report.json", b"{}" + b" " * (len(k.data("report.json")) - 2))])


def _directory_then_file(k: Kit) -> Path:
    return k.with_member(member("model", kind=tarfile.DIRTYPE))


def _symlinked_dir_then_member(k: Kit) -> Path:
    """A symlinked 'model' directory pointing outside, then the model written through it."""
    rest = [x for x in k.members[2:]]
    return k.write([*k.members[:2], member("model", kind=tarfile.SYMTYPE, linkname=str(k.root)), *rest])


def _gnu_sparse(k: Kit) -> Path:
    rest = [x for x in k.members[2:] if x[0].name != "report.json"]
    info, _ = member("report.json", kind=tarfile.GNUTYPE_SPARSE)
    return k.write([*k.members[:2], *rest, (info, b"")])


def _model_resigned(transform: Callable[[bytes], bytes]) -> Callable[[Kit], Path]:
    """A validly signed bundle whose model bytes are damaged (the signer signed garbage)."""
    return lambda k: k.signed({**k.payload(), MODEL: transform(k.data(MODEL))})


def _ort_format_name(k: Kit) -> Path:
    """The model listed as ``model/model.ort``: ORT would pick its flatbuffers loader by the extension."""
    payload = {("model/model.ort" if n == MODEL else n): b for n, b in k.payload().items()}
    return k.signed(payload, lambda d: d.update(model="model/model.ort"))


def _case_insensitive_twins(k: Kit) -> Path:
    return k.signed({**k.payload(), "Report.json": k.data("report.json")})


CASES: dict[str, Case] = {
    # zip-slip, unlisted members (caught while reading members) ...
    "slip_dotdot": _slip("../evil"),
    "slip_dotdot_deep": _slip("../../../../../../evil"),
    "slip_dotdot_inside": _slip("model/../../evil"),
    "slip_absolute_into_device": _slip("{root}/evil"),
    "slip_absolute_etc": _slip("/etc/cron.d/evil"),
    "slip_backslash_dotdot": _slip("..\\..\\evil"),
    "slip_backslash_inside": _slip("model\\..\\..\\evil"),
    "slip_drive_letter_slash": _slip("C:/Windows/evil"),
    "slip_drive_letter_backslash": _slip("C:\\Windows\\evil"),
    "slip_drive_relative": _slip("c:evil"),
    "slip_dot_segment": _slip("./model/model.onnx"),
    "slip_empty_segment": _slip("model//evil"),
    "slip_control_chars": _slip("model/\x1b[2Jevil"),
    "slip_bidi_override": _slip("model/\u202eexe.onnx"),
    # ... and the same names listed in a validly signed manifest (caught by the manifest schema)
    "slip_listed_dotdot": _slip_listed("../evil"),
    "slip_listed_dotdot_inside": _slip_listed("model/../../evil"),
    "slip_listed_absolute": _slip_listed("{root}/evil"),
    "slip_listed_backslash": _slip_listed("..\\evil"),
    "slip_listed_drive_letter": _slip_listed("C:/evil"),
    "slip_listed_dot_segment": _slip_listed("./report2.json"),
    # links, special files, directories
    "symlink_to_etc_passwd": _link(tarfile.SYMTYPE, "/etc/passwd"),
    "symlink_relative_escape": _link(tarfile.SYMTYPE, "../../../../evil"),
    "symlink_into_device": _link(tarfile.SYMTYPE, "{root}/data/state/pointers.json"),
    "symlinked_dir_then_member": Case(_symlinked_dir_then_member, "bundle.unsafe", "extract"),
    "hardlink_to_model": _link(tarfile.LNKTYPE, MODEL),
    "hardlink_to_etc_shadow": _link(tarfile.LNKTYPE, "/etc/shadow"),
    "fifo": _link(tarfile.FIFOTYPE, ""),
    "char_device": _link(tarfile.CHRTYPE, ""),
    "block_device": _link(tarfile.BLKTYPE, ""),
    "directory_member": Case(_directory_then_file, "bundle.unsafe", "extract"),
    "gnu_sparse_member": Case(_gnu_sparse, "bundle.unsafe", "extract"),
    # duplicates and names
    "duplicate_same_content": Case(lambda k: k.write([*k.members, k.members[3]]), "bundle.unsafe", "extract"),
    "duplicate_other_content": Case(_duplicate_other_content, "bundle.unsafe", "extract"),
    "duplicate_manifest_member": Case(lambda k: k.write([*k.members, k.members[0]]), "bundle.unsafe", "extract"),
    "case_insensitive_twins": Case(_case_insensitive_twins, "bundle.format", "verify"),
    "overlong_name_300": _slip("x" * 300),
    "overlong_segment_200": _slip("model/" + "y" * 200),
    "overlong_pax_name_10k": Case(_pax_long_name, "bundle.unsafe", "extract"),
    "overlong_listed_name": _slip_listed("z" * 300),
    # bombs: size claims, member counts
    "bomb_file_size_claim_9gib": Case(_size_claim_file, "bundle.unsafe", "extract", bomb=True),
    "bomb_total_size_claim_18gib": Case(_size_claim_total, "bundle.unsafe", "extract", bomb=True),
    "bomb_lying_tar_header_4gib": Case(_lying_header_size, "bundle.format", "extract", bomb=True),
    "bomb_1001_listed_members": Case(_members_over_cap, "bundle.unsafe", "extract", bomb=True),
    "bomb_20000_tiny_unlisted_members": Case(_many_tiny_unlisted, "bundle.integrity", "extract", bomb=True),
    "bomb_validation_npz_deflate_1gib": Case(_npz_ratio_bomb, "bundle.unsafe", "session", bomb=True),
    "bomb_validation_npy_shape_claim": Case(_npz_shape_claim, "bundle.unsafe", "session", bomb=True),
    # ONNX external data (validly signed bundles: the model itself is hostile)
    "extdata_dotdot": Case(lambda k: _ext(k, "../../../../etc/passwd", data_name=None), "bundle.unsafe", "session"),
    "extdata_dotdot_to_listed_file": Case(lambda k: _ext(k, "../report.json", data_name=None), "bundle.unsafe",
                                          "session"),
    "extdata_nested_dotdot": Case(lambda k: _ext(k, "sub/../../../w1.bin"), "bundle.unsafe", "session"),
    "extdata_absolute": Case(lambda k: _ext(k, "/etc/passwd", data_name=None), "bundle.unsafe", "session"),
    "extdata_absolute_into_device": Case(lambda k: _ext(k, f"{k.root}/data/state/pointers.json", data_name=None),
                                         "bundle.unsafe", "session"),
    "extdata_backslash": Case(lambda k: _ext(k, "..\\w1.bin"), "bundle.unsafe", "session"),
    "extdata_drive_letter": Case(lambda k: _ext(k, "C:/w1.bin"), "bundle.unsafe", "session"),
    "extdata_unlisted_file": Case(lambda k: _ext(k, "not-listed.bin"), "bundle.unsafe", "session"),
    "extdata_symlink_member": Case(
        lambda k: _ext(k, "link.bin", extra=[member("model/link.bin", kind=tarfile.SYMTYPE, linkname="/etc/passwd")]),
        "bundle.unsafe", "extract"),
    "extdata_in_subgraph": Case(lambda k: _ext(k, "../../x.bin", where="subgraph"), "bundle.unsafe", "session"),
    "extdata_in_sparse_initializer": Case(lambda k: _ext(k, "/etc/passwd", where="sparse"), "bundle.unsafe",
                                          "session"),
    "extdata_in_node_attribute": Case(lambda k: _ext(k, "../../x.bin", where="attribute"), "bundle.unsafe",
                                      "session"),
    "extdata_offset_past_end": Case(lambda k: _ext(k, "w1.bin", offset=10**6), "bundle.format", "session"),
    "extdata_length_past_end": Case(lambda k: _ext(k, "w1.bin", offset=0, length=10**6), "bundle.format",
                                    "session"),
    "extdata_offset_plus_length_past_end": Case(lambda k: _ext(k, "w1.bin", offset=1024, length=2048),
                                                "bundle.format", "session"),
    "extdata_negative_offset": Case(lambda k: _ext(k, "w1.bin", offset=-64), "bundle.format", "session"),
    "extdata_no_location": Case(lambda k: _ext(k, None), "bundle.format", "session"),
    # manifest / signature mismatches
    "unlisted_file": Case(lambda k: k.with_member(member("extra.bin", b"not listed"), at=len(k.members)),
                          "bundle.integrity", "extract"),
    "missing_file": Case(lambda k: k.write([x for x in k.members if x[0].name != "report.json"]),
                         "bundle.integrity", "extract"),
    "hash_mismatch_same_size": Case(_hash_mismatch_same_size, "bundle.integrity", "extract"),
    "untrusted_key": Case(_untrusted, "bundle.signature", "verify"),
    "forged_signature_claims_trusted_keyid": Case(_two_signatures_one_forged, "bundle.signature", "verify"),
    "signature_of_another_manifest_spliced": Case(_spliced_signature, "bundle.signature", "verify"),
    "other_bundles_header_over_this_payload": Case(_spliced_header, "bundle.integrity", "extract"),
    "no_signatures": Case(lambda k: k.write([k.members[0], member("signatures.json", b"[]"), *k.members[2:]]),
                          "bundle.signature", "verify"),
    # valid bundles this device must not install
    "rollback_older_version": _version("4.0.0"),
    "rollback_much_older_version": _version("0.0.1"),
    "same_version_other_hash": _version(ACTIVE_VERSION),
    "same_version_spelled_differently": _version("5.0"),
    "other_target": Case(lambda k: k.signed(k.payload(), lambda d: d.update(target="jetson-orin")),
                         "bundle.compat", "compatibility"),
    "provider_unavailable": Case(lambda k: k.signed(k.payload(), lambda d: d.update(
        providers=[{"name": "TensorrtExecutionProvider", "options": {}}])), "bundle.compat", "compatibility"),
    "onnxruntime_too_old": Case(lambda k: k.signed(k.payload(), lambda d: d.update(min_ort_version="99.0")),
                                "bundle.compat", "compatibility"),
    # truncated archives (several offsets)
    "truncated_to_10_bytes": _truncate(lambda k: 10),
    "truncated_in_first_header": _truncate(lambda k: 100),
    "truncated_after_first_header": _truncate(lambda k: 512),
    "truncated_in_manifest": _truncate(lambda k: _offset_of(k, "manifest.json") + 20),
    "truncated_in_signatures": _truncate(lambda k: _offset_of(k, "signatures.json") + 10),
    "truncated_in_model": _truncate(lambda k: _offset_of(k, MODEL) + 700, step="extract"),
    "truncated_in_validation": _truncate(lambda k: _offset_of(k, "validation.npz") + 100, step="extract"),
    # bit flips (several offsets)
    "bitflip_first_header_name": _bitflip(lambda k: 3, "bundle.format", "verify"),
    "bitflip_first_header_checksum": _bitflip(lambda k: 150, "bundle.format", "verify"),
    "bitflip_manifest_json": _bitflip(lambda k: _offset_of(k, "manifest.json") + 40, "bundle.signature",
                                      "verify"),
    "bitflip_signature_value": _bitflip(lambda k: _offset_of(k, "signatures.json") + 120, "bundle.signature",
                                        "verify"),
    "bitflip_model_start": _bitflip(lambda k: _offset_of(k, MODEL) + 5, "bundle.integrity", "extract"),
    "bitflip_model_middle": _bitflip(lambda k: _offset_of(k, MODEL) + 1500, "bundle.integrity", "extract"),
    # tarfile reads a header with a bad checksum after the first as the end of the archive: listed files missing
    "bitflip_model_header_size": _bitflip(lambda k: _offset_of(k, MODEL) - 512 + 124 + 9, "bundle.integrity",
                                          "extract"),
    "bitflip_validation_data": _bitflip(lambda k: _offset_of(k, "validation.npz") + 200, "bundle.integrity",
                                        "extract"),
    # validly signed but damaged models (the signer signed garbage): ORT sees it only after every hash passed
    "signed_model_truncated_half": Case(_model_resigned(lambda b: b[: len(b) // 2]), "model", "session"),
    "signed_model_bitflip_header": Case(_model_resigned(lambda b: _flip(b, 1)), "model", "session"),
    "signed_model_bitflip_weights": Case(lambda k: _model_resigned(
        lambda b: _flip(b, b.index(_w1_bytes(k.mlp)) + 4 * 7 + 3))(k), "selftest", "selftest"),
    "signed_model_empty": Case(_model_resigned(lambda b: b""), "model", "session"),
    "signed_model_ort_format_name": Case(_ort_format_name, "bundle.format", "session"),
    # pickles
    "pickle_npz_object_array": Case(_npz_object_array, "bundle.format", "session"),
    "pickle_npz_member": Case(_npz_pickle_member, "bundle.format", "session"),
    "pickle_pkl_member": Case(_pkl_member, "bundle.unsafe", "verify"),
}


def _opt(**providers_options: str) -> Case:
    """Validly signed: the manifest's first provider gets these options."""
    def mutate(d: dict[str, Any]) -> None:
        d["providers"] = [{"name": "CPUExecutionProvider", "options": dict(providers_options)}]
    return Case(lambda k: k.signed(k.payload(), mutate), "bundle.unsafe", "verify")


def _variant_opt(**providers_options: str) -> Case:
    """Validly signed: a second variant (same model and self-test set) whose provider gets these options."""
    def mutate(d: dict[str, Any]) -> None:
        d["variants"] = [{"name": "safe", "precision": "fp32", "model": d["model"], "providers": d["providers"],
                          "session": d["session"], "validation": d["validation"]},
                         {"name": "hostile", "precision": "fp32", "model": d["model"],
                          "providers": [{"name": "CPUExecutionProvider", "options": dict(providers_options)}],
                          "session": d["session"], "validation": d["validation"]}]
    return Case(lambda k: k.signed(k.payload(), mutate), "bundle.unsafe", "verify")


def _entry(key: str, value: str) -> Case:
    def mutate(d: dict[str, Any]) -> None:
        d["session"]["config_entries"] = {key: value}
    return Case(lambda k: k.signed(k.payload(), mutate), "bundle.unsafe", "verify")


# Paths the manifest hands to ONNX Runtime: outside the bundle's cache dir, code loading, file dumps
CASES.update({
    "ortopt_ep_context_file_path": _entry("ep.context_file_path", "/var/lib/edgefleet/state/pointers.json"),
    "ortopt_ep_context_enable": _entry("ep.context_enable", "1"),
    "ortopt_save_model_format": _entry("session.save_model_format", "ORT"),
    "ortopt_external_initializers_folder": _entry("session.model_external_initializers_file_folder_path", "/etc"),
    "ortopt_absolute_cache_dir": _opt(cache_dir="/etc/cron.d"),
    "ortopt_cache_dir_dotdot": _opt(cache_dir="{cache_dir}/../../state"),
    "ortopt_cache_dir_prefix_trick": _opt(cache_dir="{cache_dir}x/../../state"),
    "ortopt_relative_path": _opt(trt_engine_cache_path="../../state"),
    "ortopt_home_path": _opt(cache_dir="~/x"),
    "ortopt_plugin_library": _opt(trt_extra_plugin_lib_paths="/tmp/evil.so"),
    "ortopt_dump_subgraphs": _opt(trt_dump_subgraphs="True"),
    "ortopt_openvino_load_config": _opt(load_config="/etc/passwd"),
    "ortopt_openvino_load_config_cache_dir": _opt(load_config='{"CPU": {"CACHE_DIR": "/etc/cron.d"}}'),
    "ortopt_plugin_library_in_a_variant": _variant_opt(trt_extra_plugin_lib_paths="/tmp/evil.so"),
})

# Every place the ONNX proto can reference a file (tests/hardening/_hostile_onnx.py), validly signed, pointing at
# /etc/passwd as in issue 18: found and refused before ONNX Runtime sees the model.
_PASSWD = "../../../../../../../../etc/passwd"
# Refused for their form, not their target: not valid protobuf as ORT would read it (model), a malformed reference
# (bundle.format).
_FORM = {"constant_value_given_twice": "model", "unknown_field_with_tensor": "model",
         "duplicate_location_key": "bundle.format", "external_without_location": "bundle.format",
         "prepacked_key": "bundle.format", "metadata_ort_config": "bundle.format"}
for _name, _build in [*((n, h.build) for n, h in HOSTILE.items()), *MALFORMED.items()]:
    CASES[f"extdata_proto_{_name}"] = Case(
        lambda k, b=_build: k.signed({**k.payload(), MODEL: b(_PASSWD)}), _FORM.get(_name, "bundle.unsafe"),
        "session")


@pytest.fixture(scope="module")
def good_members(tmp_path_factory: pytest.TempPathFactory, signing_key: PrivateKey, mlp_model: Path
                 ) -> list[Member]:
    path = build_test_bundle(mlp_model, tmp_path_factory.mktemp("newer") / "newer.efb", signing_key,
                             version="9.0.0")
    members = read_members(path)
    assert [i.name for i, _ in members][:3] == ["manifest.json", "signatures.json", MODEL]
    return members


def _serving(dev: Device) -> None:
    model = dev.installer.registry.get("testmodel")
    assert model is not None, "nothing serves testmodel any more"
    assert (model.version, model.digest) == (ACTIVE_VERSION, dev.active_digest)
    assert model.run({"x": X})["probs"].shape == (2, 4)
    assert dev.installer.store.pointers()["testmodel"].active == dev.active_digest


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_bundle_refused_with_code_nothing_written_active_serving(
    case: str, device: Device, good_members: list[Member], signing_key: PrivateKey, mlp_model: Path,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, figures: Any,
) -> None:
    spec = CASES[case]
    kit = Kit(list(good_members), signing_key, tmp_path / "hostile.efb", device.root, mlp_model)
    path = spec.build(kit)
    sha, size = _sha_size(path)
    outside = Path(f"/tmp/edgefleet-evil-{uuid.uuid4().hex}")
    before = tree_snapshot(device.root)
    spy = SessionSpy(onnxruntime.InferenceSession, device.trusted)
    monkeypatch.setattr(onnxruntime, "InferenceSession", spy)

    t0 = time.perf_counter()
    with pytest.raises(InstallError) as err:
        device.installer.install(path.as_uri(), sha, size)
    seconds = time.perf_counter() - t0
    monkeypatch.undo()

    figures.add("hostile_bundles", case, {"code": err.value.code, "step": err.value.step,
                                          "ms": round(seconds * 1000, 1), "bytes": size})
    assert (err.value.code, err.value.step) == (spec.code, spec.step), str(err.value)
    assert seconds < (30 if spec.bomb else 10), f"{case} took {seconds:.1f} s"
    assert tree_snapshot(device.root) == before, "the device's tree changed"
    assert not outside.exists() and not Path("/tmp/evil").exists()
    assert not list(device.installer.store.bundles.glob(".staging-*"))
    # an ORT session only ever loads a bundle that verifies at that moment; and never for cases refused before
    assert all(ok for _, ok, _ in spy.calls), spy.calls
    if spec.step not in ("session", "selftest"):
        assert spy.calls == []
    if case.startswith("extdata_"):
        assert spy.calls == [], "ONNX Runtime saw a model with hostile external data"
    _serving(device)


def test_corpus_is_large_enough_and_ids_readable() -> None:
    assert len(CASES) >= 60
    assert all(c.replace("_", "").isalnum() for c in CASES)


def test_legit_external_data_installs_and_serves(device: Device, good_members: list[Member],
                                                 signing_key: PrivateKey, mlp_model: Path, tmp_path: Path,
                                                 trusted: TrustedKeys) -> None:
    """The external-data check refuses only what it should: weights in a listed file next to the model serve."""
    from edgefleet.sdk.bundle import extract_bundle
    from edgefleet.sdk.runtime import Model

    kit = Kit(list(good_members), signing_key, tmp_path / "ext.efb", device.root, mlp_model)
    path = _ext(kit, "w1.bin")
    dest = tmp_path / "installed"
    extract_bundle(path, trusted, dest)
    model = Model.open(dest, trusted)
    assert model.self_test().ok
    assert model.run({"x": X})["probs"].shape == (2, 4)


def test_external_data_through_symlinked_directory_planted_after_install_is_refused(
    good_members: list[Member], signing_key: PrivateKey, mlp_model: Path, tmp_path: Path, trusted: TrustedKeys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Outside damage to an installed bundle: its weights directory swapped for a symlink to an identical copy
    elsewhere. Hashes still match (read_installed follows the directory link), so only the path check can tell."""
    import shutil

    from edgefleet.sdk.bundle import extract_bundle
    from edgefleet.sdk.errors import UnsafeArchiveError
    from edgefleet.sdk.runtime import Model

    kit = Kit(list(good_members), signing_key, tmp_path / "ext.efb", tmp_path, mlp_model)
    payload = {n: b for n, b in kit.payload().items() if n != MODEL}
    payload[MODEL] = _external_model(mlp_model, "weights/w1.bin")
    payload["model/weights/w1.bin"] = _w1_bytes(mlp_model)
    dest = tmp_path / "installed"
    extract_bundle(kit.signed(payload), trusted, dest)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(dest / "model" / "weights", elsewhere)
    (dest / "model" / "weights").symlink_to(elsewhere, target_is_directory=True)
    read_installed(dest, trusted, verify_files=True)  # the hashes alone do not see it
    spy = SessionSpy(onnxruntime.InferenceSession, trusted)
    monkeypatch.setattr(onnxruntime, "InferenceSession", spy)
    with pytest.raises(UnsafeArchiveError, match="resolves outside the bundle"):
        Model.open(dest, trusted)
    assert spy.calls == []


def test_external_data_symlink_planted_after_install_is_refused(
    good_members: list[Member], signing_key: PrivateKey, mlp_model: Path, tmp_path: Path, trusted: TrustedKeys,
) -> None:
    """A symlink planted next to the model, named by an (unlisted) location: refused before ORT follows it."""
    from edgefleet.sdk.bundle import extract_bundle
    from edgefleet.sdk.errors import UnsafeArchiveError
    from edgefleet.sdk.runtime import Model

    kit = Kit(list(good_members), signing_key, tmp_path / "ext.efb", tmp_path, mlp_model)
    dest = tmp_path / "installed"
    extract_bundle(_ext(kit, "planted.bin", data_name=None), trusted, dest)
    (tmp_path / "secret.bin").write_bytes(_w1_bytes(mlp_model))
    (dest / "model" / "planted.bin").symlink_to(tmp_path / "secret.bin")
    with pytest.raises(UnsafeArchiveError, match="not a file the signed manifest lists"):
        Model.open(dest, trusted)


def test_every_builtin_profile_passes_the_ort_options_check() -> None:
    """No false refusals: the providers and session entries every built-in profile writes into its bundles."""
    from edgefleet.devices.profile import load_profiles
    from edgefleet.sdk._ort_options import check_ort_options

    profiles = load_profiles()
    assert len(profiles) >= 5
    for name, p in profiles.items():
        check_ort_options(((pc.name, pc.options) for pc in p.providers), p.session.config_entries, name)
    # and what the packager adds for OpenVINO precision (packager/planning.py): load_config as a JSON string
    check_ort_options([("OpenVINOExecutionProvider", {"device_type": "CPU", "cache_dir": "{cache_dir}/openvino",
                        "load_config": '{"CPU": {"INFERENCE_PRECISION_HINT": "f16"}}'})], {}, "packager")
