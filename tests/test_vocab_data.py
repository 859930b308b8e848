"""Stages 2 and 3: vocabulary and batches."""

from __future__ import annotations

import numpy as np
import pytest

from charlstm.corpus import Corpus
from charlstm.data import StreamBatches, WindowBatches, load_ids, save_ids, split_train_val
from charlstm.errors import CharLSTMError
from charlstm.vocab import Vocab


def test_vocab_is_sorted_like_the_tutorial_and_round_trips(pg11):
    text = Corpus.from_files(pg11).text
    vocab = Vocab.from_text(text)
    assert list(vocab.chars) == sorted(set(text))
    ids = vocab.encode(text)
    assert ids.dtype == np.uint8 and len(ids) == len(text)
    assert vocab.decode(ids[:500]) == text[:500]
    assert Vocab.from_json(vocab.to_json()) == vocab


def test_large_vocab_uses_uint16():
    vocab = Vocab.from_text("".join(chr(0x4E00 + i) for i in range(300)))
    assert vocab.encode(vocab.chars[-1] * 3).dtype == np.uint16


def test_unknown_characters_are_named_or_skipped():
    vocab = Vocab.from_text("abc ")
    with pytest.raises(CharLSTMError, match="'x'"):
        vocab.encode("a x")
    assert vocab.decode(vocab.encode("a x", unknown="skip")) == "a "


def test_split_keeps_the_last_tenth_for_validation():
    ids = np.arange(1000)
    train, val = split_train_val(ids, 0.1)
    assert len(train) == 900 and val[0] == 900 and val[-1] == 999
    assert len(split_train_val(ids, 0.0)[1]) == 0
    with pytest.raises(CharLSTMError, match="--val-fraction must be in"):
        split_train_val(ids, 1.0)


def test_window_batches_are_the_tutorial_patterns():
    ids = np.arange(250, dtype=np.uint16)
    batches = WindowBatches(ids, window=100, batch_size=32, shuffle=False)
    assert batches.num_patterns == 150  # Total Patterns = n_chars - seq_length
    x, y = next(batches.epoch())
    assert x.shape == (32, 100) and y.shape == (32,)
    assert x[5].tolist() == list(range(5, 105)) and y[5].item() == 105
    seen = np.concatenate([y.numpy() for _, y in batches.epoch()])
    assert sorted(seen.tolist()) == list(range(100, 250))


def test_window_shuffle_is_seeded_and_complete():
    ids = np.arange(300)
    one = [y.tolist() for _, y in WindowBatches(ids, 10, 16, seed=3).epoch(1)]
    two = [y.tolist() for _, y in WindowBatches(ids, 10, 16, seed=3).epoch(1)]
    other_epoch = [y.tolist() for _, y in WindowBatches(ids, 10, 16, seed=3).epoch(2)]
    assert one == two and one != other_epoch
    assert sorted(sum(one, [])) == list(range(10, 300))


def test_stream_batches_continue_each_other():
    ids = np.arange(1001)
    batches = StreamBatches(ids, batch_size=4, bptt=30)
    pieces = list(batches.epoch())
    assert len(pieces) == len(batches) == 9  # 250 per stream, 30 per piece
    first, second = pieces[0], pieces[1]
    assert (first[1] == first[0] + 1).all()
    assert (second[0][:, 0] == first[0][:, -1] + 1).all()  # next piece continues each stream
    assert first[0][1, 0].item() == 250  # stream 1 starts a quarter in


def test_too_short_text_is_a_clear_error():
    with pytest.raises(CharLSTMError, match="fewer than the window"):
        WindowBatches(np.arange(50), window=100, batch_size=4)


def test_ids_memory_map_round_trip(tmp_path):
    ids = np.arange(10_000, dtype=np.uint16) % 300
    save_ids(tmp_path / "ids.npy", ids)
    loaded = load_ids(tmp_path / "ids.npy")
    assert isinstance(loaded, np.memmap) and (loaded == ids).all()


def test_stateful_windows_continue_each_other_across_batches():
    from charlstm.data import StatefulWindowBatches

    ids = np.arange(1000)
    batches = StatefulWindowBatches(ids, window=10, batch_size=4)
    pieces = list(batches.epoch())
    assert len(pieces) == len(batches) == 24  # 250 per stream, (250 - 1) // 10 windows
    (x0, y0), (x1, _) = pieces[0], pieces[1]
    assert (x1[:, 0] == x0[:, -1] + 1).all()  # row i of batch k+1 continues row i of batch k
    assert (y0 == x0[:, -1] + 1).all() and (y0 == x1[:, 0]).all()
    assert x0[2, 0].item() == 500


def test_sentence_batches_pad_with_ignored_targets_and_split_long_sentences():
    from charlstm.data import IGNORE_INDEX, SentenceBatches

    ids = np.arange(100)
    spans = [(0, 5), (5, 30), (30, 31), (31, 100)]
    batches = SentenceBatches(ids, spans, batch_size=16, max_len=20, shuffle=False)
    assert batches.long_sentences == 2  # 25 and 69 characters > 21
    x, y = next(batches.epoch())
    real = y != IGNORE_INDEX
    assert (y[real] == x[real] + 1).all()  # every real position predicts the next id
    assert real.sum().item() == batches.num_targets == 4 + 24 + 68
    assert real[0].tolist() == [True] * 4 + [False] * 16  # a 5-char sentence: 4 targets, then padding
