"""Milliseconds to datetimes and back, exactly, however the conversion is made."""

from __future__ import annotations

import random
from datetime import timedelta

from hypothesis import given
from hypothesis import strategies as st

from policyd.clock import _FLOAT_EXACT_MS, EPOCH, from_ms, to_ms


@given(st.integers(min_value=-(2**45), max_value=2**45))
def test_from_ms_is_the_exact_millisecond(milliseconds: int) -> None:
    moment = from_ms(milliseconds)
    assert moment == EPOCH + timedelta(milliseconds=milliseconds)
    assert moment.microsecond % 1000 == 0
    assert to_ms(moment) == milliseconds


def test_from_ms_at_the_edges_of_the_quick_conversion_and_all_over_it() -> None:
    for base in (0, 1_796_000_000_000, _FLOAT_EXACT_MS):
        for milliseconds in range(base - 3000, base + 3000):
            assert from_ms(milliseconds) == EPOCH + timedelta(milliseconds=milliseconds)
    draw = random.Random(2106)
    for _ in range(100_000):
        milliseconds = draw.randrange(_FLOAT_EXACT_MS)
        assert from_ms(milliseconds) == EPOCH + timedelta(milliseconds=milliseconds)
