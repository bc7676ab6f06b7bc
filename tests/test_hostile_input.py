"""Property-based tests: random hostile long tables give a valid cohort or one of our errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from synthmed import Cohort
from synthmed.errors import SynthmedError

NAMES = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    min_size=1,
    max_size=8,
)
NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e308, max_value=1e308),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
)
CELLS = st.one_of(NUMBERS, st.none(), st.text(max_size=5), st.booleans())


@st.composite
def long_tables(draw):
    n_rows = draw(st.integers(min_value=0, max_value=25))
    names = draw(st.lists(NAMES, min_size=2, max_size=6, unique=True))
    id_name, time_name, *others = names
    # Each table is hostile in a few places only, so that many tables reach the later checks.
    id_cells = st.one_of(st.integers(-3, 5), st.sampled_from(["a", "é", "患者"]))
    if draw(st.booleans()):
        id_cells = st.one_of(id_cells, st.none())
    ids = draw(st.lists(id_cells, min_size=n_rows, max_size=n_rows))
    # Mostly plausible times, so that many tables get past the first check and reach later ones.
    plausible = st.floats(min_value=0, max_value=1e3)
    time_cells = st.one_of(plausible, plausible, plausible, NUMBERS, st.none())
    times = draw(st.lists(time_cells, min_size=n_rows, max_size=n_rows))
    data = {id_name: ids, time_name: times}
    for name in others:
        strategy = draw(st.sampled_from([st.floats(-1e3, 1e3), NUMBERS, CELLS]))
        data[name] = draw(st.lists(strategy, min_size=n_rows, max_size=n_rows))
    frame = pd.DataFrame(data)
    static = draw(st.lists(st.sampled_from(others), unique=True)) if others else []
    return frame, id_name, time_name, static


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(long_tables())
def test_from_long_returns_a_cohort_or_a_documented_error(table):
    frame, id_name, time_name, static = table
    try:
        cohort = Cohort.from_long(frame, id=id_name, time=time_name, static=static)
    except SynthmedError as error:
        event(type(error).__name__)
        return
    event("valid cohort")
    assert cohort.n_patients >= 1
    times = cohort.events[time_name].to_numpy(dtype=float)
    assert np.isfinite(times).all() and (times >= 0).all()
    arrays = cohort.arrays
    assert arrays.lengths.sum() == len(cohort.events)
    back = Cohort.from_long(
        cohort.to_long(), id=id_name, time=time_name, static=static, schema=cohort.schema
    )
    pd.testing.assert_frame_equal(back.events, cohort.events)
