"""What a layer can become (docs/design.md §2): candidate specs, their modules, initialization from the parent, analytic costs.

Installed as `puzzle.blocks`. Imports torch, transformers and pydantic, and from the rest of puzzle only
the leaf modules `puzzle.errors` and `puzzle.io`; never `puzzle.distill`, `puzzle.search` or the
orchestration modules (docs/design.md §13).
"""
