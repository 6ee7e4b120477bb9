"""Export: a model with a recipe as a Hugging Face directory (hf.py) or a GGUF file (gguf.py)."""

from actlab.export.gguf import export_gguf
from actlab.export.hf import export_hf

__all__ = ["export_gguf", "export_hf"]
