"""Export of the widget's result: the mask (and optionally every map) as NIfTI in the input
scan's original geometry. The widget asks for the file name and before anything is replaced
(GUI thread), then writes in a worker thread (:func:`export_session`)."""

from __future__ import annotations

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

    path = _nifti_name(path)
    check_output_folder(path.parent)
    vol = session.volume
    if not maps:
        return [save_nifti(session.mask().reshape(vol.shape), vol, path, "mask", overwrite)]
    return list(
        write_result(session.result, session, path.parent, _set_stem(path), overwrite).values()
    )


def export_plan(session: Session, path: str | Path, maps: bool = False) -> tuple[Path, list[Path]]:
    """The file name :func:`export_session` will use for ``path`` and the files of the set that
    exist already; checks the folder first, so a bad location is reported before any work.

    Raises:
        OutputError: the folder cannot be used or written (one line naming it and why).
    """
    from .export import output_paths
    from .io import check_output_folder
    from .mapnames import OUTPUT_MAPS

    path = _nifti_name(path)
    check_output_folder(path.parent)
    if maps:
        names = [k for k in OUTPUT_MAPS if k in session.result.maps]
        targets = list(output_paths(path.parent, _set_stem(path), names).values())
    else:
        targets = [path]
    return path, [t for t in targets if t.exists() or t.is_symlink()]


def _nifti_name(path: str | Path) -> Path:
    path = Path(path)
    if not str(path).lower().endswith((".nii", ".nii.gz")):
        path = path.with_name(path.name + ".nii.gz")
    return path


def _set_stem(path: Path) -> str:
    return path.name.split(".nii")[0].removesuffix("_mask")


def suggested_path(source: Path | None, stem: str) -> Path:
    """Where the save dialog starts: ``<stem>_mask.nii.gz`` in
    :func:`~napari_vaeloc.io.default_output_folder` (beside the scan's file, never inside this
    package)."""
    from .io import default_output_folder

    return default_output_folder(source) / f"{stem}_mask.nii.gz"


def ask_export_path(parent: Any, suggested: Path) -> Path | None:
    """The save dialog (no overwrite question: the widget asks for the whole set itself);
    None when cancelled."""
    from qtpy.QtWidgets import QFileDialog

    path, _ = QFileDialog.getSaveFileName(
        parent,
        "Save the mask",
        str(suggested),
        "NIfTI (*.nii.gz *.nii)",
        options=QFileDialog.Option.DontConfirmOverwrite,
    )
    return Path(path) if path else None


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
