"""Unit conversion to canonical UCUM units through an explicit table.

Only the units listed in `_TABLE` are known; nothing is parsed or guessed, because a feed that
sends an unexpected unit should be told so rather than have its value silently rescaled.
Each unit belongs to one dimension and carries an exact factor (a `Fraction`) to that dimension's
reference unit, so conversions are correctly rounded and factors such as 1/100 incur no
binary-fraction error.

Choices that are conventions rather than UCUM arithmetic:

- ``U/mL`` is accepted as the common synonym of ``[iU]/mL``: tumour-marker assays (CA-125,
  CA 19-9, CA 15-3) report "U/mL" meaning the assay's arbitrary unit, not the enzyme unit.
  ``U/L`` and ``IU/L`` are enzyme activity (LDH), a separate dimension, so ``U/mL`` and ``U/L``
  are deliberately not inter-convertible.
- ``mg``, ``mg/m2`` and ``mg/kg`` (drug doses) do not convert into one another by ``convert``:
  that needs the patient's body surface area or weight. ``drug_dose`` converts with the body
  size an event gives, and only with it (a body size is never assumed).
- UCUM codes are case-sensitive (``mL`` is a millilitre, ``ML`` a megalitre), so ``NG/ML`` is
  refused with a hint instead of being folded to ``ng/mL``. The litre alone has two codes in
  UCUM, ``L`` and ``l``: ``ng/ml``, ``mg/l`` and the like are the same units as ``ng/mL`` and
  ``mg/L`` (many laboratory systems send them), known as aliases.
"""

from __future__ import annotations

import math
from fractions import Fraction

from .errors import IncompatibleUnitError, UnknownUnitError

_ONE = Fraction(1)

# unit -> (dimension, factor to the dimension's reference unit: the first unit listed for it)
_TABLE: dict[str, tuple[str, Fraction]] = {
    # mass concentration
    "ng/mL": ("mass concentration", _ONE),
    "ug/L": ("mass concentration", _ONE),
    "\u00b5g/L": ("mass concentration", _ONE),  # micro sign
    "\u03bcg/L": ("mass concentration", _ONE),  # Greek small letter mu
    "pg/mL": ("mass concentration", Fraction(1, 1000)),
    "mg/L": ("mass concentration", Fraction(1000)),
    # arbitrary (assay-defined) units per volume
    "[iU]/mL": ("arbitrary concentration", _ONE),
    "[IU]/mL": ("arbitrary concentration", _ONE),
    "U/mL": ("arbitrary concentration", _ONE),
    "kU/L": ("arbitrary concentration", _ONE),
    # catalytic (enzyme) activity per volume
    "U/L": ("catalytic concentration", _ONE),
    "IU/L": ("catalytic concentration", _ONE),
    # dimensionless fraction
    "1": ("fraction", _ONE),
    "%": ("fraction", Fraction(1, 100)),
    # volume
    "mL": ("volume", _ONE),
    "cm3": ("volume", _ONE),
    "mm3": ("volume", Fraction(1, 1000)),
    "uL": ("volume", Fraction(1, 1000)),
    "\u00b5L": ("volume", Fraction(1, 1000)),
    "\u03bcL": ("volume", Fraction(1, 1000)),
    # absorbed radiation dose
    "Gy": ("absorbed dose", _ONE),
    "cGy": ("absorbed dose", Fraction(1, 100)),
    # length
    "mm": ("length", _ONE),
    "cm": ("length", Fraction(10)),
    # number concentration (ctDNA copies)
    "{copies}/mL": ("copies concentration", _ONE),
    # drug doses
    "mg": ("drug mass", _ONE),
    "mg/m2": ("drug mass per body surface area", _ONE),
    "mg/kg": ("drug mass per body mass", _ONE),
}

# Every unit with a litre also spelled with UCUM's other litre code, "l".
_LITRE_ALIASES: dict[str, str] = {u.replace("L", "l"): u for u in _TABLE if "L" in u}
_TABLE.update({alias: _TABLE[unit] for alias, unit in _LITRE_ALIASES.items()})

KNOWN_UNITS: frozenset[str] = frozenset(_TABLE)


def is_known_unit(unit: object) -> bool:
    return isinstance(unit, str) and unit in _TABLE


def compatible_units(unit: str) -> tuple[str, ...]:
    """Every known unit of the same dimension as `unit` (itself included), litre aliases aside."""
    dimension = _entry(unit)[0]
    return tuple(u for u, (d, _) in _TABLE.items() if d == dimension and u not in _LITRE_ALIASES)


def dimension_of(unit: str) -> str:
    return _entry(unit)[0]


def convert(value: float, from_unit: str, to_unit: str) -> float:
    """Convert `value` from `from_unit` to `to_unit`, correctly rounded.

    Non-finite inputs stay non-finite; a finite value whose result exceeds the float range
    becomes +/-inf (callers that need finiteness check it, as validate() does).
    """
    to_dimension, to_factor = _entry(to_unit)
    from_dimension, from_factor = _entry(from_unit, expected=to_unit)
    if from_dimension != to_dimension:
        raise IncompatibleUnitError(
            f"{from_unit!r} ({from_dimension}) cannot be converted to {to_unit!r} "
            f"({to_dimension}); expected one of: {', '.join(compatible_units(to_unit))}"
        )
    return _scale(value, from_factor / to_factor)


def to_canonical(value: float, unit: str, canonical_unit: str) -> float:
    """Express `value` given in `unit` in the term's `canonical_unit`."""
    return convert(value, unit, canonical_unit)


DRUG_DOSE_UNITS = ("mg", "mg/m2", "mg/kg")


def drug_dose(
    value: float, unit: str, body_weight_kg: float | None = None, body_surface_area_m2: float | None = None
) -> tuple[float | None, float | None]:
    """(mg/m², mg) of a drug dose in ``unit`` (mg, mg/m2 or mg/kg), each None where the body
    size given does not determine it: mg needs the surface area for mg/m²; mg/m² needs it for
    mg; mg/kg needs the weight for mg, and the weight and the surface area for mg/m².
    Correctly rounded (exact arithmetic, one rounding)."""
    if unit not in DRUG_DOSE_UNITS:
        raise IncompatibleUnitError(f"{unit!r:.40} is not a drug dose unit (expected one of: {', '.join(DRUG_DOSE_UNITS)})")
    dose = Fraction(value)
    weight = Fraction(body_weight_kg) if body_weight_kg is not None else None
    area = Fraction(body_surface_area_m2) if body_surface_area_m2 is not None else None
    if unit == "mg":
        mg: Fraction | None = dose
    elif unit == "mg/m2":
        mg = dose * area if area is not None else None
    else:
        mg = dose * weight if weight is not None else None
    if unit == "mg/m2":
        per_m2: Fraction | None = dose
    else:
        per_m2 = mg / area if mg is not None and area else None
    return (float(per_m2) if per_m2 is not None else None, float(mg) if mg is not None else None)


def _entry(unit: object, expected: str | None = None) -> tuple[str, Fraction]:
    if isinstance(unit, str) and unit in _TABLE:
        return _TABLE[unit]
    shown = repr(unit) if isinstance(unit, str) else f"{type(unit).__name__} {unit!r:.40}"
    message = f"{shown:.80} is not a known unit"
    if expected is not None:
        message += f" (expected one convertible to {expected})"
    hint = _case_insensitive_match(unit)
    if hint is not None:
        message += f"; UCUM units are case-sensitive: did you mean {hint!r}?"
    raise UnknownUnitError(message)


def _case_insensitive_match(unit: object) -> str | None:
    if not isinstance(unit, str):
        return None
    folded = unit.casefold()
    matches = [u for u in _TABLE if u.casefold() == folded and u not in _LITRE_ALIASES]
    return matches[0] if len(matches) == 1 else None


def _scale(value: float, factor: Fraction) -> float:
    if isinstance(value, float) and not math.isfinite(value):
        return value * float(factor)
    try:
        return float(Fraction(value) * factor)
    except OverflowError:
        return -math.inf if value < 0 else math.inf
