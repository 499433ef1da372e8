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
