"""Export of the widget's result: the mask (and optionally every map) as NIfTI in the input
scan's original geometry, asking before anything is replaced."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._widget_controller import Session


def export_session(
    session: Session, path: str | Path, overwrite: bool = False, maps: bool = False
) -> list[Path]:
    """Write the session's mask to ``path`` (``.nii.gz`` added when missing); with ``maps``,
    write every map, the combined map, the mask and the scores JSON next to it instead
    (``<stem>_mask.nii.gz`` etc., the files of ``vaeloc localize``).

    Raises:
        OutputExistsError: a target exists and ``overwrite`` is false (nothing is written).
        OutputError: the folder cannot be used or written, a target is a folder, or writing
            failed (nothing of the set is written).
    """
    from .export import write_result
    from .io import check_output_folder, save_nifti

    path = Path(path)
    if not str(path).lower().endswith((".nii", ".nii.gz")):
        path = path.with_name(path.name + ".nii.gz")
    check_output_folder(path.parent)
    vol = session.volume
    if not maps:
        return [save_nifti(session.mask().reshape(vol.shape), vol, path, "mask", overwrite)]
    stem = path.name.split(".nii")[0].removesuffix("_mask")
    return list(write_result(session.result, session, path.parent, stem, overwrite).values())


def export_with_dialog(
    widget: Any,
    session: Session,
    fallback_stem: str,
    maps: bool,
    confirm: Callable[[str], bool],
) -> list[Path]:
    """Ask for a file name, export, and ask ``confirm`` before replacing files; failures become
    notifications. Returns the files written (empty when cancelled or failed)."""
    from napari.utils.notifications import show_error, show_info
    from qtpy.QtWidgets import QFileDialog

    from .errors import OutputExistsError, VaelocError
    from .io import scan_stem

    src = session.volume.path
    folder = src.parent if src is not None else Path.home()
    stem = scan_stem(src) if src is not None else fallback_stem
    path, _ = QFileDialog.getSaveFileName(
        widget.native,
        "Save the mask",
        str(folder / f"{stem}_mask.nii.gz"),
        "NIfTI (*.nii.gz *.nii)",
        options=QFileDialog.Option.DontConfirmOverwrite,  # we ask ourselves, for every file
    )
    if not path:
        return []
    try:
        try:
            files = export_session(session, path, maps=maps)
        except OutputExistsError as exc:
            if not confirm(f"{exc}.\n\nReplace the existing files?"):
                return []
            files = export_session(session, path, overwrite=True, maps=maps)
    except (VaelocError, OSError) as exc:
        show_error(export_failure(exc))
        return []
    show_info(f"saved {len(files)} file(s) to {Path(files[0]).parent}")
    return files


def export_failure(exc: BaseException) -> str:
    """The one-line notification for a failed export (an OutputError names the file and the
    reason; a bare OSError gives its reason and path, not Python's ``[Errno N]`` form)."""
    from .errors import VaelocError, describe_os_error

    if isinstance(exc, OSError) and not isinstance(exc, VaelocError):
        text = describe_os_error(exc)
    else:
        text = str(exc) or type(exc).__name__
    return "export failed: " + " ".join(text.split())


def ask_overwrite(parent: Any, message: str) -> bool:
    """A Yes/No question box; True when the user agrees to replace."""
    from qtpy.QtWidgets import QMessageBox

    answer = QMessageBox.question(parent, "File exists", message)
    return answer == QMessageBox.StandardButton.Yes
