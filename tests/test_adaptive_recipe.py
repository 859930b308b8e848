"""The default recipe adapts to the text's size and the time budget; explicit options win."""

from __future__ import annotations

from charlstm.corpus import Corpus
from charlstm.recipes import PRESETS, adaptive_default, preset_configs
from charlstm.train import fit


def test_a_book_gets_the_recipe_measured_on_alice():
    model_kw, train_kw = PRESETS["default"]
    for budget in (150.0, 600.0, None):
        choice = adaptive_default(130_000, budget, train_kw["epochs"])
        assert (choice.units, choice.dropout, choice.bptt) == (model_kw["units"], model_kw["dropout"], train_kw["bptt"])
        assert choice.batch_size == 32 < train_kw["batch_size"]  # more steps per character, measured better


def test_less_regularisation_when_each_character_is_read_only_a_few_times():
    short = adaptive_default(90_000_000, 600.0, 50)  # 10 minutes cannot read 90 M characters even once
    assert short.passes < 1 and short.dropout == 0.0 and short.bptt == 100 and short.units == 256
    few = adaptive_default(9_000_000, 600.0, 50)
    assert 1 <= few.passes < 3 and 0 < few.dropout < 0.4
    assert adaptive_default(90_000_000, None, 50).units > 256  # no budget: 50 passes pay for a wider net


def test_explicit_options_win_and_the_choice_is_printed():
    lines = []
    model, train = preset_configs("default", 50, train_chars=90_000_000, log=lines.append, time_budget=600.0,
                                  dropout=0.3, units=128)
    assert (model.units, model.dropout, model.weight_drop, train.bptt, train.batch_size) == (128, 0.3, 0.0, 100, 32)
    assert lines and lines[0].startswith("Recipe: default") and "units 128 (yours)" in lines[0]
    assert "dropout 0.3 (yours)" in lines[0] and "bptt 100" in lines[0] and "batch size 32" in lines[0]
    other, _ = preset_configs("tutorial-small", 50, train_chars=90_000_000, log=lines.append)
    assert other.units == 256 and len(lines) == 1  # only the default preset adapts
    _, mine = preset_configs("default", 50, train_chars=90_000_000, log=lines.append, time_budget=600.0,
                             batch_size=128)
    assert mine.batch_size == 128 and "batch size 128 (yours)" in lines[-1]


def test_training_prints_the_recipe_first(tmp_path, pg11):
    lines = []
    fit(Corpus.from_string(Corpus.from_files(pg11).text[:4000]), output_dir=str(tmp_path), epochs=1, units=16,
        layers=1, embedding_dim=8, batch_size=8, log=lines.append, progress=False)
    assert lines[0].startswith("Recipe: default, adapted to 3,600 training characters")
