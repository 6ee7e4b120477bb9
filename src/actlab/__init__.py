"""actlab: profile the insides of Hugging Face causal LMs and transform them, with the cost measured."""

from actlab.errors import ActlabError
from actlab.models import LoadedModel, load_model, wrap

__version__ = "0.1.0"
__all__ = ["ActlabError", "LoadedModel", "__version__", "load_model", "wrap"]
