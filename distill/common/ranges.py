"""Option types with their valid range, so that LightningCLI checks a value when it parses it and
`--help` shows the range (jsonargparse's restricted number types).

jsonargparse hands the constructors instances of these subclasses of int and float; `plain`
turns them back into built-in numbers before they are stored (hyper-parameters, checkpoint
configs), because `torch.load(weights_only=True)` refuses unknown classes.
"""
from __future__ import annotations

from typing import Any, Literal

from jsonargparse.typing import restricted_number_type

__all__ = [
    "ClosedUnitInterval", "NonNegativeFloat", "NonNegativeInt", "OpenUnitInterval", "PositiveFloat", "PositiveInt",
    "HalfOpenUnitInterval", "UnitIntervalOpenAtZero", "Port", "accepted", "plain", "KLNormalization",
]

_ACCEPTED: dict[type, tuple[type, list[tuple[str, int | float]]]] = {}


def ranged(name: str, base: type, *rules: tuple[str, int | float]) -> type:
    """jsonargparse's restricted number type `name` (the same class as jsonargparse's own of that name), with its
    rules kept here for `accepted`: jsonargparse keeps them in private attributes only."""
    made = restricted_number_type(name, base, list(rules))
    _ACCEPTED[made] = (base, list(rules))
    return made


def accepted(hint: Any) -> tuple[type, list[tuple[str, int | float]]] | None:
    """(int or float, [(comparison, bound), ...]) of a range type made by `ranged`; None for any other type."""
    return _ACCEPTED.get(hint)


PositiveInt = ranged("PositiveInt", int, (">", 0))
NonNegativeInt = ranged("NonNegativeInt", int, (">=", 0))
PositiveFloat = ranged("PositiveFloat", float, (">", 0))
NonNegativeFloat = ranged("NonNegativeFloat", float, (">=", 0))
ClosedUnitInterval = ranged("ClosedUnitInterval", float, (">=", 0), ("<=", 1))
OpenUnitInterval = ranged("OpenUnitInterval", float, (">", 0), ("<", 1))
# [0, 1): label smoothing (1 would leave no mass on the label), stochastic depth, dropout
HalfOpenUnitInterval = ranged("HalfOpenUnitInterval", float, (">=", 0), ("<", 1))
# (0, 1]: a crop fraction, a RandomResizedCrop area
UnitIntervalOpenAtZero = ranged("UnitIntervalOpenAtZero", float, (">", 0), ("<=", 1))
# a TCP port LitServe accepts (below 1024 needs root)
Port = ranged("Port", int, (">=", 1024), ("<=", 65535))

# soft distillation's normalisation (distill/training/methods/soft.py); the methods' names are their table's
KLNormalization = Literal["batchmean", "reference"]


def plain(value: Any) -> Any:
    """`value` with every range-typed number (also inside lists, tuples and dicts) as a built-in int or float."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value) if type(value) in (list, tuple) else [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value
