"""Errors a user can act on. The CLI prints their message without a traceback."""


class ActlabError(Exception):
    """Base class: the message says what is wrong and what to do about it."""


class ModelLoadError(ActlabError):
    """A model name, path or file that cannot be loaded."""


class UnsupportedArchitectureError(ActlabError):
    """A model whose architecture has no adapter entry."""


class CorpusError(ActlabError):
    """A corpus that cannot give the requested token windows."""


class RunDirectoryError(ActlabError):
    """A run directory that is in use, partial, or not an actlab run."""


class ConfigError(ActlabError):
    """An argument out of range or inconsistent with the model."""
