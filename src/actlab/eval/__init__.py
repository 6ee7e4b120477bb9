"""The one evaluation harness every method uses: perplexity, task accuracy, speed."""

from actlab.eval.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
