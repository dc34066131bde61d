"""Errors raised by the contract.

Every error is a `ContractError`, itself a `ValueError`, so a caller that only wants to know
"was this input acceptable?" can catch one type.
"""

from __future__ import annotations


class ContractError(ValueError):
    """Input does not satisfy the oncotwin event contract."""


class UnknownCodeError(ContractError, KeyError):
    """A (system, code) pair, IRI or key is not in the term table."""

    # KeyError would repr() the message (adding quotes); keep it readable.
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnknownUnitError(ContractError):
    """A unit string is not in the conversion table."""


class IncompatibleUnitError(ContractError):
    """Two known units measure different things (e.g. ng/mL and Gy)."""
