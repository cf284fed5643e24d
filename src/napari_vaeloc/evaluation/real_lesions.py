"""Real scans with real lesions and their masks, for ``vaeloc evaluate scans``.

pyradiomics ships two clinical brain MRI in its source distribution's ``data/`` folder (its own
test cases ``brain1`` and ``brain2``): T1-weighted heads of two people after a gadolinium
contrast agent, with skull, in 6.5 mm axial slices of 0.78 mm pixels (256 x 256 x 25 and x 23),
each with a mask of its enhancing lesion (16.4 ml and 1.8 ml). They are the only real lesions
with masks that ship in a package here: another modality than the bundled ``t1-brain`` learned
(no contrast agent, 1 mm), so they measure how the plugin does on what a clinic would open, not
the method on its own terms. They are read from the archive (BSD-3-Clause, evaluation only,
nothing derived is shipped) and written as NIfTI scan / mask pairs in the layout
:func:`napari_vaeloc.evaluation.scan_pairs.find_pairs` reads.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .individual import Archive, read_member

#: pyradiomics' sdist. ``pip download`` refuses it (its metadata names version 3.0.1a1), so
#: ``scripts/setup.sh --dev`` fetches the file from PyPI and checks its sha256
PYRADIOMICS = Archive(
    "pyradiomics",
    "3.1.0",
    "pyradiomics-3.1.0.tar.gz",
    sdist=True,
    url="https://files.pythonhosted.org/packages/03/c1/"
    "20fc2c50ab1e3304da36d866042a1905a2b05a1431ece35448ab6b4578f2/pyradiomics-3.1.0.tar.gz",
)


@dataclass(frozen=True)
class RealLesionScan:
    """One real scan with a real lesion: ``image`` and ``mask`` are NRRD members of
    :data:`PYRADIOMICS`."""

    name: str
    description: str
    image: str
    mask: str


SCANS: dict[str, RealLesionScan] = {
    s.name: s
    for s in (
        RealLesionScan(
            "pyradiomics-brain1",
            "contrast-enhanced T1 head, 0.78 x 0.78 x 6.5 mm, an enhancing lesion of 16.4 ml",
            "pyradiomics-3.1.0/data/brain1_image.nrrd",
            "pyradiomics-3.1.0/data/brain1_label.nrrd",
        ),
        RealLesionScan(
            "pyradiomics-brain2",
            "contrast-enhanced T1 head, 0.78 x 0.78 x 6.5 mm, an enhancing lesion of 1.8 ml",
            "pyradiomics-3.1.0/data/brain2_image.nrrd",
            "pyradiomics-3.1.0/data/brain2_label.nrrd",
        ),
    )
}


def write_scan_pairs(folder: str | Path, overwrite: bool = False) -> list[Path]:
    """Write every scan of :data:`SCANS` as ``NAME.nii.gz`` with its lesion as
    ``NAME_mask.nii.gz`` (uint8, 1 in the lesion) into ``folder`` (made if missing), each in
    the geometry of its NRRD file (SimpleITK writes the direction and origin as sform and
    qform). Returns the scans' paths.

    Raises:
        InputError: the archive is not downloaded (with the command that fetches it), or a
            file to write exists and ``overwrite`` is false (nothing is written then).
    """
    import SimpleITK as sitk

    archive = PYRADIOMICS.path()
    out = Path(folder)
    targets = {
        s.name: (out / f"{s.name}.nii.gz", out / f"{s.name}_mask.nii.gz") for s in SCANS.values()
    }
    existing = [p.name for pair in targets.values() for p in pair if p.exists()]
    if existing and not overwrite:
        held = ", ".join(existing)
        raise InputError(f"{out} already holds {held}; pass --overwrite to replace them")
    with tempfile.TemporaryDirectory() as tmp:  # every file made first: none or all land
        made = []
        for s in SCANS.values():
            for member, dest, pixel in zip(
                (s.image, s.mask), targets[s.name], (None, sitk.sitkUInt8), strict=True
            ):
                raw = Path(tmp) / Path(member).name
                raw.write_bytes(read_member(archive, member))
                img = sitk.ReadImage(str(raw))
                if pixel is not None:
                    img = sitk.Cast(img > 0, pixel)
                sitk.WriteImage(img, str(Path(tmp) / dest.name), True)
                made.append(dest)
        out.mkdir(parents=True, exist_ok=True)
        for dest in made:
            shutil.move(Path(tmp) / dest.name, dest)
    return [scan for scan, _ in targets.values()]
