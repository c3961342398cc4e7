"""Errors that reach users. Each message says what to fix."""


class SdStudioError(Exception):
    """Base class: the message is shown to the user as is (no traceback)."""


class RequestError(SdStudioError):
    """A request field is invalid. `field` names it, so doors can show the message next to it."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class ModelError(SdStudioError):
    """A model cannot be found, recognised or loaded."""


class Cancelled(SdStudioError):
    """The job was cancelled through its cancel token."""


class StoreError(SdStudioError):
    """The history / job database cannot be opened or used; the file is left untouched."""


class NotFound(SdStudioError):
    """A job, image or model asked for by id does not exist (HTTP 404)."""
