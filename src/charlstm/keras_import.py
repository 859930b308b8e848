"""Keras checkpoints to charlstm checkpoints, above all the tutorial's ``weights-improvement-*.hdf5``.

Files are read with h5py (no Keras, nothing unpickled):

* Keras 2 / tf.keras ``.hdf5``/``.h5`` full-model saves (``model.save``, ``ModelCheckpoint``):
  the architecture comes from the ``model_config`` JSON attribute, the weights from
  ``/model_weights/<layer>/``, located through each layer group's ``weight_names`` attribute;
* Keras 2 weights-only saves (``save_weights``): the same layer groups at the root; the
  architecture is inferred from layer names and weight shapes, and what they cannot tell
  (window length, activations) comes from ``ImportOptions`` or documented defaults;
* Keras 3 ``.weights.h5`` (``layers/<class>[_<n>]/[cell/]vars/<i>``) and ``.keras`` zip
  archives (``config.json`` + ``model.weights.h5``), laid out as Keras 3's ``saving_lib`` does.

Supported networks: stacked LSTM layers, Dropout layers, one Dense output layer (softmax, or
linear optionally followed by ``Activation('softmax')``). Keras LSTM kernels are
(input, 4·units) with gates i, f, c, o, which is PyTorch's order, so they are transposed but
not reordered; Keras' single bias goes to ``bias_ih`` and ``bias_hh`` stays zero.

The vocabulary is rebuilt as the tutorial built it, ``sorted(set(text.lower()))`` of the
training text, read as ``TextReading`` says; its size must equal the Dense layer's.
"""

from __future__ import annotations

import codecs
import io
import json
import math
import re
import zipfile
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from itertools import product
from pathlib import Path

import numpy as np
import torch

from .checkpoint import TrainedModel, seed_windows
from .corpus import (Normalization, check_input_file, read_text_bytes, strip_gutenberg_boilerplate,
                     undecodable)
from .errors import CharLSTMError
from .model import CharLSTM, ModelConfig
from .records import KerasRecord, TrainingRecord
from .evaluate import score_after
from .vocab import Vocab

DEFAULT_WINDOW = 100                      # the tutorial's seq_length
DEFAULT_DROPOUT = 0.2                     # the tutorial's, when a file names Dropout layers but no rate
MAX_WEIGHT_ELEMENTS = 1 << 28             # per tensor; refuses absurd shapes before reading them
MAX_CONFIG_BYTES = 16 * 1024 * 1024
MAX_ARCHIVE_WEIGHTS_BYTES = 2 * 1024**3
CHECK_CHARS = 256                         # characters scored after import as a sanity check
CHECK_BUDGET = CHECK_CHARS * DEFAULT_WINDOW  # window steps that check may cost
UTF8_BOM = "\ufeff"
BYTES_BOM = "\xef\xbb\xbf"                # the UTF-8 BOM read byte by byte
SUPPORTED_LAYERS = ("LSTM", "Dropout", "Dense", "Activation", "InputLayer")
KERAS3_CONTAINER_NAMES = {"LSTM": "lstm", "Dense": "dense", "Dropout": "dropout", "Activation": "activation"}
# Keras' activation names to ModelConfig's; 'hard_sigmoid' depends on the Keras version.
ACTIVATION_NAMES = {"sigmoid": "sigmoid", "tanh": "tanh", "relu": "relu", "linear": "linear"}
KERAS_ACTIVATIONS = ("hard_sigmoid", *ACTIVATION_NAMES)  # every activation an imported LSTM may name
KERAS_SUFFIXES = (".weights.h5", ".hdf5", ".h5", ".keras")
CHECKPOINT_NAME_RE = re.compile(r"-(\d+)-(\d+(?:\.\d+)?)(?:-[^-]*)?$")


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class TextReading:
    """How the training script read its text, which decides the vocabulary.

    The default reproduces the tutorial's model files: UTF-8, a leading byte-order mark
    dropped (it is an encoding mark, not text), line ends as they are, lowercased.
    """

    lowercase: bool = True
    keep_bom: bool = False             # Python 3's open() without encoding keeps it as '\ufeff'
    universal_newlines: bool = False   # Python 3's text mode turns CRLF and CR into LF
    as_bytes: bool = False             # Python 2's str: one character per byte
    encoding: str = "utf-8"            # what open(..., encoding=) the script used

    def decode(self, raw: bytes, source: str = "the text") -> str:
        if self.as_bytes:
            text = raw.decode("latin-1")  # byte b becomes chr(b): sorted() order = byte order
            bom = BYTES_BOM
        else:
            try:
                text = raw.decode(self.encoding)
            except UnicodeDecodeError as err:
                if codecs.lookup(self.encoding).name != "utf-8":
                    raise undecodable(source, self.encoding, err.start) from None
                raise CharLSTMError(
                    f"{source}: not valid UTF-8 (byte {err.start}); pass its --encoding (e.g. cp1252), or if "
                    "the model was trained with Python 2, which read bytes, pass --bytes"
                ) from None
            bom = UTF8_BOM
        if not self.keep_bom and text.startswith(bom):
            text = text[len(bom):]
        if self.universal_newlines:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if self.lowercase:
            # Python 2's str.lower() changes ASCII letters only
            text = _ascii_lower(text) if self.as_bytes else text.lower()
        return text

    def options(self) -> list[str]:
        """The command-line options that select this reading."""
        flags = [(not self.lowercase, "--keep-case"), (self.keep_bom, "--keep-bom"),
                 (self.universal_newlines, "--universal-newlines"), (self.as_bytes, "--bytes"),
                 (codecs.lookup(self.encoding).name != "utf-8", f"--encoding {self.encoding}")]
        return [name for on, name in flags if on]

    def describe(self) -> str:
        return ", ".join([
            "one character per byte" if self.as_bytes else "UTF-8",
            "BOM kept" if self.keep_bom else "BOM dropped",
            "CRLF/CR turned into LF" if self.universal_newlines else "line ends as in the file",
            "lowercased" if self.lowercase else "case kept",
        ])

    def alternatives(self) -> list["TextReading"]:
        every = (TextReading(*flags) for flags in product((True, False), repeat=4))
        return [r for r in every if r != self]


def _ascii_lower(text: str) -> str:
    return text.translate({c: c + 32 for c in range(ord("A"), ord("Z") + 1)})


@dataclass(frozen=True)
class ImportOptions:
    """What the file may not say, and how to read the training text."""

    reading: TextReading = field(default_factory=TextReading)
    window: int | None = None                  # default: the model's input shape, else 100
    activation: str | None = None              # Keras name; default: the config's, else tanh
    recurrent_activation: str | None = None    # Keras name; default: the config's, else Keras' default
    seed: int = 0                              # for the stored seed windows
    check_chars: int = CHECK_CHARS             # 0 = skip the sanity check


# --------------------------------------------------------------------------- reading files


@dataclass
class KerasLayer:
    """One layer as the file describes it: kind, name, Keras config (empty if unknown), weights."""

    kind: str                                  # 'lstm', 'dense', 'dropout' or 'activation'
    name: str
    config: dict = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class KerasNetwork:
    layers: list[KerasLayer]
    file_format: str
    keras_version: str
    window: int | None = None
    has_config: bool = True

    @property
    def keras_major(self) -> int:
        match = re.match(r"(\d+)", self.keras_version)
        return int(match.group(1)) if match else 2


def read_keras_file(path: str | Path) -> KerasNetwork:
    """Parse a Keras checkpoint file into layers with weights (NumPy float32 arrays)."""
    path = Path(path)
    check_input_file(path, "Keras file")
    h5py = _h5py()
    with ExitStack() as stack:
        if h5py.is_hdf5(str(path)):
            return _read_hdf5(_open_h5(stack, h5py, str(path), path), path)
        if zipfile.is_zipfile(path):
            config, weights_file, version = _open_keras_archive(path)
            handle = _open_h5(stack, h5py, weights_file, path)
            return _keras3_network(handle, path, config, version, "Keras 3 .keras archive")
    raise CharLSTMError(
        f"{path}: not an HDF5 file (nor a Keras 3 .keras archive), so not a Keras checkpoint; "
        "expected a file such as weights-improvement-19-1.9465.hdf5"
    )


def _h5py():
    try:
        import h5py
    except ImportError:
        raise CharLSTMError("reading Keras files needs h5py: pip install 'charlstm[keras]'") from None
    return h5py


def _open_h5(stack: ExitStack, h5py, source, path: Path):
    try:
        return stack.enter_context(h5py.File(source, "r"))
    except OSError as err:
        raise CharLSTMError(f"{path}: damaged HDF5 file ({err})") from None


def _read_hdf5(handle, path: Path) -> KerasNetwork:
    try:
        attrs = handle.attrs
        version = _text(attrs.get("keras_version", "")) or _text(
            handle["model_weights"].attrs.get("keras_version", "") if "model_weights" in handle else "")
        if "model_config" in attrs:
            config = _parse_json(_text(attrs["model_config"]), path, "model_config")
            if "model_weights" not in handle:
                raise CharLSTMError(f"{path}: a Keras model without weights (no /model_weights group)")
            return _keras2_network(handle["model_weights"], path, config, version)
        if "layer_names" in attrs:
            return _keras2_weights_only(handle, path, version)
        if _keras3_layers_group(handle) is not None:
            return _keras3_network(handle, path, None, "3", "Keras 3 .weights.h5 weights-only save")
    except (KeyError, ValueError, TypeError, AttributeError, IndexError, OSError, RuntimeError) as err:
        raise CharLSTMError(f"{path}: unreadable Keras file ({err})") from None
    raise CharLSTMError(
        f"{path}: an HDF5 file, but not a Keras model (no model_config or layer_names attribute, "
        "no layers group)"
    )


def _open_keras_archive(path: Path) -> tuple[dict, io.BytesIO, str]:
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if "config.json" not in names or "model.weights.h5" not in names:
                detail = "its weights are in .npz form, which is not supported" \
                    if "model.weights.npz" in names else "no config.json and model.weights.h5"
                raise CharLSTMError(f"{path}: a zip archive but not a Keras 3 .keras model ({detail})")
            config = _parse_json(_archive_member(archive, "config.json", MAX_CONFIG_BYTES, path),
                                 path, "config.json")
            metadata = {}
            if "metadata.json" in names:
                metadata = _parse_json(_archive_member(archive, "metadata.json", MAX_CONFIG_BYTES, path),
                                       path, "metadata.json")
            weights = io.BytesIO(_archive_member(archive, "model.weights.h5", MAX_ARCHIVE_WEIGHTS_BYTES, path))
    except (zipfile.BadZipFile, OSError) as err:
        raise CharLSTMError(f"{path}: damaged .keras archive ({err})") from None
    version = str(metadata.get("keras_version", "3")) if isinstance(metadata, dict) else "3"
    return config, weights, version


def _archive_member(archive: zipfile.ZipFile, name: str, limit: int, path: Path) -> bytes:
    if archive.getinfo(name).file_size > limit:
        raise CharLSTMError(f"{path}: {name} is larger than {limit} bytes")
    return archive.read(name)


def _parse_json(raw: str | bytes, path: Path, what: str):
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CharLSTMError(f"{path}: {what} is not valid JSON") from None


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _read_weight(dataset, path: Path, label: str) -> np.ndarray:
    if not hasattr(dataset, "shape") or not hasattr(dataset, "dtype"):
        raise CharLSTMError(f"{path}: {label} is not a dataset")
    if dataset.dtype.kind != "f":
        raise CharLSTMError(f"{path}: {label} holds {dataset.dtype}, not floating-point numbers")
    if int(np.prod(dataset.shape, dtype=np.int64)) > MAX_WEIGHT_ELEMENTS:
        raise CharLSTMError(f"{path}: {label} has the implausible shape {tuple(dataset.shape)}")
    array = np.asarray(dataset[()], dtype=np.float32)
    if not np.isfinite(array).all():
        raise CharLSTMError(f"{path}: {label} contains NaN or infinite values")
    return array


# Keras 2 ----------------------------------------------------------------------


def _keras2_network(weights_root, path: Path, config: dict, version: str) -> KerasNetwork:
    layer_configs = _layer_configs(config, path)
    layers = []
    for entry in layer_configs:
        kind, name, layer_config = _classify_config_layer(entry, path)
        if kind is None:
            continue
        weights = _keras2_layer_weights(weights_root, name, path) if kind in ("lstm", "dense") else {}
        layers.append(KerasLayer(kind, name, layer_config, weights))
    return KerasNetwork(layers, _keras2_format_name(version, "full-model save"), version,
                        _window_from_config(config, layer_configs))


def _keras2_weights_only(handle, path: Path, version: str) -> KerasNetwork:
    layers = []
    for raw_name in handle.attrs["layer_names"]:
        name = _text(raw_name)
        weights = _keras2_layer_weights(handle, name, path)
        layers.append(KerasLayer(_kind_from_weights(name, weights, path), name, {}, weights))
    return KerasNetwork(layers, _keras2_format_name(version, "weights-only save"), version,
                        window=None, has_config=False)


def _keras2_format_name(version: str, what: str) -> str:
    return f"Keras {version} {what}" if version else f"Keras {what}"


def _keras2_layer_weights(root, name: str, path: Path) -> dict[str, np.ndarray]:
    if name not in root:
        raise CharLSTMError(f"{path}: no weights for layer {name!r}")
    group = root[name]
    weights = {}
    for raw in group.attrs.get("weight_names", []):
        weight_name = _text(raw)
        key = weight_name.split("/")[-1].split(":")[0]  # 'lstm_1/kernel:0' -> 'kernel'
        if weight_name not in group:
            raise CharLSTMError(f"{path}: layer {name!r} lists weight {weight_name!r} but does not hold it")
        weights[key] = _read_weight(group[weight_name], path, f"weight {weight_name}")
    return weights


def _kind_from_weights(name: str, weights: dict, path: Path) -> str:
    """A weights-only file names its layers but not their types: tell them by their weights."""
    keys = set(weights)
    if "recurrent_kernel" in keys:
        return "lstm"  # the LSTM shape check names GRUs and simple RNNs
    if keys and keys <= {"kernel", "bias"}:
        return "dense"
    if not keys:
        base = name.rsplit("_", 1)[0] if name.rsplit("_", 1)[-1].isdigit() else name
        if base in ("dropout", "activation"):
            return base
    raise CharLSTMError(
        f"{path}: unsupported layer {name!r} (weights: {', '.join(sorted(keys)) or 'none'}); "
        "charlstm imports LSTM, Dropout, Dense and Activation layers"
    )


def _layer_configs(config, path: Path) -> list[dict]:
    if not isinstance(config, dict):
        raise CharLSTMError(f"{path}: the model config is not a JSON object")
    class_name = config.get("class_name")
    inner = config.get("config")
    if class_name not in ("Sequential", "Model", "Functional"):
        raise CharLSTMError(f"{path}: unsupported model type {class_name!r} (Sequential or a chain of layers)")
    layers = inner if isinstance(inner, list) else (inner or {}).get("layers")
    if not isinstance(layers, list) or not all(isinstance(entry, dict) for entry in layers):
        raise CharLSTMError(f"{path}: the model config lists no layers")
    return layers


def _classify_config_layer(entry: dict, path: Path) -> tuple[str | None, str, dict]:
    class_name = entry.get("class_name")
    config = entry.get("config") if isinstance(entry.get("config"), dict) else {}
    name = str(config.get("name") or entry.get("name") or class_name)
    if class_name == "InputLayer":
        return None, name, config
    if class_name not in SUPPORTED_LAYERS:
        raise CharLSTMError(
            f"{path}: unsupported layer type {class_name} ({name}); charlstm imports LSTM, Dropout, "
            "Dense and Activation layers"
        )
    return class_name.lower(), name, config


def _window_from_config(config: dict, layer_configs: list[dict]) -> int | None:
    """The time steps of the model's input shape (None when the model takes any length)."""
    candidates = []
    for entry in layer_configs:
        cfg = entry.get("config") if isinstance(entry.get("config"), dict) else {}
        candidates += [cfg.get("batch_input_shape"), cfg.get("batch_shape"),
                       (entry.get("build_config") or {}).get("input_shape")]
    inner = config.get("config")
    if isinstance(inner, dict):
        candidates.append(inner.get("build_input_shape"))
    for shape in candidates:
        if isinstance(shape, list) and len(shape) == 3:
            return shape[1] if isinstance(shape[1], int) and shape[1] > 0 else None
    return None


# Keras 3 ----------------------------------------------------------------------


def _keras3_layers_group(handle):
    # Keras 3 keeps each layer under 'layers/'; files converted from tf.keras 2.13 under
    # '_layer_checkpoint_dependencies/'.
    for name in ("layers", "_layer_checkpoint_dependencies"):
        if name in handle and hasattr(handle[name], "keys"):
            return handle[name]
    return None


def _keras3_network(handle, path: Path, config: dict | None, version: str, file_format: str) -> KerasNetwork:
    root = _keras3_layers_group(handle)
    if root is None:
        raise CharLSTMError(f"{path}: the weights file holds no layers group")
    try:
        if config is None:
            specs = [(kind, name, {}) for kind, name in _keras3_names_without_config(root, path)]
            window = None
        else:
            layer_configs = _layer_configs(config, path)
            specs = _keras3_names_from_config(layer_configs, path)
            window = _window_from_config(config, layer_configs)
        layers = [KerasLayer(kind, str(cfg.get("name", container)), cfg,
                             _keras3_layer_weights(root, kind, container, path))
                  for kind, container, cfg in specs]
    except (KeyError, ValueError, TypeError, AttributeError, IndexError, OSError, RuntimeError) as err:
        raise CharLSTMError(f"{path}: unreadable Keras 3 weights ({err})") from None
    return KerasNetwork(layers, file_format, version, window, has_config=config is not None)


def _keras3_names_from_config(layer_configs: list[dict], path: Path) -> list[tuple[str, str, dict]]:
    """Keras 3 stores layer k of a class under the class's snake-case name, then name_1, name_2 ..."""
    counts: dict[str, int] = {}
    specs = []
    for entry in layer_configs:
        kind, _, layer_config = _classify_config_layer(entry, path)
        if kind is None:
            continue
        base = KERAS3_CONTAINER_NAMES[entry["class_name"]]
        n = counts.get(base, -1) + 1
        counts[base] = n
        specs.append((kind, base if n == 0 else f"{base}_{n}", layer_config))
    return specs


def _keras3_names_without_config(root, path: Path) -> list[tuple[str, str]]:
    """Without a config the layer order is lost; the supported networks are LSTMs, then Dense."""
    found = []
    for name in root.keys():
        match = re.fullmatch(r"([a-z0-9_]+?)(?:_(\d+))?", name)
        base, index = (match.group(1), int(match.group(2) or 0)) if match else (name, 0)
        if base not in KERAS3_CONTAINER_NAMES.values():
            raise CharLSTMError(
                f"{path}: unsupported layer {name!r}; charlstm imports LSTM, Dropout, Dense and "
                "Activation layers"
            )
        found.append((("lstm", "dropout", "dense", "activation").index(base), index, base, name))
    return [(base, name) for _, _, base, name in sorted(found)]


def _keras3_layer_weights(root, kind: str, container: str, path: Path) -> dict[str, np.ndarray]:
    if kind not in ("lstm", "dense"):
        return {}
    if container not in root:
        raise CharLSTMError(f"{path}: no weights for layer {container!r}")
    group = root[container]["cell"] if kind == "lstm" else root[container]
    variables = group["vars"] if "vars" in group else {}
    names = ("kernel", "recurrent_kernel", "bias") if kind == "lstm" else ("kernel", "bias")
    return {name: _read_weight(variables[str(i)], path, f"{container} weight {i}")
            for i, name in enumerate(names) if str(i) in variables}


# --------------------------------------------------------------------------- network to model


@dataclass
class ImportedModel:
    """The network as a charlstm model, with a one-line description and the assumptions made."""

    model: CharLSTM
    description: str
    notes: list[str]


def build_model(network: KerasNetwork, options: ImportOptions, path: Path) -> ImportedModel:
    kinds = [layer.kind for layer in network.layers]
    lstms = [layer for layer in network.layers if layer.kind == "lstm"]
    denses = [layer for layer in network.layers if layer.kind == "dense"]
    if not lstms or len(denses) != 1:
        raise CharLSTMError(
            f"{path}: charlstm imports LSTM layers followed by one Dense output layer; this model has "
            f"{len(lstms)} LSTM and {len(denses)} Dense layers"
        )
    dense_at = kinds.index("dense")
    if kinds[dense_at + 1:].count("lstm") or "lstm" not in kinds[:dense_at]:
        raise CharLSTMError(f"{path}: the Dense layer must come after all LSTM layers")
    notes: list[str] = []
    activation, recurrent = _lstm_activations(network, lstms, options, path, notes)
    dense = denses[0]
    units = _check_lstm_shapes(lstms, path)
    vocab_size = _check_dense(dense, network.layers[dense_at + 1:], units, path)
    input_kind = _input_kind(lstms[0], vocab_size, path)
    config = ModelConfig(
        vocab_size=vocab_size,
        input=input_kind,
        layers=len(lstms),
        units=units,
        dropout=_dropout_rate(network.layers[kinds.index("lstm"):], notes),
        input_dropout=_dropout_rate(network.layers[:kinds.index("lstm")], notes),
        recurrent_activation=recurrent,
        activation=activation,
        target="all" if lstms[-1].config.get("return_sequences") else "last",
        window=_window(network, options, notes),
    )
    model = CharLSTM(config)
    model.load_state_dict(_state_dict(lstms, dense))
    return ImportedModel(model.eval(), _describe(network, config), notes)


def _lstm_activations(network: KerasNetwork, lstms: list[KerasLayer], options: ImportOptions,
                      path: Path, notes: list[str]) -> tuple[str, str]:
    for layer in lstms:
        if layer.config.get("go_backwards"):
            raise CharLSTMError(f"{path}: LSTM {layer.name} runs backwards (go_backwards), which is not supported")
    pairs = set()
    for layer in lstms:
        activation = options.activation or layer.config.get("activation", "tanh")
        recurrent = options.recurrent_activation or layer.config.get(
            "recurrent_activation", _default_recurrent_activation(network))
        pairs.add((_activation_name(activation, network, path, layer.name),
                   _activation_name(recurrent, network, path, layer.name)))
    if len(pairs) > 1:
        raise CharLSTMError(f"{path}: LSTM layers with different activations are not supported")
    if not network.has_config and not options.recurrent_activation:
        default = _default_recurrent_activation(network)
        notes.append(f"the file does not say which recurrent activation it uses: assumed {default}, "
                     f"the default of Keras {network.keras_version or 'unknown version'} "
                     "(--recurrent-activation to change)")
    return pairs.pop()


def _default_recurrent_activation(network: KerasNetwork) -> str:
    """Keras' own default: hard_sigmoid up to Keras 2.2 (the tutorial's era), then sigmoid."""
    version = network.keras_version
    if not version:
        return "hard_sigmoid"
    if network.keras_major >= 3 or "tf" in version:
        return "sigmoid"
    major_minor = tuple(int(n) for n in re.findall(r"\d+", version)[:2])
    return "sigmoid" if major_minor >= (2, 3) else "hard_sigmoid"


def _activation_name(value, network: KerasNetwork, path: Path, layer: str) -> str:
    if value is None:
        return "linear"
    if value == "hard_sigmoid":
        return "hard_sigmoid_keras3" if network.keras_major >= 3 else "hard_sigmoid"
    if isinstance(value, str) and value in ACTIVATION_NAMES:
        return ACTIVATION_NAMES[value]
    supported = ", ".join(sorted(KERAS_ACTIVATIONS))
    raise CharLSTMError(f"{path}: layer {layer} uses the activation {value!r}; supported: {supported}")


def _check_lstm_shapes(lstms: list[KerasLayer], path: Path) -> int:
    units = None
    previous_units = None
    for layer in lstms:
        w = layer.weights
        if "kernel" not in w or "recurrent_kernel" not in w:
            raise CharLSTMError(
                f"{path}: LSTM {layer.name} has weights {', '.join(sorted(w)) or 'none'}, not Keras 2's "
                "kernel, recurrent_kernel and bias (files from Keras 1 are not supported)"
            )
        rec = w["recurrent_kernel"]
        if rec.ndim != 2 or rec.shape[1] != 4 * rec.shape[0]:
            raise CharLSTMError(
                f"{path}: layer {layer.name} has a recurrent kernel of shape {rec.shape}, not an LSTM's "
                "(units, 4·units): GRU and SimpleRNN layers are not supported"
            )
        h = rec.shape[0]
        kernel, bias = w["kernel"], w.get("bias")
        if kernel.ndim != 2 or kernel.shape[1] != 4 * h or (bias is not None and bias.shape != (4 * h,)):
            raise CharLSTMError(f"{path}: LSTM {layer.name} has inconsistent weight shapes")
        if previous_units is not None and kernel.shape[0] != previous_units:
            raise CharLSTMError(f"{path}: LSTM {layer.name} takes {kernel.shape[0]} inputs, the layer "
                                f"below gives {previous_units}")
        if units is not None and h != units:
            raise CharLSTMError(f"{path}: LSTM layers of different sizes ({units}, {h}) are not supported")
        units = previous_units = h
    return units


def _check_dense(dense: KerasLayer, after: list[KerasLayer], units: int, path: Path) -> int:
    kernel, bias = dense.weights.get("kernel"), dense.weights.get("bias")
    if kernel is None or kernel.ndim != 2 or kernel.shape[0] != units:
        shape = None if kernel is None else kernel.shape
        raise CharLSTMError(f"{path}: Dense {dense.name} kernel has shape {shape}, expected ({units}, vocabulary)")
    if bias is not None and bias.shape != (kernel.shape[1],):
        raise CharLSTMError(f"{path}: Dense {dense.name} bias does not match its kernel")
    activations = [dense.config.get("activation", "softmax")]
    activations += [layer.config.get("activation", "softmax") for layer in after if layer.kind == "activation"]
    real = [a for a in activations if a != "linear"]
    if real not in ([], ["softmax"]):
        raise CharLSTMError(
            f"{path}: the output layer's activation {'/'.join(map(str, real))} is not supported (softmax or linear)"
        )
    return int(kernel.shape[1])


def _input_kind(first: KerasLayer, vocab_size: int, path: Path) -> str:
    features = first.weights["kernel"].shape[0]
    if features == 1:
        return "scaled"
    if features == vocab_size:
        return "onehot"
    raise CharLSTMError(
        f"{path}: the first LSTM takes {features} input features; charlstm imports the tutorial's one "
        f"(id / vocabulary size) or one-hot vectors ({vocab_size})"
    )


def _dropout_rate(layers: list[KerasLayer], notes: list[str]) -> float:
    """The Dropout layers' rate (it matters only when fine-tuning the imported model)."""
    rates = [layer.config.get("rate") for layer in layers if layer.kind == "dropout"]
    if not rates:
        return 0.0
    known = [float(r) for r in rates if isinstance(r, (int, float))]
    if not known:
        notes.append(f"dropout rate not stored in the file: using {DEFAULT_DROPOUT} for fine-tuning")
        return DEFAULT_DROPOUT
    return max(known)


def _window(network: KerasNetwork, options: ImportOptions, notes: list[str]) -> int:
    if options.window is not None:
        return options.window
    if network.window is not None:
        return network.window
    notes.append(f"the file does not fix the window length: using {DEFAULT_WINDOW}, the tutorial's "
                 "(--window to change)")
    return DEFAULT_WINDOW


def _state_dict(lstms: list[KerasLayer], dense: KerasLayer) -> dict[str, torch.Tensor]:
    state = {}
    for i, layer in enumerate(lstms):
        w = layer.weights
        units = w["recurrent_kernel"].shape[0]
        bias = w.get("bias", np.zeros(4 * units, dtype=np.float32))
        state[f"lstms.{i}.weight_ih_l0"] = torch.from_numpy(np.ascontiguousarray(w["kernel"].T))
        state[f"lstms.{i}.weight_hh_l0"] = torch.from_numpy(np.ascontiguousarray(w["recurrent_kernel"].T))
        state[f"lstms.{i}.bias_ih_l0"] = torch.from_numpy(bias)
        state[f"lstms.{i}.bias_hh_l0"] = torch.zeros(4 * units)
    kernel = dense.weights["kernel"]
    state["head.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.T))
    state["head.bias"] = torch.from_numpy(dense.weights.get("bias", np.zeros(kernel.shape[1], dtype=np.float32)))
    return state


def _describe(network: KerasNetwork, config: ModelConfig) -> str:
    parts = []
    for layer in network.layers:
        if layer.kind == "lstm":
            parts.append(f"LSTM({layer.weights['recurrent_kernel'].shape[0]})")
        elif layer.kind == "dropout":
            rate = layer.config.get("rate")
            parts.append(f"Dropout({rate})" if rate is not None else "Dropout")
        elif layer.kind == "dense":
            activation = layer.config.get("activation")
            parts.append(f"Dense({config.vocab_size}, {activation})" if activation else f"Dense({config.vocab_size})")
        else:
            parts.append(f"Activation({layer.config.get('activation', 'softmax')})")
    inputs = f"id / {config.vocab_size}" if config.input == "scaled" else "one-hot"
    return (f"{network.file_format}: {' -> '.join(parts)}; input {inputs}, window {config.window}, "
            f"recurrent activation {config.recurrent_activation}, activation {config.activation}")


# --------------------------------------------------------------------------- text


def read_training_text(path: str | Path, reading: TextReading) -> tuple[str, bytes]:
    """The training text as the Keras script saw it, and the raw bytes (for diagnostics)."""
    raw = read_text_bytes(Path(path))
    return reading.decode(raw, str(path)), raw


def vocab_for_model(path: Path, text: str, raw: bytes, reading: TextReading, expected: int) -> Vocab:
    """``sorted(set(text))``, which must have as many characters as the model predicts."""
    vocab = Vocab.from_text(text)
    if len(vocab) != expected:
        raise CharLSTMError(_mismatch_message(path, raw, reading, len(vocab), expected))
    return vocab


def _mismatch_message(path: Path, raw: bytes, reading: TextReading, found: int, expected: int) -> str:
    advice = "no way of reading this file gives that many, so it is probably a different copy or edition"
    readings = _readings_with_size(raw, reading, expected)
    if readings:
        shown = [" ".join(r.options()) or "no reading options" for r in readings[:3]]
        advice = f"read with {' or with '.join(shown)} it has {expected}, so try that"
    text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
    if strip_gutenberg_boilerplate(text) != text:
        advice += " (it still holds the Project Gutenberg header or licence, which the tutorial deleted by hand)"
    return (
        f"{path} has {found} distinct characters but the model's Dense layer predicts {expected}: not the text "
        f"the model was trained on, as read ({reading.describe()}); a different copy of the text, a byte-order "
        f"mark (BOM) or CRLF line ends change the count; {advice}"
    )


def _readings_with_size(raw: bytes, reading: TextReading, size: int) -> list[TextReading]:
    """Other readings of ``raw`` whose vocabulary has ``size`` characters, fewest options first,
    one per distinct vocabulary (so that options which change nothing in this file are not offered)."""
    by_vocab: dict[tuple[str, ...], TextReading] = {}
    for alternative in sorted(reading.alternatives(), key=lambda r: len(r.options())):
        try:
            chars = tuple(sorted(set(alternative.decode(raw))))
        except CharLSTMError:
            continue
        if len(chars) == size:
            by_vocab.setdefault(chars, alternative)
    return list(by_vocab.values())


# --------------------------------------------------------------------------- the whole import


@dataclass
class ImportResult:
    trained: TrainedModel
    description: str
    notes: list[str]
    check_loss: float | None = None
    check_chars: int = 0


def import_keras(path: str | Path, text_path: str | Path, options: ImportOptions = ImportOptions()) -> ImportResult:
    """Read a Keras checkpoint and its training text; return a native charlstm model."""
    path, text_path = Path(path), Path(text_path)
    try:
        network = read_keras_file(path)
        imported = build_model(network, options, path)
    except (KeyError, ValueError, TypeError, AttributeError, IndexError) as err:
        # a config of the wrong shape (a string where Keras writes an object, say)
        raise CharLSTMError(f"{path}: malformed Keras model config ({type(err).__name__}: {err})") from None
    config = imported.model.config
    text, raw = read_training_text(text_path, options.reading)
    vocab = vocab_for_model(text_path, text, raw, options.reading, config.vocab_size)
    ids = vocab.encode(text)
    trained = TrainedModel(
        model=imported.model,
        vocab=vocab,
        normalization=Normalization(lowercase=options.reading.lowercase, strip_punctuation=False,
                                    strip_gutenberg=False),
        training=_training_record(path, text_path, network, imported, options),
        seed_windows=seed_windows(vocab, ids, config.window, options.seed),
    )
    result = ImportResult(trained, imported.description, imported.notes)
    if options.check_chars > 0 and len(ids) > config.window + 1:
        result.check_loss, result.check_chars = _check_loss(imported.model, ids, options.check_chars)
        trained.training.keras.check_nats_per_char = round(result.check_loss, 6)
        _refuse_if_worse_than_chance(text_path, result.check_loss, len(vocab))
    return result


def _refuse_if_worse_than_chance(text_path: Path, loss: float, vocab_size: int) -> None:
    """A text with as many distinct characters as the model's but other ones (another edition)
    maps characters to the wrong ids; the model then predicts it worse than uniform guessing."""
    chance = math.log(vocab_size)
    if loss > chance:
        raise CharLSTMError(
            f"{text_path}: the model predicts this text worse than chance ({loss:.2f} nats/char, chance is "
            f"{chance:.2f}), so its characters do not map to the ids the model was trained with; it is "
            "probably another copy or edition with the same number of distinct characters "
            "(--no-check imports it anyway)"
        )


def _training_record(path: Path, text_path: Path, network: KerasNetwork, imported: ImportedModel,
                     options: ImportOptions) -> TrainingRecord:
    keras = KerasRecord(file=path.name, format=network.file_format, keras_version=network.keras_version,
                        architecture=imported.description, text=text_path.name,
                        text_reading=asdict(options.reading), notes=imported.notes)
    return TrainingRecord(keras=keras, **epoch_and_loss_from_name(path.name))


def keras_stem(name: str) -> str:
    """The file name without its Keras suffix (``.hdf5``, ``.h5``, ``.weights.h5``, ``.keras``)."""
    for suffix in KERAS_SUFFIXES:
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return Path(name).stem


def epoch_and_loss_from_name(name: str) -> dict:
    """``weights-improvement-19-1.9465.hdf5`` -> {'epoch': 19, 'loss': 1.9465}; {} if not parseable."""
    match = CHECKPOINT_NAME_RE.search(keras_stem(name))
    if not match:
        return {}
    return {"epoch": int(match.group(1)), "loss": float(match.group(2))}


def _check_loss(model: CharLSTM, ids: np.ndarray, count: int) -> tuple[float, int]:
    """Nats/char on ``count`` characters from the middle of the text: a wrong vocabulary shows."""
    window = model.config.window
    # each scored character re-reads its window: a huge --window gets fewer checked characters
    count = min(count, len(ids) - window - 1, max(1, CHECK_BUDGET // window))
    start = max(0, (len(ids) - window - count) // 2)
    context, scored = ids[start:start + window], ids[start + window:start + window + count]
    return score_after(model, context, scored), len(scored)

