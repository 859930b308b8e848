"""Sentence splitting for padded-sentence batches."""

from __future__ import annotations

from charlstm.corpus import Corpus
from charlstm.sentences import sentence_spans, split_sentences


def test_speech_with_attribution_stays_one_sentence():
    text = "'well!' thought alice to herself, 'after such a fall as this!' she went on.\n"
    assert split_sentences(text) == [text]


def test_full_stops_split_and_keep_line_breaks():
    text = "hung upon pegs. she took down a jar from\none of the shelves. it was empty."
    assert split_sentences(text) == ["hung upon pegs. ", "she took down a jar from\none of the shelves. ",
                                      "it was empty."]


def test_abbreviations_and_initials_do_not_split():
    text = "mr. dodo met j. smith today. e.g. this one."
    assert split_sentences(text) == ["mr. dodo met j. smith today. ", "e.g. this one."]


def test_paragraph_breaks_end_sentences_and_quotes_before_new_speech_split():
    text = "chapter i. down the rabbit-hole\n\nalice was tired. 'oh dear!' 'i shall be late!'\n"
    assert split_sentences(text) == ["chapter i. down the rabbit-hole\n\n", "alice was tired. ",
                                      "'oh dear!' ", "'i shall be late!'\n"]


def test_spans_cover_the_whole_book_exactly(pg11):
    text = Corpus.from_files(pg11).text
    spans = sentence_spans(text)
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    lengths = [b - a for a, b in spans]
    assert 1000 < len(spans) < 4000 and min(lengths) > 0
    assert sorted(lengths)[len(lengths) // 2] < 100  # the median sentence fits a 100-char window
