"""Exceptions with messages meant for the person running the tool."""


class VaelocError(Exception):
    """Base class: every error napari-vaeloc raises on purpose."""


class InputError(VaelocError, ValueError):
    """The scan (file or array) cannot be scored as given."""


class ModelError(VaelocError):
    """A model directory is missing, malformed, or its weights do not match."""


class OutputExistsError(VaelocError, FileExistsError):
    """Refusing to overwrite existing files; ``paths`` lists them. The message names them and
    gives no advice: each front says how to replace them in its own terms."""

    def __init__(self, paths, what: str = "file") -> None:
        from pathlib import Path

        self.paths = [Path(p) for p in ([paths] if isinstance(paths, str | Path) else paths)]
        first = self.paths[0] if self.paths else Path(".")
        if len(self.paths) == 1:
            msg = f"{first} exists"
        else:
            names = ", ".join(p.name for p in self.paths[:4])
            more = " ..." if len(self.paths) > 4 else ""
            msg = f"{len(self.paths)} {what}s exist in {first.parent} ({names}{more})"
        super().__init__(msg)


class Cancelled(VaelocError):
    """A run was stopped through its cancel flag; nothing was returned."""
