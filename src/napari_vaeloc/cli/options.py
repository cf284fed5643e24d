"""Options that several subcommands share, each defined once, and the progress-bar helpers.

Every ``add_*`` function adds one option to a sub-parser; a subcommand picks the ones it
needs and, where the meaning differs, passes its own default or help.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..mapnames import AXIS_NAMES

if TYPE_CHECKING:
    from ..models.store import LoadedModel

DEFAULT_MODEL = "t2-brain"


def add_model(p: argparse.ArgumentParser) -> None:
    """``--model NAME|PATH``: a bundled model or a model folder (default: t2-brain)."""
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="bundled model name (see `vaeloc models`) or a model folder (default: %(default)s)",
    )


def add_device(p: argparse.ArgumentParser) -> None:
    """``--device``: where to run the model (default: auto)."""
    p.add_argument(
        "--device",
        default="auto",
        help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps (default: auto)",
    )


def add_out(
    p: argparse.ArgumentParser, help: str, default: str | None = None, required: bool = False
) -> None:
    """``--out``: the output folder (or model folder); ``default``, ``help`` and ``required``
    say what it means for the subcommand."""
    p.add_argument("--out", default=default, required=required, help=help)


def add_axis(
    p: argparse.ArgumentParser, default: str | None = None, help: str | None = None
) -> None:
    """``--axis``: an anatomical slicing axis, one of :data:`..mapnames.AXIS_NAMES`."""
    p.add_argument("--axis", choices=list(AXIS_NAMES), default=default, help=help)


def add_seed(p: argparse.ArgumentParser) -> None:
    """``--seed``: the random seed (default: 0)."""
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def add_threads(p: argparse.ArgumentParser) -> None:
    """``--threads``: how many CPU threads torch may use (default: torch's choice)."""
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")


def add_overwrite(p: argparse.ArgumentParser, what: str = "existing output files") -> None:
    """``--overwrite``: replace ``what`` instead of refusing to."""
    p.add_argument("--overwrite", action="store_true", help=f"replace {what}")


def add_quiet(p: argparse.ArgumentParser) -> None:
    """``--quiet``: no progress bar."""
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def load_model_option(args: argparse.Namespace) -> LoadedModel:
    """The model that ``--model`` names."""
    from ..models.store import cached_model

    return cached_model(args.model)


def progress_bar(desc: str, unit: str, args: argparse.Namespace) -> Any:
    """A tqdm bar on stderr, disabled by ``--quiet``; use it as a context manager."""
    from tqdm.auto import tqdm

    return tqdm(desc=desc, unit=unit, disable=args.quiet, file=sys.stderr, dynamic_ncols=True)


def fraction_progress(bar: Any) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback that moves ``bar``."""

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return progress
