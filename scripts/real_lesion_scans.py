"""Write the real scans with real lesions (pyradiomics' contrast-enhanced T1 heads) as NIfTI
scan / mask pairs for ``vaeloc evaluate scans``.

Usage::

    python scripts/real_lesion_scans.py real_lesions
    vaeloc evaluate scans real_lesions --model t1-brain --maps default --device cpu

Needs the archive that ``bash scripts/setup.sh --dev`` downloads.
"""

from __future__ import annotations

import argparse
import sys

from napari_vaeloc.errors import VaelocError
from napari_vaeloc.evaluation.real_lesions import SCANS, write_scan_pairs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder to write NAME.nii.gz and NAME_mask.nii.gz into")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    args = p.parse_args(argv)
    try:
        paths = write_scan_pairs(args.out, overwrite=args.overwrite)
    except VaelocError as exc:
        print(f"real_lesion_scans: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"{path}: {SCANS[path.name.removesuffix('.nii.gz')].description}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
