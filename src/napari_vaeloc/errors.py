"""Exceptions with messages meant for the person running the tool."""

from __future__ import annotations


class VaelocError(Exception):
    """Base class: every error napari-vaeloc raises on purpose."""


class InputError(VaelocError, ValueError):
    """The scan (file or array) cannot be scored as given."""


class MisfitError(InputError):
    """The scan does not fit the model (wrong modality, failed registration, too little
    coverage, ...). ``report`` is the preparation's report (its steps and checks), so a front can
    show what was found before the one-line reason."""

    def __init__(self, message: str, report: object = None) -> None:
        super().__init__(message)
        self.report = report


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


class OutputError(VaelocError):
    """The output location cannot be used: the folder is a file or lies under one, cannot be
    created or written (read-only, immutable, /proc), a target file is a folder, or writing
    failed (disk full). ``path`` names the location; the message is one line that names it and
    the reason."""

    def __init__(self, path, message: str) -> None:
        from pathlib import Path

        self.path = Path(path)
        super().__init__(" ".join(str(message).split()))  # always one line

    @classmethod
    def from_os(cls, path, exc: OSError, doing: str = "write") -> OutputError:
        """``cannot <doing> <path>: <the system's reason>``."""
        return cls(path, f"cannot {doing} {path}: {os_reason(exc)}")


def os_reason(exc: BaseException) -> str:
    """The system's reason for an OSError, without errno and path ("No space left on device")."""
    reason = getattr(exc, "strerror", None)
    return str(reason) if reason else (str(exc) or type(exc).__name__)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (its whitespace runs collapsed), or its type's name
    when it has none: how every front reports an error."""
    return " ".join(str(exc).split()) or type(exc).__name__


def describe_os_error(exc: OSError) -> str:
    """One line for an OSError: ``<reason>: <path>`` (or just the reason when it names no
    path), instead of Python's ``[Errno 28] ...: '<path>'``."""
    names = [n for n in (exc.filename, getattr(exc, "filename2", None)) if n]
    reason = os_reason(exc)
    line = f"{reason}: {' -> '.join(str(n) for n in names)}" if names else reason
    return " ".join(line.split())


class Cancelled(VaelocError):
    """A run was stopped through its cancel flag; nothing was returned."""
