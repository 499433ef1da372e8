"""The node's exception hierarchy.

Every error the node raises on purpose derives from :class:`NodeError`. Whether a failed
job or delivery is tried again is decided by the class alone: :class:`RetryableError`
(a peer is down, a database is busy) or :class:`PermanentError` (the input can never work).
"""


class NodeError(Exception):
    """Base of all errors raised by the node on purpose."""


class ConfigError(NodeError):
    """A configuration file or model manifest is invalid; the message names the key."""


class RetryableError(NodeError):
    """The operation may succeed if tried again later."""


class PermanentError(NodeError):
    """The operation can never succeed with this input; retrying is pointless."""


class InputError(PermanentError):
    """A series cannot be used by a model (wrong modality, broken geometry, ...)."""


class DeliveryError(RetryableError):
    """A destination could not be reached or refused an object."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An error as one short log line: the driver's own message for a database error
    (SQLAlchemy's ``orig``), its first line, at most ``limit`` characters."""
    text = str(getattr(exc, "orig", None) or exc)
    return text.splitlines()[0][:limit] if text.strip() else type(exc).__name__
