"""Learning: blockwise local distillation, replace-1-block scoring, global KD, expert importance, metrics.

Installed as `puzzle.distill`. Imports `puzzle.blocks` and the leaf modules `puzzle.errors` and
`puzzle.io`; never `puzzle.search` or the orchestration modules (docs/design.md §13).
"""
