"""What a layer can become: candidate specs, their modules, initialization from the parent, analytic costs.

Depends on torch and transformers only; never on `puzzle`, `distill` or `search`.
"""
