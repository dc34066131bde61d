"""Unit conversion: exact factors from an explicit table, readable refusals."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from schemas import (
    ContractError,
    IncompatibleUnitError,
    UnknownUnitError,
    convert,
    to_canonical,
)
from schemas.units import KNOWN_UNITS, compatible_units

EXACT = [
    (1.0, "ug/L", "ng/mL", 1.0),
    (1.0, "\u00b5g/L", "ng/mL", 1.0),
    (1.0, "\u03bcg/L", "ng/mL", 1.0),
    (2500.0, "pg/mL", "ng/mL", 2.5),
    (0.004, "mg/L", "ng/mL", 4.0),
    (35.0, "U/mL", "[iU]/mL", 35.0),
    (35.0, "kU/L", "[iU]/mL", 35.0),
    (240.0, "IU/L", "U/L", 240.0),
    (12.5, "%", "1", 0.125),
    (0.125, "1", "%", 12.5),
    (1500.0, "mm3", "mL", 1.5),
    (2.0, "cm3", "mL", 2.0),
    (250.0, "uL", "mL", 0.25),
    (1.5, "mL", "mm3", 1500.0),
    (250.0, "cGy", "Gy", 2.5),
    (1.8, "Gy", "cGy", 180.0),
    (3.2, "cm", "mm", 32.0),
    (1200.0, "{copies}/mL", "{copies}/mL", 1200.0),
    (75.0, "mg/m2", "mg/m2", 75.0),
]


@pytest.mark.parametrize(("value", "source", "target", "expected"), EXACT)
def test_table_conversions_are_exact(
    value: float, source: str, target: str, expected: float
) -> None:
    assert convert(value, source, target) == expected
    assert to_canonical(value, source, target) == expected


# factor 1/100 cannot be represented in binary; the conversion must still be correctly rounded
@given(st.floats(min_value=-1e300, max_value=1e300))
def test_percent_to_fraction_is_correctly_rounded(value: float) -> None:
    assert convert(value, "%", "1") == float(Fraction(value) / 100)


UNIT_PAIRS = [(a, b) for a in sorted(KNOWN_UNITS) for b in compatible_units(a)]


# Away from subnormals, where a /1000 step loses digits that no conversion could keep.
NORMAL_FLOATS = st.floats(min_value=-1e250, max_value=1e250).filter(
    lambda x: x == 0 or abs(x) > 1e-290
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(UNIT_PAIRS), NORMAL_FLOATS)
def test_round_trip_returns_the_value_within_one_rounding(
    pair: tuple[str, str], value: float
) -> None:
    there, back = pair
    returned = convert(convert(value, there, back), back, there)
    assert abs(returned - value) <= math.ulp(value)


# Coarse to fine multiplies by an integer, so counts (3 Gy, 2 mL) come back exactly.
COARSE_TO_FINE = [(a, b) for a, b in UNIT_PAIRS if convert(1, a, b) == int(convert(1, a, b))]


def _integers_exact_in_the_finer_unit(pair: tuple[str, str]) -> st.SearchStrategy[tuple[tuple[str, str], int]]:
    # Exact only while value * factor is a float without rounding, i.e. at most 2**53: beyond
    # that (mg/l -> pg/mL is x1e6, so from about 9e9 on) the fine value is rounded, and no
    # conversion could give the count back.
    factor = int(convert(1, *pair))
    return st.tuples(st.just(pair), st.integers(min_value=0, max_value=2**53 // factor))


@given(st.sampled_from(COARSE_TO_FINE).flatmap(_integers_exact_in_the_finer_unit))
@example((("mg/l", "pg/mL"), 2**53 // 10**6))  # the largest count this pair keeps exactly
@example((("Gy", "cGy"), 2**53 // 100))
def test_round_trip_of_integers_through_a_finer_unit_is_exact(
    case: tuple[tuple[str, str], int],
) -> None:
    (coarse, fine), value = case
    assert convert(convert(value, coarse, fine), fine, coarse) == value


def test_unknown_unit_names_the_unit_and_what_was_expected() -> None:
    with pytest.raises(UnknownUnitError) as caught:
        to_canonical(3.0, "furlongs", "ng/mL")
    assert str(caught.value) == "'furlongs' is not a known unit (expected one convertible to ng/mL)"
    assert isinstance(caught.value, ContractError) and isinstance(caught.value, ValueError)
    with pytest.raises(UnknownUnitError, match="'parsecs' is not a known unit"):
        convert(1.0, "mL", "parsecs")


def test_case_matters_and_the_message_says_so() -> None:
    with pytest.raises(UnknownUnitError, match="did you mean 'ng/mL'"):
        convert(1.0, "NG/ML", "ng/mL")
    # "ML" is a megalitre in UCUM, not a millilitre: not folded either.
    with pytest.raises(UnknownUnitError, match="did you mean 'ng/mL'"):
        convert(1.0, "ng/ML", "ng/mL")


@pytest.mark.parametrize(
    ("alias", "unit"),
    [("ng/ml", "ng/mL"), ("mg/l", "mg/L"), ("ml", "mL"), ("ul", "uL"), ("U/ml", "U/mL"), ("[iU]/ml", "[iU]/mL"),
     ("kU/l", "kU/L"), ("IU/l", "IU/L"), ("{copies}/ml", "{copies}/mL")],
)
def test_the_litre_has_two_ucum_codes(alias: str, unit: str) -> None:
    # UCUM: the litre is "l" or "L"; a unit spelled with either is the same unit.
    assert convert(2.5, alias, unit) == 2.5 and convert(2.5, unit, alias) == 2.5
    assert alias in KNOWN_UNITS
    # Messages list each unit once, in its canonical spelling.
    assert alias not in compatible_units(unit)


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ("mg/L", "Gy"),
        ("%", "mL"),
        ("U/mL", "U/L"),  # assay units (CA-125) are not enzyme activity (LDH)
        ("mg/m2", "mg"),  # needs body surface area, which events do not carry
        ("mg/kg", "mg/m2"),
    ],
)
def test_dimension_mismatch_is_refused(source: str, target: str) -> None:
    with pytest.raises(IncompatibleUnitError) as caught:
        convert(1.0, source, target)
    assert repr(source) in str(caught.value) and repr(target) in str(caught.value)
    assert "expected one of" in str(caught.value)


def test_non_finite_and_overflowing_values_stay_non_finite() -> None:
    assert math.isnan(convert(math.nan, "%", "1"))
    assert convert(-math.inf, "cGy", "Gy") == -math.inf
    assert convert(1e308, "mg/L", "ng/mL") == math.inf
    assert convert(-(10**400), "mm3", "mL") == -math.inf
