"""Exceptions with messages meant for the person running the tool."""


class VaelocError(Exception):
    """Base class: every error napari-vaeloc raises on purpose."""


class InputError(VaelocError, ValueError):
    """The scan (file or array) cannot be scored as given."""


class ModelError(VaelocError):
    """A model directory is missing, malformed, or its weights do not match."""


class OutputExistsError(VaelocError, FileExistsError):
    """Refusing to overwrite an existing file."""


class Cancelled(VaelocError):
    """A run was stopped through its cancel flag; nothing was returned."""
