"""Importing Keras checkpoints: the tutorial's real .hdf5 file, and files built here with h5py
in the layouts Keras 2 and Keras 3 write.

The reference is an independent NumPy implementation of the Keras LSTM and Dense-softmax
equations that reads the HDF5 files itself; the imported charlstm model must agree with it.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from charlstm import checkpoint
from charlstm.cli import main
from charlstm.corpus import strip_gutenberg_boilerplate
from charlstm.generate import Generator
from charlstm.keras_import import ImportOptions, TextReading, epoch_and_loss_from_name, import_keras
from charlstm.model import ModelConfig

TOLERANCE = 1e-5

# --------------------------------------------------------------------------- NumPy reference


def keras2_hard_sigmoid(x: np.ndarray) -> np.ndarray:
    return np.clip(np.float32(0.2) * x + np.float32(0.5), np.float32(0.0), np.float32(1.0))


def keras3_hard_sigmoid(x: np.ndarray) -> np.ndarray:
    return np.minimum(np.maximum(x + np.float32(3.0), np.float32(0.0)), np.float32(6.0)) / np.float32(6.0)


def logistic(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


GATES = {"hard_sigmoid": keras2_hard_sigmoid, "hard_sigmoid_keras3": keras3_hard_sigmoid, "sigmoid": logistic}


@dataclass
class RefLSTM:
    kernel: np.ndarray      # (input, 4 units), gates i, f, c, o
    recurrent: np.ndarray   # (units, 4 units)
    bias: np.ndarray        # (4 units,)
    gate: str = "hard_sigmoid"

    def run(self, x: np.ndarray) -> np.ndarray:
        """x (B, T, input) -> all hidden states (B, T, units), as Keras' LSTM computes them."""
        units = self.recurrent.shape[0]
        gate = GATES[self.gate]
        h = np.zeros((x.shape[0], units), np.float32)
        c = np.zeros_like(h)
        outputs = []
        for t in range(x.shape[1]):
            z = (x[:, t] @ self.kernel + self.bias) + h @ self.recurrent
            i = gate(z[:, :units])
            f = gate(z[:, units:2 * units])
            candidate = np.tanh(z[:, 2 * units:3 * units])
            o = gate(z[:, 3 * units:])
            c = f * c + i * candidate
            h = o * np.tanh(c)
            outputs.append(h)
        return np.stack(outputs, axis=1)


@dataclass
class Reference:
    lstms: list[RefLSTM]
    dense_kernel: np.ndarray
    dense_bias: np.ndarray
    onehot: bool = False

    @property
    def n_vocab(self) -> int:
        return self.dense_kernel.shape[1]

    def inputs(self, windows: np.ndarray) -> np.ndarray:
        if self.onehot:
            return np.eye(self.n_vocab, dtype=np.float32)[windows]
        # the tutorial: X = X / float(n_vocab), fed to Keras as float32
        return (windows[..., None] / float(self.n_vocab)).astype(np.float32)

    def probabilities(self, windows: np.ndarray) -> np.ndarray:
        x = self.inputs(np.asarray(windows))
        for layer in self.lstms:
            x = layer.run(x)
        logits = x[:, -1] @ self.dense_kernel + self.dense_bias
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def greedy(self, seed: list[int], length: int) -> list[int]:
        """The tutorial's loop: predict, argmax, append, drop the first id."""
        pattern = list(seed)
        out = []
        for _ in range(length):
            index = int(np.argmax(self.probabilities(np.array([pattern]))[0]))
            out.append(index)
            pattern = pattern[1:] + [index]
        return out


def tutorial_vocabulary(text_path: Path) -> list[str]:
    """What the tutorial's script built: sorted(set(raw_text.lower())), the BOM not being text."""
    return sorted(set(text_path.read_bytes().decode("utf-8-sig").lower()))


def model_probabilities(trained, windows: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        logits, _ = trained.model(torch.from_numpy(np.asarray(windows, dtype=np.int64)), last_only=True)
    return logits.softmax(dim=-1).numpy()


# --------------------------------------------------------------------------- the real tutorial file


@pytest.fixture(scope="module")
def tutorial_reference(keras_checkpoint) -> Reference:
    with h5py.File(keras_checkpoint, "r") as f:
        config = json.loads(f.attrs["model_config"])
        lstm_config = config["config"][0]["config"]
        assert lstm_config["recurrent_activation"] == "hard_sigmoid"
        weights = f["model_weights"]
        lstm = weights["lstm_1"]["lstm_1"]
        dense = weights["dense_1"]["dense_1"]
        return Reference(
            [RefLSTM(lstm["kernel:0"][()], lstm["recurrent_kernel:0"][()], lstm["bias:0"][()])],
            dense["kernel:0"][()], dense["bias:0"][()],
        )


@pytest.fixture(scope="module")
def tutorial_ids(keras_text, tutorial_reference) -> np.ndarray:
    chars = tutorial_vocabulary(keras_text)
    assert len(chars) == tutorial_reference.n_vocab == 45
    index = {c: i for i, c in enumerate(chars)}
    return np.array([index[c] for c in keras_text.read_bytes().decode("utf-8-sig").lower()])


@pytest.fixture(scope="module")
def imported(keras_checkpoint, keras_text):
    return import_keras(keras_checkpoint, keras_text, ImportOptions(check_chars=0)).trained


def random_windows_of(ids: np.ndarray, count: int, window: int, seed: int) -> np.ndarray:
    starts = np.random.default_rng(seed).integers(0, len(ids) - window, size=count)
    return np.stack([ids[s:s + window] for s in starts])


def test_real_checkpoint_probabilities_match_keras2_equations(imported, tutorial_reference, tutorial_ids):
    windows = random_windows_of(tutorial_ids, 256, 100, seed=7)
    expected = tutorial_reference.probabilities(windows)
    got = model_probabilities(imported, windows)
    assert np.abs(got - expected).max() <= TOLERANCE
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()


def test_real_checkpoint_architecture_and_vocabulary(imported, keras_text):
    cfg = imported.config
    assert (cfg.input, cfg.layers, cfg.units, cfg.window, cfg.target) == ("scaled", 1, 256, 100, "last")
    assert (cfg.recurrent_activation, cfg.activation, cfg.vocab_size, cfg.dropout) == ("hard_sigmoid", "tanh", 45, 0.2)
    assert list(imported.vocab.chars) == tutorial_vocabulary(keras_text)
    assert imported.normalization.lowercase and not imported.normalization.strip_gutenberg
    assert imported.training.epoch == 19 and imported.training.loss == 1.9465
    assert imported.training.imported_from == "keras"
    assert len(imported.seed_windows) > 50
    assert all(len(seed) == 100 for seed in imported.seed_windows)


@pytest.mark.slow
def test_real_checkpoint_greedy_window_generation_matches_reference(imported, tutorial_reference, tutorial_ids):
    seed = tutorial_ids[5000:5100].tolist()
    expected = tutorial_reference.greedy(seed, 1000)
    prime = imported.vocab.decode(seed)
    generated = Generator(imported).generate(prime, 1000, mode="window")
    assert generated == imported.vocab.decode(expected)


def test_saved_checkpoint_loads_as_a_native_one(imported, tmp_path, tutorial_ids):
    path = checkpoint.save(tmp_path / "alice.safetensors", imported)
    loaded = checkpoint.load(path)
    assert loaded.config == imported.config
    assert loaded.vocab == imported.vocab
    assert loaded.training.keras.file == "weights-improvement-19-1.9465.hdf5"
    windows = random_windows_of(tutorial_ids, 8, 100, seed=1)
    assert np.array_equal(model_probabilities(loaded, windows), model_probabilities(imported, windows))


# --------------------------------------------------------------------------- the CLI end to end


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_import_generate_info_evaluate(tmp_path, capsys, keras_checkpoint, keras_text):
    out = tmp_path / "alice-keras.safetensors"
    code, stdout, _ = run_cli(capsys, "import-keras", keras_checkpoint, "--text", keras_text, "-o", out)
    assert code == 0
    assert "LSTM(256) -> Dropout(0.2) -> Dense(45, softmax)" in stdout
    assert "vocabulary: 45 characters" in stdout and f"wrote {out}" in stdout
    check = float(stdout.split("check: ")[1].split()[0])
    assert check < 2.5  # a right vocabulary scores near the file's 1.9465; a wrong one far worse

    code, stdout, _ = run_cli(capsys, "generate", out, "--mode", "window", "--length", "60", "--seed", "3")
    assert code == 0 and stdout.startswith("Seed:\n") and stdout.rstrip().endswith("Done.")

    code, stdout, _ = run_cli(capsys, "info", out)
    assert code == 0 and "imported from Keras: weights-improvement-19-1.9465.hdf5" in stdout
    assert "epochs trained: 19" in stdout

    sample = tmp_path / "sample.txt"
    sample.write_text(keras_text.read_text(encoding="utf-8-sig")[20000:20400], encoding="utf-8")
    code, stdout, _ = run_cli(capsys, "evaluate", out, "--text", sample)
    assert code == 0 and "nats/char" in stdout
    assert float(stdout.split("model: ")[1].split()[0]) < 2.5  # nats/char


def test_cli_default_output_name(tmp_path, capsys, monkeypatch, keras_checkpoint, keras_text):
    monkeypatch.chdir(tmp_path)
    code, stdout, _ = run_cli(capsys, "import-keras", keras_checkpoint, "--text", keras_text)
    assert code == 0
    assert (tmp_path / "weights-improvement-19-1.9465.safetensors").is_file()


# --------------------------------------------------------------------------- files built here


def random_lstm(rng, inputs: int, units: int, gate: str = "hard_sigmoid") -> RefLSTM:
    return RefLSTM(rng.normal(0, 0.6, (inputs, 4 * units)).astype(np.float32),
                   rng.normal(0, 0.3, (units, 4 * units)).astype(np.float32),
                   rng.normal(0, 0.5, 4 * units).astype(np.float32), gate)


def random_reference(n_vocab: int, units: int, layers: int, gate: str, seed: int = 0,
                     onehot: bool = False) -> Reference:
    rng = np.random.default_rng(seed)
    lstms = [random_lstm(rng, n_vocab if onehot else 1, units, gate)]
    lstms += [random_lstm(rng, units, units, gate) for _ in range(layers - 1)]
    return Reference(lstms, rng.normal(0, 1.0, (units, n_vocab)).astype(np.float32),
                     rng.normal(0, 0.2, n_vocab).astype(np.float32), onehot)


def keras2_layers(ref: Reference, window: int, gate: str) -> list[tuple[str, str, dict, dict]]:
    """(class, name, config, weights) for LSTM -> Dropout -> ... -> Dense(softmax), Keras 2 style."""
    layers = []
    features = ref.lstms[0].kernel.shape[0]
    for k, lstm in enumerate(ref.lstms, start=1):
        config = {"units": lstm.recurrent.shape[0], "activation": "tanh", "recurrent_activation": gate,
                  "return_sequences": k < len(ref.lstms), "go_backwards": False}
        if k == 1:
            config["batch_input_shape"] = [None, window, features]
        layers.append(("LSTM", f"lstm_{k}", config,
                       {"kernel": lstm.kernel, "recurrent_kernel": lstm.recurrent, "bias": lstm.bias}))
        layers.append(("Dropout", f"dropout_{k}", {"rate": 0.2}, {}))
    layers.append(("Dense", "dense_1", {"units": ref.n_vocab, "activation": "softmax"},
                   {"kernel": ref.dense_kernel, "bias": ref.dense_bias}))
    return layers


def write_keras2_file(path: Path, layers, weights_only: bool = False, version: str = "2.0.0") -> Path:
    """The layout Keras 2's model.save / save_weights write (see the real tutorial file)."""
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = version
        f.attrs["backend"] = "tensorflow"
        if weights_only:
            root = f
        else:
            model_config = {"class_name": "Sequential",
                            "config": [{"class_name": c, "config": {"name": n, **cfg}} for c, n, cfg, _ in layers]}
            f.attrs["model_config"] = json.dumps(model_config)
            root = f.create_group("model_weights")
        root.attrs["layer_names"] = np.array([name.encode() for _, name, _, _ in layers])
        for _, name, _, weights in layers:
            group = root.create_group(name)
            names = [f"{name}/{key}:0" for key in weights]
            group.attrs["weight_names"] = np.array([n.encode() for n in names]) if names else np.array([])
            for weight_name, array in zip(names, weights.values()):
                group.create_dataset(weight_name, data=array)
    return path


@pytest.fixture(scope="module")
def small_ids(keras_text) -> np.ndarray:
    chars = tutorial_vocabulary(keras_text)
    index = {c: i for i, c in enumerate(chars)}
    return np.array([index[c] for c in keras_text.read_bytes().decode("utf-8-sig").lower()[:20000]])


def assert_matches(trained, ref: Reference, ids: np.ndarray, window: int, greedy_chars: int = 100) -> None:
    windows = random_windows_of(ids, 96, window, seed=3)
    assert np.abs(model_probabilities(trained, windows) - ref.probabilities(windows)).max() <= TOLERANCE
    seed = ids[1000:1000 + window].tolist()
    generated = Generator(trained).generate(trained.vocab.decode(seed), greedy_chars, mode="window")
    assert generated == trained.vocab.decode(ref.greedy(seed, greedy_chars))


def test_weights_only_save_of_the_real_model(tmp_path, keras_checkpoint, keras_text, imported, tutorial_reference):
    ref = tutorial_reference
    layers = keras2_layers(ref, 100, "hard_sigmoid")
    path = write_keras2_file(tmp_path / "weights.h5", layers, weights_only=True)
    result = import_keras(path, keras_text, ImportOptions(check_chars=0))
    assert result.trained.config == imported.config
    for key, value in imported.model.state_dict().items():
        assert torch.equal(result.trained.model.state_dict()[key], value)
    notes = " ".join(result.notes)
    assert "assumed hard_sigmoid" in notes and "using 100" in notes


@pytest.mark.parametrize("gate", ["hard_sigmoid", "sigmoid"])
def test_two_layer_keras2_model(tmp_path, keras_text, small_ids, gate):
    ref = random_reference(45, 24, layers=2, gate=gate, seed=11)
    path = write_keras2_file(tmp_path / "two-layers-05-1.2345.hdf5", keras2_layers(ref, 30, gate))
    result = import_keras(path, keras_text, ImportOptions(check_chars=0))
    cfg = result.trained.config
    assert (cfg.layers, cfg.units, cfg.window, cfg.recurrent_activation) == (2, 24, 30, gate)
    assert result.trained.training.epoch == 5
    assert_matches(result.trained, ref, small_ids, 30)


def test_two_layer_weights_only_with_stated_window(tmp_path, keras_text, small_ids):
    ref = random_reference(45, 16, layers=2, gate="sigmoid", seed=5)
    path = write_keras2_file(tmp_path / "w.h5", keras2_layers(ref, 20, "sigmoid"), weights_only=True,
                             version="2.3.1")
    result = import_keras(path, keras_text, ImportOptions(window=20, check_chars=0))
    assert result.trained.config.recurrent_activation == "sigmoid"  # Keras 2.3's default
    assert_matches(result.trained, ref, small_ids, 20)


def test_onehot_input_model(tmp_path, keras_text, small_ids):
    ref = random_reference(45, 16, layers=1, gate="hard_sigmoid", seed=2, onehot=True)
    path = write_keras2_file(tmp_path / "onehot.hdf5", keras2_layers(ref, 25, "hard_sigmoid"))
    result = import_keras(path, keras_text, ImportOptions(check_chars=0))
    assert result.trained.config.input == "onehot"
    assert_matches(result.trained, ref, small_ids, 25)


# Keras 3: layers/<class>[_<n>]/[cell/]vars/<i>, as keras/src/saving/saving_lib.py writes it


def write_keras3_weights(target, ref: Reference) -> None:
    with h5py.File(target, "w") as f:
        f.create_group("vars")
        for k, lstm in enumerate(ref.lstms):
            name = "lstm" if k == 0 else f"lstm_{k}"
            f.create_group(f"layers/{name}/vars")
            cell = f.create_group(f"layers/{name}/cell/vars")
            cell["0"], cell["1"], cell["2"] = lstm.kernel, lstm.recurrent, lstm.bias
            f.create_group(f"layers/{'dropout' if k == 0 else f'dropout_{k}'}/vars")
        dense = f.create_group("layers/dense/vars")
        dense["0"], dense["1"] = ref.dense_kernel, ref.dense_bias


def keras3_config(ref: Reference, window: int, gate: str) -> dict:
    def layer(class_name: str, config: dict) -> dict:
        return {"module": "keras.layers", "class_name": class_name, "config": config, "registered_name": None}

    layers = [layer("InputLayer", {"batch_shape": [None, window, 1], "dtype": "float32", "name": "input_layer"})]
    for k, lstm in enumerate(ref.lstms):
        layers.append(layer("LSTM", {"name": f"lstm_{k}", "units": lstm.recurrent.shape[0], "activation": "tanh",
                                     "recurrent_activation": gate, "return_sequences": k < len(ref.lstms) - 1}))
        layers.append(layer("Dropout", {"name": f"dropout_{k}", "rate": 0.1}))
    layers.append(layer("Dense", {"name": "dense", "units": ref.n_vocab, "activation": "softmax"}))
    return {"module": "keras", "class_name": "Sequential", "config": {"name": "sequential", "layers": layers}}


def test_keras3_keras_archive(tmp_path, keras_text, small_ids):
    ref = random_reference(45, 16, layers=2, gate="hard_sigmoid_keras3", seed=9)
    weights = io.BytesIO()
    write_keras3_weights(weights, ref)
    path = tmp_path / "model.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.json", json.dumps({"keras_version": "3.6.0"}))
        archive.writestr("config.json", json.dumps(keras3_config(ref, 30, "hard_sigmoid")))
        archive.writestr("model.weights.h5", weights.getvalue())
    result = import_keras(path, keras_text, ImportOptions(check_chars=0))
    cfg = result.trained.config
    assert (cfg.layers, cfg.window, cfg.recurrent_activation, cfg.dropout) == (2, 30, "hard_sigmoid_keras3", 0.1)
    assert_matches(result.trained, ref, small_ids, 30)


def test_keras3_weights_h5(tmp_path, keras_text, small_ids):
    ref = random_reference(45, 16, layers=2, gate="sigmoid", seed=4)
    path = tmp_path / "model.weights.h5"
    write_keras3_weights(path, ref)
    result = import_keras(path, keras_text, ImportOptions(window=24, check_chars=0))
    assert result.trained.config.recurrent_activation == "sigmoid"  # Keras 3's default
    assert_matches(result.trained, ref, small_ids, 24)


# --------------------------------------------------------------------------- reading the text


def test_crlf_copy_is_refused_with_the_option_that_fits(tmp_path, capsys, keras_checkpoint, keras_text, imported):
    crlf = tmp_path / "wonderland-crlf.txt"
    crlf.write_bytes(keras_text.read_bytes().replace(b"\n", b"\r\n"))
    code, _, err = run_cli(capsys, "import-keras", keras_checkpoint, "--text", crlf, "-o", tmp_path / "x.safetensors")
    assert code == 2 and err.count("\n") == 1
    assert "46 distinct characters" in err and "predicts 45" in err and "--universal-newlines" in err
    result = import_keras(keras_checkpoint, crlf, ImportOptions(TextReading(universal_newlines=True), check_chars=0))
    assert result.trained.vocab == imported.vocab


def test_python2_byte_reading(tmp_path, capsys):
    text = tmp_path / "quotes.txt"
    text.write_text("\ufeff" + "Alice said ‘oh’ to the Rabbit.\n" * 40, encoding="utf-8")
    as_bytes = sorted(set(text.read_bytes().decode("latin-1").lower()))
    ref = random_reference(len(as_bytes), 8, layers=1, gate="hard_sigmoid", seed=1)
    path = write_keras2_file(tmp_path / "py2.hdf5", keras2_layers(ref, 10, "hard_sigmoid"))
    code, _, err = run_cli(capsys, "import-keras", path, "--text", text, "-o", tmp_path / "y.safetensors")
    assert code == 2 and "read with --keep-bom --bytes it has" in err
    result = import_keras(path, text, ImportOptions(TextReading(keep_bom=True, as_bytes=True), check_chars=0))
    assert list(result.trained.vocab.chars) == as_bytes
    assert "\xef" in result.trained.vocab.chars and "a" in result.trained.vocab.chars


# --------------------------------------------------------------------------- errors


def assert_one_line_error(capsys, *args, expect: list[str]) -> str:
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    assert err.startswith("charlstm: error: ") and err.count("\n") == 1, err
    for fragment in expect:
        assert fragment in err, err
    return err


def test_error_not_hdf5(tmp_path, capsys, keras_text):
    assert_one_line_error(capsys, "import-keras", keras_text, "--text", keras_text, expect=["not an HDF5 file"])


def test_error_hdf5_but_not_keras(tmp_path, capsys, keras_text):
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as f:
        f["numbers"] = np.arange(10.0)
    assert_one_line_error(capsys, "import-keras", path, "--text", keras_text,
                          expect=["an HDF5 file, but not a Keras model"])


def test_error_unsupported_layer_named(tmp_path, capsys, keras_text):
    ref = random_reference(45, 8, layers=1, gate="hard_sigmoid")
    layers = keras2_layers(ref, 10, "hard_sigmoid")
    layers[0] = ("GRU", "gru_1", layers[0][2], {"kernel": np.zeros((1, 24), np.float32)})
    path = write_keras2_file(tmp_path / "gru.hdf5", layers)
    assert_one_line_error(capsys, "import-keras", path, "--text", keras_text,
                          expect=["unsupported layer type GRU (gru_1)"])
    embedding = [("Embedding", "embedding_1", {}, {"embeddings": np.zeros((45, 8), np.float32)})]
    path = write_keras2_file(tmp_path / "emb.h5", embedding + layers[1:], weights_only=True)
    assert_one_line_error(capsys, "import-keras", path, "--text", keras_text,
                          expect=["unsupported layer 'embedding_1'"])


def test_error_text_mismatch(capsys, keras_checkpoint, pg11):
    err = assert_one_line_error(capsys, "import-keras", keras_checkpoint, "--text", pg11,
                                expect=["has 59 distinct characters", "predicts 45", "BOM", "CRLF"])
    assert "different copy" in err and "Project Gutenberg header" in err


def test_error_same_size_but_other_characters(tmp_path, capsys, keras_checkpoint, pg11):
    # pg11.txt without its Gutenberg header and licence also has 45 distinct characters, but straight
    # quotes and digits instead of curly quotes: the ids mean other characters.
    book = strip_gutenberg_boilerplate(pg11.read_bytes().decode("utf-8-sig").replace("\r\n", "\n"))
    other = tmp_path / "other-edition.txt"
    other.write_text(book, encoding="utf-8")
    assert len(set(book.lower())) == 45
    out = tmp_path / "other.safetensors"
    assert_one_line_error(capsys, "import-keras", keras_checkpoint, "--text", other, "-o", out,
                          expect=["worse than chance", "--no-check"])
    assert not out.exists()
    code, _, _ = run_cli(capsys, "import-keras", keras_checkpoint, "--text", other, "-o", out, "--no-check")
    assert code == 0 and out.is_file()


def test_error_missing_and_damaged_files(tmp_path, capsys, keras_checkpoint, keras_text):
    assert_one_line_error(capsys, "import-keras", tmp_path / "none.hdf5", "--text", keras_text,
                          expect=["no such file"])
    assert_one_line_error(capsys, "import-keras", keras_checkpoint, "--text", tmp_path / "none.txt",
                          expect=["no such file"])
    truncated = tmp_path / "truncated.hdf5"
    truncated.write_bytes(keras_checkpoint.read_bytes()[:200_000])
    assert_one_line_error(capsys, "import-keras", truncated, "--text", keras_text, expect=[str(truncated)])


# --------------------------------------------------------------------------- small pieces


def test_epoch_and_loss_from_file_names():
    assert epoch_and_loss_from_name("weights-improvement-19-1.9465.hdf5") == {"epoch": 19, "loss": 1.9465}
    assert epoch_and_loss_from_name("weights-improvement-47-1.2219-bigger.hdf5") == {"epoch": 47, "loss": 1.2219}
    assert epoch_and_loss_from_name("model.weights.h5") == {}


def test_old_configs_without_activation_still_load():
    data = ModelConfig(vocab_size=10, recurrent_activation="hard_sigmoid").to_dict()
    del data["activation"]
    assert ModelConfig.from_dict(data).activation == "tanh"
