"""Checkpoints: self-contained, atomic, validated on load."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from charlstm import checkpoint
from charlstm.checkpoint import TrainedModel, checkpoint_name
from charlstm.corpus import Normalization
from charlstm.errors import CharLSTMError
from charlstm.model import CharLSTM, ModelConfig
from charlstm.records import TrainingRecord
from charlstm.vocab import Vocab


def _trained(**model_kw) -> TrainedModel:
    vocab = Vocab.from_text("abcdefg \n")
    config = ModelConfig(vocab_size=len(vocab), units=16, embedding_dim=8, **model_kw)
    return TrainedModel(CharLSTM(config), vocab, Normalization(lowercase=False),
                        training=TrainingRecord(epoch=3), seed_windows=["abc"])


@pytest.mark.parametrize("kw", [{}, {"input": "scaled", "target": "last", "layers": 1},
                                {"recurrent_activation": "hard_sigmoid", "input": "onehot"}])
def test_round_trip_keeps_everything(tmp_path, kw):
    trained = _trained(**kw)
    path = checkpoint.save(tmp_path / "m.safetensors", trained)
    loaded = checkpoint.load(path)
    assert loaded.config == trained.config and loaded.vocab == trained.vocab
    assert loaded.normalization == trained.normalization
    assert loaded.training == TrainingRecord(epoch=3) and loaded.seed_windows == ["abc"]
    ids = torch.tensor([[1, 2, 3, 4]])
    trained.model.eval()
    assert torch.equal(trained.model(ids)[0], loaded.model(ids)[0])


def test_a_record_without_a_text_fingerprint_loads(tmp_path):
    """scripts/train_base.py records its data without a fingerprint: saving and shipping such a
    model must give a file that loads, as --init english loads the shipped base."""
    trained = _trained()
    trained.training = TrainingRecord.from_json({"data": {"sources": ["a.txt"], "characters": 9}})
    assert trained.training.to_json()["data"]["fingerprint"] is None
    loaded = checkpoint.load(checkpoint.save(tmp_path / "m.safetensors", trained))
    assert loaded.training.data.sources == ["a.txt"] and loaded.training.data.fingerprint is None


def test_template_names_like_keras():
    assert checkpoint_name("weights-improvement-{epoch:02d}-{loss:.4f}", 1, 2.71828) == \
        "weights-improvement-01-2.7183.safetensors"
    assert checkpoint_name("weights-improvement-{epoch:02d}-{loss:.4f}-bigger", 12, 1.5) == \
        "weights-improvement-12-1.5000-bigger.safetensors"
    with pytest.raises(CharLSTMError, match="checkpoint-template"):
        checkpoint_name("{nope}", 1, 1.0)


def test_no_temporary_files_are_left(tmp_path):
    checkpoint.save(tmp_path / "m.safetensors", _trained())
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_missing_file(tmp_path):
    with pytest.raises(CharLSTMError, match="no such checkpoint"):
        checkpoint.load(tmp_path / "nope.safetensors")


def test_truncated_file(tmp_path):
    path = checkpoint.save(tmp_path / "m.safetensors", _trained())
    data = path.read_bytes()
    for cut, message in ((4, "too short"), (100, "truncated"), (len(data) // 2, "truncated"),
                         (len(data) - 3, "truncated")):
        path.write_bytes(data[:cut])
        with pytest.raises(CharLSTMError, match=message):
            checkpoint.load(path)


def test_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("hello, this is not a model at all, just words and more words")
    with pytest.raises(CharLSTMError, match="not a charlstm checkpoint"):
        checkpoint.load(path)


def test_foreign_safetensors_file(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CharLSTMError, match="not a charlstm checkpoint"):
        checkpoint.load(path)


def _rewrite(path, mutate_meta=None, mutate_tensors=None):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["charlstm"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if mutate_meta:
        mutate_meta(meta)
    if mutate_tensors:
        mutate_tensors(tensors)
    # a crafted file carries a valid checksum: the checks behind it must hold on their own
    text = json.dumps(meta)
    save_file(tensors, str(path), metadata={"charlstm": text,
                                            checkpoint.CHECKSUM_KEY: checkpoint.content_checksum(text, tensors)})


def test_wrong_shape_is_refused(tmp_path):
    path = checkpoint.save(tmp_path / "m.safetensors", _trained())
    _rewrite(path, mutate_tensors=lambda t: t.__setitem__("model.head.bias", torch.zeros(99)))
    with pytest.raises(CharLSTMError, match="shape"):
        checkpoint.load(path)


def test_absurd_config_is_refused(tmp_path):
    path = checkpoint.save(tmp_path / "m.safetensors", _trained())
    _rewrite(path, mutate_meta=lambda m: m["model"].__setitem__("units", 10**9))
    with pytest.raises(CharLSTMError, match="units"):
        checkpoint.load(path)


def test_vocab_size_mismatch_is_refused(tmp_path):
    path = checkpoint.save(tmp_path / "m.safetensors", _trained())
    _rewrite(path, mutate_meta=lambda m: m.__setitem__("vocab", ["a", "b"]))
    with pytest.raises(CharLSTMError, match="vocabulary"):
        checkpoint.load(path)


def test_huge_header_length_is_refused_before_reading(tmp_path):
    path = tmp_path / "evil.safetensors"
    path.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(CharLSTMError, match="not a charlstm checkpoint"):
        checkpoint.load(path)
