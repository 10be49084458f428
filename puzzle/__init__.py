"""puzzle: compress LLMs by distillation-based neural architecture search (NVIDIA's Puzzle method)."""

__version__ = "0.1.0"
