"""``vaeloc prepare``: bring a scan into a model's template space and write what it did."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``prepare`` subcommand."""
    pr = subparsers.add_parser(
        "prepare",
        help="prepare a scan for a model and write the prepared scan, brain mask and transform",
        description="Run the preparation that `vaeloc localize` runs before scoring: N4 "
        "bias-field correction, brain extraction (deepbet) when the scan has a skull, affine "
        "registration to the model's template, and the input-fit checks (voxel size, skull, "
        "coverage, registration quality, modality). Writes SCAN_prepared.nii.gz (the brain on "
        "the template's grid), SCAN_brain_mask.nii.gz and SCAN_corrected.nii.gz (on the scan's "
        "own grid), SCAN_to_template.tfm (ITK transform) and SCAN_prepare.json (steps and "
        "checks).",
    )
    pr.add_argument("scan", help="the scan, .nii or .nii.gz (4D with --volume-index)")
    options.add_model(pr, options.AUTO_MODEL, options.AUTO_MODEL_HELP)
    options.add_prepare(pr, default="auto")
    options.add_out(
        pr, help="output folder (default: next to the scan; the current folder for a sample)"
    )
    options.add_volume_index(pr)
    options.add_threads(pr)
    options.add_overwrite(pr)
    options.add_quiet(pr)
    pr.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Prepare ``args.scan`` for the model and write the results; returns the exit status."""
    from ..errors import InputError
    from ..io import (
        check_output_folder,
        default_output_folder,
        load_volume,
        refuse_existing,
        scan_stem,
    )
    from ..models.store import cached_model, resolve_model_path
    from ..prepare import Template, prepare_cached, prepared_paths, save_prepared

    settings = options.prepare_settings(args)
    options.use_threads(args)
    if not settings.enabled:
        raise InputError("--prepare none prepares nothing; choose auto or full")
    out = check_output_folder(Path(args.out) if args.out else default_output_folder(args.scan))
    refuse_existing(prepared_paths(out, scan_stem(args.scan)).values(), args.overwrite, "file")
    volume = load_volume(args.scan, volume_index=args.volume_index)
    name = options.model_for_scan(args, volume, settings)
    model = cached_model(name)
    template = Template.of_model(resolve_model_path(name), model.card)
    prepared = prepare_cached(volume, template, settings, stage=options.stage_printer(args))
    paths = save_prepared(prepared, out, scan_stem(args.scan), overwrite=args.overwrite)
    options.print_preparation(prepared.report, args)
    for p in paths.values():
        print(p)
    return 0
