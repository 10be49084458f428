"""Deployment budgets: `latency=0.5x`, `memory=40GiB`, `params=2.5M`, `throughput=1200tok/s`, `kv=1GiB`,
and for MoE parents `experts=48` (routed experts kept over all layers) and `active_params=0.5x`.

A value with an `x` suffix is a ratio of the parent's own cost; anything else is absolute, with units.
Every budget becomes an upper bound on a quantity that is a sum over layers plus a fixed part, which is
what the MIP needs: throughput (tokens per second) is bounded through the time per batch it implies.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from puzzle.errors import PuzzleError


class BudgetKind(str, enum.Enum):
    memory = "memory"  # weight bytes + KV-cache bytes at the scenario
    latency = "latency"  # seconds per batch: prefill + every decode step
    throughput = "throughput"  # generated tokens per second (a lower bound)
    params = "params"  # parameter count
    kv = "kv"  # KV-cache bytes at the scenario
    experts = "experts"  # routed experts kept, summed over the layers (0 for a dense parent)
    active_params = "active_params"  # parameters one token computes with (an MoE's routed experts only)


UNITS: dict[BudgetKind, dict[str, float]] = {
    BudgetKind.memory: {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
                        "tib": 2**40},
    BudgetKind.kv: {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30},
    BudgetKind.latency: {"s": 1, "ms": 1e-3, "us": 1e-6},
    BudgetKind.throughput: {"tok/s": 1, "ktok/s": 1e3},
    BudgetKind.params: {"": 1, "k": 1e3, "m": 1e6, "b": 1e9},
    BudgetKind.experts: {"": 1},
}
UNITS[BudgetKind.active_params] = UNITS[BudgetKind.params]
UNITS[BudgetKind.kv]["tb"] = 1e12


@dataclass(frozen=True)
class Budget:
    kind: BudgetKind
    value: float
    relative: bool  # True: `value` is a ratio of the parent's cost
    text: str  # as the user wrote it: "latency=0.5x"

    def limit(self, parent_value: float) -> float:
        return self.value * parent_value if self.relative else self.value

    @property
    def value_text(self) -> str:
        """The part after '=': what a config file holds under search.budgets.KIND."""
        return self.text.partition("=")[2].strip()


_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z/]*)\s*$", re.IGNORECASE)


def parse_budget(text: str) -> Budget:
    key, sep, raw = text.partition("=")
    if not sep:
        raise PuzzleError(f"budget {text!r}: expected KIND=VALUE, for example latency=0.5x or memory=40GiB")
    try:
        kind = BudgetKind(key.strip().lower())
    except ValueError:
        raise PuzzleError(
            f"budget {text!r}: unknown budget {key.strip()!r}; known: {', '.join(k.value for k in BudgetKind)}"
        ) from None
    match = _PATTERN.match(raw)
    if not match:
        raise PuzzleError(f"budget {text!r}: {raw.strip()!r} is not a number with an optional unit or 'x'")
    number, unit = float(match.group(1)), match.group(2).lower()
    if number <= 0:
        raise PuzzleError(f"budget {text!r}: the value must be positive")
    if unit == "x":
        return Budget(kind, number, True, text.strip())
    scale = UNITS[kind].get(unit)
    if scale is None:
        known = ", ".join(u or "(none)" for u in UNITS[kind])
        raise PuzzleError(f"budget {text!r}: unknown unit {unit!r} for {kind.value}; use x (ratio of the parent) or {known}")
    return Budget(kind, number * scale, False, text.strip())


@dataclass(frozen=True)
class Sweep:
    """`latency=0.3x:1.0x:8`: budgets of one kind at `steps` evenly spaced values, both ends included."""

    kind: BudgetKind
    low: Budget
    high: Budget
    steps: int
    text: str

    def budgets(self) -> list[Budget]:
        """Absolute values are in base units (bytes, seconds, …), which the text then shows without a unit."""
        values = [self.low.value + (self.high.value - self.low.value) * i / (self.steps - 1) for i in range(self.steps)]
        unit = "x" if self.low.relative else ""
        return [Budget(self.kind, float(f"{v:.6g}"), self.low.relative, f"{self.kind.value}={v:.6g}{unit}")
                for v in values]


def parse_sweep(text: str) -> Sweep:
    """'latency=0.3x:1.0x:8' -> a Sweep from 0.3x to 1.0x in eight budgets."""
    kind, sep, spec = text.partition("=")
    parts = spec.split(":")
    if not sep or len(parts) != 3:
        raise PuzzleError(f"--sweep {text!r}: expected KIND=LOW:HIGH:STEPS, for example latency=0.3x:1.0x:8")
    low, high = parse_budget(f"{kind}={parts[0]}"), parse_budget(f"{kind}={parts[1]}")
    if low.relative != high.relative:
        raise PuzzleError(f"--sweep {text!r}: give both ends as ratios (x) or both with units")
    try:
        steps = int(parts[2])
    except ValueError:
        steps = 0
    if steps < 2:
        raise PuzzleError(f"--sweep {text!r}: STEPS must be an integer of at least 2")
    return Sweep(low.kind, low, high, steps, text.strip())
