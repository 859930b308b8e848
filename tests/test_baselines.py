"""Compressor baselines: size(train + val) - size(train), in bits per validation character."""

from __future__ import annotations

import math

import numpy as np

from charlstm.baselines import (
    COMPRESSORS,
    Baseline,
    compressor_baselines,
    extra_compressed_bits,
    format_baselines,
    versus_best,
)
from charlstm.corpus import Corpus
from charlstm.data import split_train_val


def test_extra_bits_is_the_growth_of_the_compressed_size():
    no_compression = lambda data: b"header" + data  # noqa: E731
    assert extra_compressed_bits(no_compression, b"abc" * 10, b"hello") == 8 * 5


def test_text_seen_in_training_costs_less_than_new_text():
    train = "the quick brown fox jumps over the lazy dog. " * 200
    repeated = train[:2000]
    novel = "".join(chr(97 + i) for i in np.random.default_rng(0).integers(0, 26, 2000))
    for name, compress in COMPRESSORS.items():
        seen = extra_compressed_bits(compress, train.encode(), repeated.encode())
        new = extra_compressed_bits(compress, train.encode(), novel.encode())
        assert seen < new / 4, name


def test_alice_baselines_in_bits_per_char(pg11):
    text = Corpus.from_files(pg11).text
    train_part, val_part = split_train_val(np.arange(len(text)), 0.1)  # the trainer's split
    train, val = text[:len(train_part)], text[len(train_part):]
    assert len(val) == len(val_part) == round(len(text) * 0.1)
    baselines = compressor_baselines(train, val)
    assert [b.name for b in baselines] and sorted(b.name for b in baselines) == ["bz2", "gzip", "lzma"]
    values = [b.bits_per_char for b in baselines]
    assert values == sorted(values)  # best first
    assert all(1.5 < v < 3.5 for v in values)  # English text: well under 8 bits, above a good model


def test_bits_per_char_divides_by_characters_not_bytes():
    train, val = "é" * 1000, "é" * 500 + "ü" * 500  # two UTF-8 bytes per character
    (first, *_) = compressor_baselines(train, val)
    compress = COMPRESSORS[first.name]
    bits = extra_compressed_bits(compress, train.encode(), val.encode())
    assert math.isclose(first.bits_per_char, bits / 1000)


def test_no_validation_text_no_baselines():
    assert compressor_baselines("some text", "") == []


def test_versus_best_reports_relative_difference():
    baselines = [Baseline("bz2", 2.0), Baseline("gzip", 2.5)]
    assert versus_best(1.5, baselines) == "beats bz2 by 25.0%"
    assert versus_best(2.2, baselines) == "behind bz2 by 10.0%"
    assert versus_best(1.0, []) == ""
    assert format_baselines(baselines) == "bz2 2.000, gzip 2.500"
