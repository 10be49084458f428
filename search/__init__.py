"""Choosing: budgets, hardware figures, profiling and timing, the search problem, the MIP and the baselines.

Installed as `puzzle.search`. Imports `puzzle.blocks` and the leaf modules `puzzle.errors` and
`puzzle.io`; never `puzzle.distill` or the orchestration modules (docs/design.md §13).
"""
