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

from puzzle.blocks.errors import PuzzleError


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
    text: str

    def limit(self, parent_value: float) -> float:
        return self.value * parent_value if self.relative else self.value


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
