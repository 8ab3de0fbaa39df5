"""Conditions: names, units, training statistics and ranges, and validation of a user's request."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Condition:
    """One conditioning attribute. ``mean``/``sd`` normalise it; ``low``/``high`` is the training range."""

    name: str
    unit: str
    mean: float
    sd: float
    low: float
    high: float
    non_negative: bool = True

    def describe(self) -> str:
        return f"{self.name} ({self.unit}, trained on {self.low:g}-{self.high:g})"

    def to_dict(self) -> dict:
        return asdict(self)


class ConditionError(ValueError):
    """A condition request the model cannot honour (unknown name, NaN, negative volume...)."""


class ConditionSpec:
    """The ordered conditions of a model."""

    def __init__(self, conditions: list[Condition]):
        self.conditions = list(conditions)
        self.names = [c.name for c in self.conditions]

    def __len__(self):
        return len(self.conditions)

    def to_list(self) -> list[dict]:
        return [c.to_dict() for c in self.conditions]

    @classmethod
    def from_list(cls, items: list[dict]) -> "ConditionSpec":
        return cls([Condition(**d) for d in items])

    def valid_names(self) -> str:
        return "; ".join(c.describe() for c in self.conditions)

    def validate(self, request: dict) -> tuple[dict, list[str]]:
        """Check a request ``{name: value or None}``. Returns (the values, one per condition, None where
        omitted; extrapolation warnings). Raises :class:`ConditionError` for unknown names, NaN/inf, negative
        values of non-negative conditions, or non-numbers."""
        unknown = [k for k in request if k not in self.names]
        if unknown:
            raise ConditionError(f"Unknown condition {', '.join(map(repr, unknown))}. Valid: {self.valid_names()}.")
        values, warnings = {}, []
        for c in self.conditions:
            v = request.get(c.name)
            if v is None:
                values[c.name] = None
                continue
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise ConditionError(f"{c.name} must be a number, got {v!r}. Valid: {self.valid_names()}.") from None
            if not math.isfinite(v):
                raise ConditionError(f"{c.name} is {v}: give a finite number. Valid: {self.valid_names()}.")
            if c.non_negative and v < 0:
                raise ConditionError(f"{c.name} cannot be negative ({v:g} {c.unit}). Valid: {self.valid_names()}.")
            if not c.low <= v <= c.high:
                warnings.append(f"{c.name} = {v:g} {c.unit} is outside the training range {c.low:g}-{c.high:g} "
                                f"{c.unit}: the atlas is an extrapolation.")
            values[c.name] = v
        return values, warnings

    def normalise(self, values: dict) -> torch.Tensor:
        """Validated values -> ``(1, K)`` float tensor, NaN where omitted."""
        row = [float("nan") if values.get(c.name) is None else (values[c.name] - c.mean) / c.sd for c in self.conditions]
        return torch.tensor([row], dtype=torch.float32)

    def normalise_tensor(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw ``(B, K)`` values (NaN = missing) -> normalised."""
        mean = torch.tensor([c.mean for c in self.conditions], dtype=raw.dtype, device=raw.device)
        sd = torch.tensor([c.sd for c in self.conditions], dtype=raw.dtype, device=raw.device)
        return (raw - mean) / sd
