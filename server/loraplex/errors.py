"""Typed errors raised by the engine and the adapter registry.

Owns: the exception classes callers catch. The HTTP layer maps each to one status code in one
place; nothing here knows about HTTP.
"""


class LoraplexError(Exception):
    """Base class of every error loraplex raises on purpose.

    Args:
        message: what went wrong, phrased for the caller.
        param: the request field at fault, when there is one (reported as OpenAI's `param`).
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ModelLoadError(LoraplexError):
    """The base model directory cannot be served (missing files, unsupported architecture, bad flags)."""


class AdapterInvalid(LoraplexError):
    """An adapter was read but cannot be served on this base; the message names the problem."""


class AdapterNotFound(LoraplexError):
    """No adapter of that name (or directory) exists."""


class RequestInvalid(LoraplexError):
    """A generation request cannot be run as given (too long, bad sampling values)."""


class AdapterMalformed(AdapterInvalid):
    """An adapter's files cannot even be read: not JSON, not safetensors, a pickle."""


class AdapterTooLarge(LoraplexError):
    """An upload is over the configured size limit."""


class RequestTooLarge(LoraplexError):
    """A request body is over the route's size limit."""


class AdapterExists(LoraplexError):
    """An adapter of that name exists and the caller did not ask to overwrite it."""


class QueueFull(LoraplexError):
    """The waiting queue is at its bound; the caller should retry later."""


class ServerDraining(LoraplexError):
    """The server is shutting down and takes no new requests."""


class Unauthorized(LoraplexError):
    """No API key, or one the server does not know."""


class Forbidden(LoraplexError):
    """The caller's key is valid but its role may not do this (admin-only routes)."""


class EngineFailed(LoraplexError):
    """The engine failed while running a request; not the caller's fault."""


class EngineUnavailable(LoraplexError):
    """The engine loop is not running (it died, or has not started); the server cannot serve."""
