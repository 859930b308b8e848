"""Hostile and broken input files, shared by the tests (small samples) and
``benchmarks/reliability.py`` (all of them).

Each generator yields ``(label, bytes)``; a loader must refuse every one with a ``CharLSTMError``
that names the file, or (for the few harmless mutations) load it, and never crash, hang or
allocate what a header merely claims.
"""

from __future__ import annotations

import io
import json
import random
import struct
import zipfile
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import save as safetensors_bytes

from charlstm import checkpoint
from charlstm.checkpoint import CHECKSUM_KEY, FORMAT, TrainedModel, content_checksum
from charlstm.corpus import Normalization
from charlstm.errors import CharLSTMError
from charlstm.model import CharLSTM, ModelConfig
from charlstm.records import TrainingRecord
from charlstm.vocab import Vocab

Case = tuple[str, bytes]


def tiny_trained(units: int = 8, with_resume: bool = False) -> TrainedModel:
    vocab = Vocab.from_text("abcdefgh \n")
    config = ModelConfig(vocab_size=len(vocab), units=units, embedding_dim=4, layers=1)
    torch.manual_seed(0)
    training: dict = {"epoch": 1, "history": [{"epoch": 1, "loss": 2.0, "val_loss": 2.1, "chars_per_s": 1.0,
                                               "elapsed": 1.0, "lr": 0.001, "step": 3}]}
    extra = {}
    if with_resume:
        from charlstm.train_state import pack_rng
        rng_tensors, rng_meta = pack_rng()
        extra = {**rng_tensors}
        training["resume"] = {"position": {"epoch": 2, "batch": 0, "step": 3}, "rng": rng_meta,
                              "optimizer": {"type": "AdamW", "param_groups": []}, "run_id": "abc"}
    return TrainedModel(CharLSTM(config), vocab, Normalization(), training=TrainingRecord.from_json(training),
                        seed_windows=["abc"], extra=extra)


def checkpoint_bytes(trained: TrainedModel | None = None) -> bytes:
    trained = trained or tiny_trained()
    tensors = {checkpoint.MODEL_PREFIX + k: v.contiguous() for k, v in trained.model.state_dict().items()}
    tensors.update(trained.extra)
    return _assemble(tensors, trained.metadata())


def _assemble(tensors: dict, meta: dict | str, checksum: bool = True) -> bytes:
    text = meta if isinstance(meta, str) else json.dumps(meta)
    header = {FORMAT: text}
    if checksum:
        header[CHECKSUM_KEY] = content_checksum(text, tensors)
    return safetensors_bytes(tensors, metadata=header)


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def truncations(data: bytes, step: int = 1) -> Iterator[Case]:
    for cut in range(0, len(data), step):
        yield f"truncated to {cut} bytes", data[:cut]


def bit_flips(data: bytes, count: int, seed: int = 0) -> Iterator[Case]:
    rng = random.Random(seed)
    for _ in range(count):
        bit = rng.randrange(len(data) * 8)
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        where = "header" if bit // 8 < 8 + struct.unpack("<Q", data[:8])[0] else "tensor data"
        yield f"bit {bit} flipped ({where})", bytes(flipped)


def crafted_checkpoints(base: bytes) -> Iterator[Case]:
    """Structural attacks on the safetensors container and on the metadata behind a valid checksum."""
    header, body = _split(base)
    names = [k for k in header if k != "__metadata__"]
    first = names[0]
    yield "2^60-byte header claimed", struct.pack("<Q", 2**60) + base[8:]
    yield "header length past the end", struct.pack("<Q", len(base)) + base[8:]
    yield "100 MB of metadata", _join({**header, "__metadata__": {**header["__metadata__"],
                                                                  "pad": "x" * (100 << 20)}}, body)
    huge = {**header, first: {**header[first], "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}}
    yield "a 10^12-element tensor claimed", _join(huge, body)
    past = {**header, first: {**header[first], "data_offsets": [0, len(body) + 4096]}}
    yield "offsets past the end", _join(past, body)
    if len(names) > 1:
        second = names[1]
        overlap = {**header, second: {**header[second], "data_offsets": header[first]["data_offsets"]}}
        yield "overlapping offsets", _join(overlap, body)
    yield "unknown dtype", _join({**header, first: {**header[first], "dtype": "Q99"}}, body)
    yield "negative shape", _join({**header, first: {**header[first], "shape": [-1]}}, body)
    yield "header is not JSON", struct.pack("<Q", 16) + b"{not json at all" + body
    yield "header is a JSON list", struct.pack("<Q", 7) + b"[1,2,3]" + body
    yield "pickle given as a checkpoint", _pickle_bytes()
    yield "zip given as a checkpoint", _zip_bytes()
    yield "HDF5 signature given as a checkpoint", b"\x89HDF\r\n\x1a\n" + bytes(4000)
    yield "text given as a checkpoint", b"hello, this is not a model, just a few words of text\n" * 20
    yield "empty file", b""
    yield from _metadata_attacks(base)
    yield from _tensor_attacks(base)


def _pickle_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buffer)
    return buffer.getvalue()


def _zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("config.json", "{}")
    return buffer.getvalue()


def _tensors_and_meta(base: bytes) -> tuple[dict, dict]:
    from safetensors.torch import load as safetensors_load

    header, _ = _split(base)
    return safetensors_load(base), json.loads(header["__metadata__"][FORMAT])


def _metadata_attacks(base: bytes) -> Iterator[Case]:
    tensors, meta = _tensors_and_meta(base)

    def with_meta(change: Callable[[dict], object]) -> bytes:
        copy = json.loads(json.dumps(meta))
        change(copy)
        return _assemble(tensors, copy)

    yield "metadata is not JSON", _assemble(tensors, "{'format': 'charlstm'")
    yield "metadata is a JSON list", _assemble(tensors, "[1, 2]")
    yield "metadata nested 100,000 deep", _assemble(tensors, "[" * 100_000 + "]" * 100_000)
    yield "checksum missing", _assemble(tensors, meta, checksum=False)
    attacks: dict[str, Callable[[dict], object]] = {
        "version null": lambda m: m.__setitem__("version", None),
        "version a string": lambda m: m.__setitem__("version", "2"),
        "version 99": lambda m: m.__setitem__("version", 99),
        "normalization a list": lambda m: m.__setitem__("normalization", [1, 2]),
        "normalization a string": lambda m: m.__setitem__("normalization", "lowercase"),
        "normalization values not booleans": lambda m: m.__setitem__("normalization", {"lowercase": "yes"}),
        "vocab not JSON": lambda m: m.__setitem__("vocab", "[not json"),
        "vocab a number": lambda m: m.__setitem__("vocab", 7),
        "vocab of multi-character strings": lambda m: m.__setitem__("vocab", ["ab"] * len(m["vocab"])),
        "vocab with duplicates": lambda m: m.__setitem__("vocab", ["a"] * len(m["vocab"])),
        "vocab disagrees with the weights": lambda m: m.__setitem__("vocab", m["vocab"][:-1]),
        "model a string": lambda m: m.__setitem__("model", "lstm"),
        "model units a string": lambda m: m["model"].__setitem__("units", "8"),
        "model units 10^9": lambda m: m["model"].__setitem__("units", 10**9),
        "model with an unknown setting": lambda m: m["model"].__setitem__("evil", 1),
        "model without vocab_size": lambda m: m["model"].pop("vocab_size"),
        "model dropout NaN": lambda m: m["model"].__setitem__("dropout", float("nan")),
        "training a list": lambda m: m.__setitem__("training", []),
        "history a dict": lambda m: m["training"].__setitem__("history", {"a": 1}),
        "history loss a string": lambda m: m["training"]["history"][0].__setitem__("loss", "low"),
        "data a string": lambda m: m["training"].__setitem__("data", "alice"),
        "data sources not text": lambda m: m["training"].__setitem__("data", {"sources": [1, 2]}),
        "baselines a dict": lambda m: m["training"].__setitem__("baselines", {"gzip": 1}),
        "baselines rows malformed": lambda m: m["training"].__setitem__("baselines", [{"name": 3}]),
        "config a list": lambda m: m["training"].__setitem__("config", [1]),
        "epoch a string": lambda m: m["training"].__setitem__("epoch", "one"),
        "resume a string": lambda m: m["training"].__setitem__("resume", "yes"),
        "position malformed": lambda m: m["training"].__setitem__("resume", {"position": {"epoch": "x"}}),
        "position a list": lambda m: m["training"].__setitem__("resume", {"position": [1]}),
        "optimizer groups malformed": lambda m: m["training"].__setitem__(
            "resume", {"optimizer": {"param_groups": "all"}}),
        "rng a list": lambda m: m["training"].__setitem__("resume", {"rng": [1]}),
        "seed windows a string": lambda m: m.__setitem__("seed_windows", "abc"),
    }
    for label, change in attacks.items():
        yield label, with_meta(change)


def _tensor_attacks(base: bytes) -> Iterator[Case]:
    tensors, meta = _tensors_and_meta(base)
    weight = next(k for k in tensors if k.startswith(checkpoint.MODEL_PREFIX))

    def with_tensors(change: Callable[[dict], object]) -> bytes:
        copy = dict(tensors)
        change(copy)
        return _assemble(copy, meta)

    yield "a weight missing", with_tensors(lambda t: t.pop(weight))
    yield "an extra weight", with_tensors(lambda t: t.__setitem__("model.evil", torch.zeros(3)))
    yield "a weight of the wrong shape", with_tensors(lambda t: t.__setitem__(weight, torch.zeros(2, 2)))
    yield "a weight of integers", with_tensors(lambda t: t.__setitem__(weight, tensors[weight].to(torch.int32)))
    yield "a weight of booleans", with_tensors(lambda t: t.__setitem__(weight, tensors[weight] > 0))
    yield "a weight of NaN", with_tensors(lambda t: t.__setitem__(weight, torch.full_like(tensors[weight], float("nan"))))
    yield "a weight of infinities", with_tensors(lambda t: t.__setitem__(weight, torch.full_like(tensors[weight], float("inf"))))
    flipped = bytearray(base)
    flipped[-5] ^= 0x40  # inside the last tensor's bytes, behind an intact header
    yield "a byte of the weights changed", bytes(flipped)


# --------------------------------------------------------------------------- text and Keras inputs


def hostile_texts() -> Iterator[Case]:
    """Byte strings given as ``--text``: each either trains-able text or a one-line refusal."""
    yield "one byte", b"a"
    yield "NUL bytes", b"hello\x00world" * 10
    yield "a NUL after 64 KiB", b"a" * 70_000 + b"\x00" + b"b" * 10
    yield "a lone surrogate (UTF-8 encoded, as Python's surrogatepass writes it)", b"ab\xed\xa0\x80cd" * 20
    yield "Latin-1", "café au lait, naïve".encode("latin-1") * 10
    rng = random.Random(1)
    yield "arbitrary bytes", bytes(rng.randrange(256) for _ in range(4000))
    yield "only whitespace", b" \n\t\r\n" * 30
    yield "UTF-16 with BOM", "hello world, some text".encode("utf-16") * 10
    yield "a BOM alone", b"\xef\xbb\xbf"
    yield "only CRLF", b"\r\n" * 50
    yield "one distinct character", b"a" * 500
    yield "every Unicode category", _every_category().encode("utf-8")


def _every_category() -> str:
    import unicodedata

    seen: dict[str, str] = {}
    for code in range(0x110000):
        if 0xD800 <= code <= 0xDFFF:
            continue  # surrogates cannot be UTF-8 encoded
        category = unicodedata.category(chr(code))
        if category not in seen and code != 0:
            seen[category] = chr(code)
    return ("".join(seen.values()) + " the quick brown fox\n") * 20


def hostile_keras_files(real: bytes) -> Iterator[Case]:
    """Keras files: truncated, foreign containers, and HDF5 files with the wrong content."""
    for cut in (0, 7, 100, 2048, len(real) // 3, len(real) // 2, len(real) - 1):
        yield f"truncated to {cut} bytes", real[:cut]
    yield "a zip named .hdf5", _zip_bytes()
    yield "a text file named .hdf5", b"this is not HDF5\n" * 100
    yield "a pickle named .hdf5", _pickle_bytes()
    yield from _crafted_hdf5()


def _crafted_hdf5() -> Iterator[Case]:
    import h5py
    import numpy as np

    def build(fill: Callable) -> bytes:
        buffer = io.BytesIO()
        with h5py.File(buffer, "w") as handle:
            fill(handle)
        return buffer.getvalue()

    def sequential(layers: list, weights: Callable | None = None) -> Callable:
        def fill(handle):
            handle.attrs["keras_version"] = "2.0.0"
            handle.attrs["model_config"] = json.dumps({"class_name": "Sequential", "config": layers})
            group = handle.create_group("model_weights")
            if weights:
                weights(group)
        return fill

    lstm = {"class_name": "LSTM", "config": {"name": "lstm_1", "units": 4,
                                             "batch_input_shape": [None, 10, 1]}}
    dense = {"class_name": "Dense", "config": {"name": "dense_1", "activation": "softmax"}}

    def lstm_weights(kernel_shape, dtype="f4"):
        def fill(group):
            layer = group.create_group("lstm_1")
            names = [b"lstm_1/kernel:0", b"lstm_1/recurrent_kernel:0", b"lstm_1/bias:0"]
            layer.attrs["weight_names"] = names
            inner = layer.create_group("lstm_1")
            inner.create_dataset("kernel:0", shape=kernel_shape, dtype=dtype)
            inner.create_dataset("recurrent_kernel:0", data=np.zeros((4, 16), "f4"))
            inner.create_dataset("bias:0", data=np.zeros(16, "f4"))
            dense_group = group.create_group("dense_1")
            dense_group.attrs["weight_names"] = [b"dense_1/kernel:0", b"dense_1/bias:0"]
            dense_inner = dense_group.create_group("dense_1")
            dense_inner.create_dataset("kernel:0", data=np.zeros((4, 5), "f4"))
            dense_inner.create_dataset("bias:0", data=np.zeros(5, "f4"))
        return fill

    yield "model_config whose config is a string", build(
        lambda h: (h.attrs.__setitem__("model_config", json.dumps({"class_name": "Sequential", "config": "x"})),
                   h.create_group("model_weights")))
    yield "model_config not JSON", build(lambda h: (h.attrs.__setitem__("model_config", "{oops"),
                                                    h.create_group("model_weights")))
    yield "a Conv2D layer", build(sequential([{"class_name": "Conv2D", "config": {"name": "c"}}]))
    yield "layers a dict", build(sequential({"a": 1}))
    yield "an LSTM without weights", build(sequential([lstm, dense]))
    yield "a kernel of 10^12 elements (chunked, never written)", build(sequential(
        [lstm, dense], lstm_weights((10**6, 10**6))))
    yield "a kernel of strings", build(sequential([lstm, dense], lstm_weights((1, 16), dtype=h5py.string_dtype())))
    yield "a kernel of integers", build(sequential([lstm, dense], lstm_weights((1, 16), dtype="i4")))
    yield "a kernel of the wrong shape", build(sequential([lstm, dense], lstm_weights((3, 7))))
    yield "an HDF5 file with nothing in it", build(lambda h: None)


def load_outcome(load: Callable[[Path], object], path: Path) -> tuple[str, str]:
    """('refused', message) for a CharLSTMError naming the file, ('loaded', ''), or
    ('crash', description) for anything else (the outcome that must never happen)."""
    try:
        load(path)
    except CharLSTMError as err:
        message = str(err)
        if "\n" in message or str(path) not in message:
            return "crash", f"unclear error: {message!r}"
        return "refused", message
    except Exception as err:  # noqa: BLE001 - classifying is the point
        return "crash", f"{type(err).__name__}: {err}"
    return "loaded", ""
