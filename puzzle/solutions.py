"""solutions.json, the search's result: each solution's typed block per layer, objective and budget use.

Written by the search stage; read by realize (the chosen blocks), the report and the CLI.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from puzzle.blocks.specs import BlockChoice
from puzzle.errors import PuzzleError
from puzzle.io import read_json
from puzzle.search.mip import Solution, Status
from puzzle.search.problem import SearchProblem


@dataclass(frozen=True)
class Use:
    """A child's total of one budgeted quantity, the limit, the parent's total, and the budget that set it."""

    used: float
    limit: float
    parent: float
    budget: str  # as the user wrote it: "latency=0.5x"


@dataclass(frozen=True)
class ChosenLayer:
    choice: BlockChoice
    score: float


@dataclass(frozen=True)
class Architecture:
    """One solution: a block per layer, its objective, and its use of each budgeted quantity (memory, latency,
    params, kv, experts, active_params)."""

    status: Status
    objective: float  # the sum of the chosen blocks' scores: what the MIP predicts
    layers: list[ChosenLayer]
    usage: dict[str, Use]
    measured_kl: float | None = None  # the whole child's KL to the parent, when the search measured it
    tournament_kl: float | None = None  # its KL after the tournament's short KD (search.tournament)

    @property
    def blocks(self) -> list[BlockChoice]:
        return [layer.choice for layer in self.layers]

    def to_json(self) -> dict:
        return {
            "status": self.status.value, "objective": self.objective,
            "layers": [{"layer": i, **x.choice.to_json(), "score": x.score} for i, x in enumerate(self.layers)],
            "usage": {quantity: asdict(u) for quantity, u in self.usage.items()},
            "measured_kl": self.measured_kl,
            "tournament_kl": self.tournament_kl,
        }

    @classmethod
    def from_json(cls, data: dict) -> Architecture:
        layers = [ChosenLayer(BlockChoice.from_json(x), x.get("score")) for x in data["layers"]]
        usage = {quantity: Use(**u) for quantity, u in data.get("usage", {}).items()}
        return cls(Status(data.get("status", "optimal")), data.get("objective"), layers, usage, data.get("measured_kl"),
                   data.get("tournament_kl"))

    @classmethod
    def of(cls, solution: Solution, problem: SearchProblem, labels: dict[str, str]) -> Architecture:
        layers = [ChosenLayer(problem.layers[i][c].label, problem.layers[i][c].score)
                  for i, c in enumerate(solution.choice)]
        usage = {k: Use(u.used, u.limit, problem.parent_totals[k], labels.get(k, k)) for k, u in solution.usage.items()}
        return cls(solution.status, solution.objective, layers, usage)


@dataclass(frozen=True)
class BatchResult:
    batch_size: int
    objective: float | None  # None: no child meets the budgets at this batch size


@dataclass(frozen=True)
class SearchOutcome:
    method: str  # search.method
    solutions: list[Architecture]
    greedy: Architecture | None
    notes: list[str]
    batch_size: int
    batch_sweep: list[BatchResult]
    file: Path
    solve_seconds: float
    seconds: float


def solutions_json(outcome: SearchOutcome) -> dict:
    return {
        "method": outcome.method,
        "solve_seconds": outcome.solve_seconds,
        "solutions": [a.to_json() for a in outcome.solutions],
        "greedy": outcome.greedy.to_json() if outcome.greedy else None,
        "notes": outcome.notes,
        "batch_size": outcome.batch_size,
        "batch_sweep": [asdict(b) for b in outcome.batch_sweep],
    }


def read_solutions(path: Path) -> SearchOutcome:
    data = read_json(path)
    try:
        return _outcome(data, path)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise PuzzleError(f"{path}: damaged, not a solutions file ({type(e).__name__}: {e}); run `puzzle search` "
                          "again") from None


def _outcome(data: dict, path: Path) -> SearchOutcome:
    return SearchOutcome(
        method=data.get("method", "mip"), solutions=[Architecture.from_json(x) for x in data["solutions"]],
        greedy=Architecture.from_json(data["greedy"]) if data.get("greedy") else None, notes=data.get("notes", []),
        batch_size=data.get("batch_size"), batch_sweep=[BatchResult(**b) for b in data.get("batch_sweep", [])],
        file=path, solve_seconds=data.get("solve_seconds", 0.0), seconds=0.0,
    )


