"""Typed errors raised by the engine and the adapter registry.

Owns: the exception classes callers catch. The HTTP layer maps each to one status code in one
place; nothing here knows about HTTP.
"""


class LoraplexError(Exception):
    """Base class of every error loraplex raises on purpose."""


class ModelLoadError(LoraplexError):
    """The base model directory cannot be served (missing files, unsupported architecture, bad flags)."""


class AdapterInvalid(LoraplexError):
    """An adapter was read but cannot be served on this base; the message names the problem."""


class AdapterNotFound(LoraplexError):
    """No adapter of that name (or directory) exists."""


class RequestInvalid(LoraplexError):
    """A generation request cannot be run as given (too long, bad sampling values)."""
