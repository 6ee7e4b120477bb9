"""Fast batch-1 greedy decoding on CPU: C++/OpenMP GEMV kernels that skip what a recipe drops."""

from actlab.engine.decode import DecodeEngine, GenerationStats
from actlab.engine.plan import EnginePlan

__all__ = ["DecodeEngine", "EnginePlan", "GenerationStats"]
