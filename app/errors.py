"""The service's error taxonomy. HTTP statuses are assigned in one place: ``app/api/errors.py``."""

from __future__ import annotations


class RerankError(Exception):
    """Base class: ``message`` is safe to show a client; ``param`` names the offending input, if any."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(RerankError):
    """The client sent something that cannot be scored (wrong type, missing field, bad value)."""


class MalformedBodyError(RerankError):
    """The body is not parseable JSON (syntax, encoding, nesting)."""


class UnsupportedMediaTypeError(RerankError):
    """The body was sent with a Content-Type other than JSON (or none), so it was never parsed as JSON."""


class PayloadTooLargeError(RerankError):
    """The body, the document count or the work a request asks for is over a configured limit."""


class AuthenticationError(RerankError):
    """Missing or wrong API key."""


class ModelNotFoundError(RerankError):
    """The request names a model this server does not serve."""


class OverloadedError(RerankError):
    """This worker's queue is full: the client should retry after a short wait."""

    retry_after_s = 1


class NotReadyError(RerankError):
    """The model is not loaded, not healthy, or the worker is shutting down."""

    retry_after_s = 5


class EngineFailure(RerankError):
    """The model failed while scoring: a server fault, never the client's."""
