"""Property-based fuzzing, fast profile (issue 15, part 3): arbitrary corpora, prime texts and
stop strings, option values through the CLI's parser, and checkpoint bytes end in success or
the documented one-line error, never anything else. ``benchmarks/reliability.py`` runs the same
targets for 10,000+ cases."""

from __future__ import annotations

import pytest

import fuzzing


@pytest.fixture(scope="module")
def targets(small_text):
    yield fuzzing.target_tests(small_text)
    fuzzing.cleanup()  # the scratch folder the targets write their cases into


@pytest.mark.parametrize("name", ["corpus bytes", "prime and stop strings", "generate options", "train options",
                                  "checkpoint bytes"])
def test_fuzz_target(targets, name):
    before = sum(count for (target, _), count in fuzzing.OUTCOMES.items() if target == name)
    fuzzing.CI(targets[name])()
    after = sum(count for (target, _), count in fuzzing.OUTCOMES.items() if target == name)
    assert after - before >= 20  # the cases really ran
