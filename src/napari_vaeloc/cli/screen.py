"""``vaeloc screen``: screen a cohort of scans on a Dask cluster (:mod:`..cohort`, with the
table and the report of :mod:`..cohort_report`); each scan's options are ``vaeloc localize``'s
(:func:`.localize.add_scan_options`)."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import InputError, VaelocError
from . import localize, options

EPILOG = (
    "Outputs: OUT/summary.parquet and OUT/summary.csv (one row per scan, most anomalous "
    "first), OUT/report.html (the top scans with a thumbnail of each one's most anomalous "
    "slice), and for every scan OUT/scans/NAME/ with what `vaeloc localize` writes, its "
    "thumbnail and a done-record. Rerun the same command to finish an interrupted screen: "
    "scans whose outputs are complete and were made with the same model and settings are "
    "skipped. See docs/cohort.md."
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``screen`` subcommand."""
    sc = subparsers.add_parser(
        "screen",
        help="screen many scans on a Dask cluster: maps, masks, a ranked table and a report",
        description="Run every scan through the pipeline of `vaeloc localize`, one Dask task "
        "per scan, on a local cluster or one you join, and rank the scans by how anomalous "
        "they are.",
        epilog=EPILOG,
    )
    sc.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="NIfTI scans, folders (searched recursively; other files are listed as skipped) "
        "or CSV files with a scan column and an optional model column",
    )
    options.add_model(sc, options.AUTO_MODEL, options.AUTO_MODEL_HELP)
    localize.add_scan_options(
        sc,
        out_help="the screen's folder; rerun into it to resume (required)",
    )
    cluster = sc.add_argument_group("cluster")
    cluster.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="join the Dask scheduler at ADDRESS (e.g. tcp://host:8786) instead of starting a "
        "local cluster; the output folder must be writable from every worker",
    )
    cluster.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="give up joining the scheduler after S seconds (default: %(default)s)",
    )
    cluster.add_argument(
        "--workers",
        type=int,
        default=None,
        help="local cluster: worker processes (default: one per core, as many as the memory "
        "holds at 3 GB each)",
    )
    cluster.add_argument(
        "--threads-per-worker",
        type=int,
        default=1,
        help="local cluster: scans each worker screens at once (default: %(default)s)",
    )
    cluster.add_argument(
        "--memory-limit",
        default="auto",
        help="local cluster: memory of each worker, e.g. 4GB (default: the machine's memory "
        "shared among the workers); a scan gets half of its worker's share for its data and "
        "maps and fails with the reason when it needs more",
    )
    cluster.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="CPU threads torch and SimpleITK use in each worker (default: the cores shared "
        "among the local workers; on a joined cluster, the libraries' own choice)",
    )
    sc.add_argument(
        "--report-top",
        type=int,
        default=25,
        metavar="N",
        help="scans shown with thumbnails in report.html (default: %(default)s)",
    )
    options.add_overwrite(
        sc,
        "outputs made with another model or other settings (and use a folder that is not a "
        "screen's)",
    )
    options.add_quiet(sc)
    sc.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Screen the scans ``args.inputs`` name into ``args.out``; returns the exit status: 0 when
    every scan was screened, 1 when some failed (their reasons are in the table), 2 on bad
    input (one line, nothing written)."""
    from .. import cohort, cohort_report

    settings = localize.scan_settings(args, check_device=args.scheduler is None)
    for name in ("threads_per_worker", "report_top"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1")
    if args.torch_threads is not None and args.torch_threads < 1:
        raise InputError(f"--torch-threads must be at least 1, not {args.torch_threads}")
    if args.connect_timeout <= 0:
        raise InputError(f"--connect-timeout must be > 0 s, not {args.connect_timeout}")
    if args.scheduler is not None:  # a malformed address fails at once, before any work
        args.scheduler = cohort.check_scheduler_address(args.scheduler)
    cohort.check_model(args.model)  # a typo fails before a cluster starts (a CSV's: below)
    out = Path(args.out)
    jobs, skipped = cohort.find_scans(args.inputs, exclude=out)
    if not jobs:
        raise InputError(
            "no NIfTI scans (.nii or .nii.gz) in " + ", ".join(str(i) for i in args.inputs)
        )
    from ..io import check_output_folder

    check_output_folder(out)
    cohort.check_screen_folder(out, args.overwrite)
    todo = cohort.plan(jobs, settings, out, args.overwrite)
    if todo.stale and not args.overwrite:
        job, why = todo.stale[0]
        n = len(todo.stale)
        raise VaelocError(
            f"{n} scan{'s' if n > 1 else ''} in {out} {'were' if n > 1 else 'was'} screened "
            f"otherwise (first: {job.name}: {why}); pass --overwrite to screen "
            f"{'them' if n > 1 else 'it'} again, or choose another output folder"
        )
    say = print if not args.quiet else (lambda *a, **k: None)
    with (
        _terminate_as_interrupt(),
        _Cluster(args, needed=bool(todo.todo)) as (client, torch_threads, where),
    ):
        # the cluster is up (or joined): run_screen marks the folder as this screen's first
        say(
            f"{len(jobs)} scan{'s' if len(jobs) != 1 else ''}: {len(todo.todo)} to screen, "
            f"{len(todo.reused)} done before"
            + (f", {len(todo.stale)} redone (--overwrite)" if todo.stale else "")
            + (f"; {len(skipped)} other files skipped" if skipped else "")
        )
        if where:
            say(where)
        with options.progress_bar("screening", "scan", args, total=len(todo.todo)) as bar:
            failed = [0]

            def on_row(row: dict[str, Any]) -> None:
                failed[0] += row["status"] == "failed"
                bar.update(1)
                if failed[0]:
                    bar.set_postfix(failed=failed[0], refresh=False)

            result = cohort.run_screen(
                client,
                todo,
                skipped,
                settings,
                out,
                torch_threads=torch_threads,
                on_row=on_row,
                report_top=args.report_top,
            )
    for row in result.rows:
        if row["status"] == "failed":
            print(f"failed: {row['scan']}: {row['error']}", file=sys.stderr)
    print(
        f"screened {result.computed}, reused {result.reused}, failed {result.failed}, "
        f"skipped {result.skipped} in {result.seconds:.0f} s"
    )
    for name in (cohort_report.TABLE_PARQUET, cohort_report.TABLE_CSV, cohort_report.REPORT_HTML):
        print(out / name)
    return 1 if result.failed else 0


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a batch system ending the job) stops the run as Ctrl-C does: the table of
    what was finished is written and the local cluster is shut down."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave the signal alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class _Cluster:
    """A Dask client: of the scheduler ``--scheduler`` names, or of a local cluster sized to the
    machine (closed again at exit), or none when nothing is ``needed``. Enters as (client,
    torch threads per task, one line that says where the scans run)."""

    def __init__(self, args: argparse.Namespace, needed: bool = True) -> None:
        self.args = args
        self.needed = needed
        self.cluster: Any = None
        self.client: Any = None

    def __enter__(self) -> tuple[Any, int | None, str]:
        try:
            return self._start()
        except BaseException:
            self.__exit__()
            raise

    def _start(self) -> tuple[Any, int | None, str]:
        from .. import cohort

        a = self.args
        if not self.needed:  # nothing to screen: no cluster to start or join
            return None, None, ""
        if a.scheduler:
            self.client = cohort.connect(a.scheduler, a.connect_timeout)
            n = len(self.client.scheduler_info().get("workers", {}))
            now = f"{n} worker{'s' if n != 1 else ''} now"
            return self.client, a.torch_threads, f"joined {a.scheduler} ({now})"
        workers, threads, torch_threads = cohort.local_cluster_size(a.workers, a.threads_per_worker)
        self.cluster = cohort.start_local_cluster(workers, threads, a.memory_limit)
        from distributed import Client

        self.client = Client(self.cluster, set_as_default=False)
        where = (
            f"local cluster: {workers} worker{'s' if workers > 1 else ''} x {threads} "
            f"thread{'s' if threads > 1 else ''}, torch threads {a.torch_threads or torch_threads}"
        )
        return self.client, a.torch_threads or torch_threads, where

    def __exit__(self, *exc: object) -> None:
        for thing in (self.client, self.cluster):
            if thing is not None:
                try:
                    thing.close()
                except Exception:  # closing down after an error: the first error counts
                    pass
