"""Sentence splitting for ``--batching sentences`` (the tutorial's extension idea 4).

Works on cleaned text, which is usually lowercased, so it cannot lean on capital letters.
Rules, in order:

* a blank line (paragraph break) always ends a sentence;
* ``.``, ``!`` or ``?`` (repeats allowed) followed by whitespace ends one, unless the word
  before the full stop is a known abbreviation (``mr.``, ``e.g.``) or a single letter;
* when a closing quote or bracket follows the terminator, the sentence ends only if a line
  break, an opening quote or the end of the text comes next: ``'well!' thought alice`` is one
  sentence, speech and its attribution together.

Single line breaks inside a sentence are kept: they are characters the model must learn.
Sentences are returned as (start, end) offsets, so no character is lost or duplicated.
"""

from __future__ import annotations

import re

ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr prof rev gen col capt lt sgt vs etc e.g i.e cf viz no vol pp ch fig".split()
)
_CLOSERS = "'\"’”)]»"
_OPENERS = "'\"‘“([«"
_END_RE = re.compile(r"[.!?]+([" + re.escape(_CLOSERS) + r"]*)(\s+)")
_PARAGRAPH_RE = re.compile(r"\n[ \t]*\n\s*")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence; trailing whitespace belongs to the sentence before it."""
    spans = []
    start = 0
    for paragraph_end in _paragraph_ends(text):
        for end in _sentence_ends(text, start, paragraph_end):
            spans.append((start, end))
            start = end
        if start < paragraph_end:
            spans.append((start, paragraph_end))
            start = paragraph_end
    return spans


def split_sentences(text: str) -> list[str]:
    return [text[a:b] for a, b in sentence_spans(text)]


def _paragraph_ends(text: str) -> list[int]:
    ends = [m.end() for m in _PARAGRAPH_RE.finditer(text)]
    if not ends or ends[-1] != len(text):
        ends.append(len(text))
    return ends


def _sentence_ends(text: str, start: int, stop: int) -> list[int]:
    ends = []
    for match in _END_RE.finditer(text, start, stop):
        if match.end() >= stop:
            break  # the paragraph break ends this one anyway
        if _is_sentence_end(text, match):
            ends.append(match.end())
    return ends


def _is_sentence_end(text: str, match: re.Match) -> bool:
    closers, space = match.group(1), match.group(2)
    if text[match.start()] == "." and _word_before(text, match.start()) in ABBREVIATIONS:
        return False
    if text[match.start()] == "." and len(_word_before(text, match.start())) == 1 and not closers:
        return False  # an initial such as "j. smith"
    if closers:
        following = text[match.end():match.end() + 1]
        return "\n" in space or following == "" or following in _OPENERS
    return True


def _word_before(text: str, index: int) -> str:
    begin = index
    while begin > 0 and (text[begin - 1].isalpha() or text[begin - 1] == "."):
        begin -= 1
    return text[begin:index].lower()
