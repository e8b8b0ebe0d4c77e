"""The controller's exceptions."""

from weighbridge.errors import WeighbridgeError


class ControllerError(WeighbridgeError):
    """Base of the controller's own errors."""


class AnnotationError(ControllerError):
    """A Service or Pod carries an annotation the controller cannot use.

    ``reason`` is a CamelCase word, used as the Kubernetes Event reason and metric label.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class NotLeaderError(ControllerError):
    """A fenced write was refused: this controller is not (or no longer) the leader."""
