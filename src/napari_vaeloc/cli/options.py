"""Options that several subcommands share, each defined once, and the progress-bar helpers.

Every ``add_*`` function adds one option to a sub-parser; a subcommand picks the ones it
needs and, where the meaning differs, passes its own default or help.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..mapnames import AXIS_NAMES
from ..pipeline import AUTO_MODEL as AUTO_MODEL

if TYPE_CHECKING:
    from ..io import Volume
    from ..models.store import LoadedModel
    from ..prepare import PreparationReport, PrepareSettings

DEFAULT_MODEL = "t2-brain"
AUTO_MODEL_HELP = (
    "bundled model name (see `vaeloc models`), a model folder, or auto: the bundled model of "
    "the modality the scan looks like (T1 or T2, found by preparing the scan; the run reuses "
    "that preparation) (default: %(default)s)"
)


def add_model(
    p: argparse.ArgumentParser, default: str | None = DEFAULT_MODEL, help: str | None = None
) -> None:
    """``--model NAME|PATH``: a bundled model or a model folder (default: t2-brain). Commands
    that score one scan pass ``default=AUTO_MODEL, help=AUTO_MODEL_HELP`` and resolve it with
    :func:`model_for_scan`."""
    p.add_argument(
        "--model",
        default=default,
        help=help
        or "bundled model name (see `vaeloc models`) or a model folder (default: %(default)s)",
    )
    p.set_defaults(model_auto=default == AUTO_MODEL)


def load_model_option(args: argparse.Namespace) -> LoadedModel:
    """The model that ``--model`` names."""
    from ..models.store import cached_model

    return cached_model(args.model)


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


def add_volume_index(p: argparse.ArgumentParser) -> None:
    """``--volume-index``: which volume of a 4D file to take."""
    p.add_argument(
        "--volume-index",
        type=int,
        default=None,
        help="which volume of a 4D scan to use (required for 4D files)",
    )


def add_seed(p: argparse.ArgumentParser) -> None:
    """``--seed``: the random seed (default: 0)."""
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def add_threads(p: argparse.ArgumentParser) -> None:
    """``--threads``: how many CPU threads torch may use (default: torch's choice)."""
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice, usually every core)",
    )


def use_threads(args: argparse.Namespace) -> None:
    """Give torch the ``--threads`` asked for (nothing when not given).

    Raises:
        InputError: fewer than 1 thread.
    """
    n = getattr(args, "threads", None)
    if n is None:
        return
    if n < 1:
        from ..errors import InputError

        raise InputError(f"--threads must be 1 or more, not {n}")
    import torch

    torch.set_num_threads(n)


def add_overwrite(p: argparse.ArgumentParser, what: str = "existing output files") -> None:
    """``--overwrite``: replace ``what`` instead of refusing to."""
    p.add_argument("--overwrite", action="store_true", help=f"replace {what}")


def add_quiet(p: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--quiet``: no progress bars, stage lines or preparation report lines (``help``
    replaces the text for a command whose quiet output differs)."""
    p.add_argument(
        "--quiet", action="store_true",
        help=help or "no progress bars, stage lines or the preparation's report lines; the "
        "result's summary, the files written (one a line, on stdout), warnings and errors "
        "still print",
    )  # fmt: skip


def print_preparation(
    report: PreparationReport, args: argparse.Namespace, always: bool = False
) -> None:
    """The preparation's report: its steps and checks on stdout, each check once (its line
    says when it warns); with ``--quiet`` only its warnings, on stderr, unless ``always``."""
    if always or not args.quiet:
        print("preparation:")
        for line in report.lines():
            print(f"  {line}")
    else:
        for warning in report.warnings:
            print(f"warning: {warning}", file=sys.stderr)


def model_for_scan(args: argparse.Namespace, volume: Volume, settings: PrepareSettings) -> str:
    """The model ``--model`` names, or with ``--model auto`` the bundled main model of the
    modality ``volume`` looks like (:func:`..pipeline.model_for_scan`, which prepares the
    scan with ``settings``, cached); then one line on stdout says which and why, e.g.
    "model: t1-brain (the scan looks like T1, r = 0.58)", and the preparation's stages are
    printed on stderr (none with ``--quiet``).

    Raises:
        InputError: ``--model auto`` and the scan is too thin to prepare, no modality is
            recognised, or no bundled model learned it.
    """
    from ..pipeline import model_for_scan

    return model_for_scan(args.model, volume, settings, stage=stage_printer(args), log=print_line)


def print_line(line: str) -> None:
    """Print ``line`` on stdout at once (a ``log`` callback of the core)."""
    print(line, flush=True)


def progress_bar(desc: str, unit: str, args: argparse.Namespace, total: int | None = None) -> Any:
    """A progress bar on stderr, disabled by ``--quiet``; use it as a context manager. On a
    terminal a tqdm bar that redraws its line; otherwise (a log file, a pipe) a
    :class:`LineProgress` that writes whole lines, since a redrawn line runs together there."""
    if not args.quiet and not _is_terminal(sys.stderr):
        return LineProgress(desc, unit, total=total, file=sys.stderr)
    from tqdm.auto import tqdm

    return tqdm(
        desc=desc, unit=unit, total=total, disable=args.quiet, file=sys.stderr,
        dynamic_ncols=True,
    )  # fmt: skip


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LineProgress:
    """Progress for a stream that is not a terminal: one line each time another tenth of the
    total is done (every ``every_s`` seconds without a total) and one when it closes, e.g.
    ``training: 600/1000 steps (60 %), 12 s, val=412.3``. Offers the part of tqdm's interface
    the commands use: ``n``, ``total``, ``update``, ``refresh``, ``set_postfix``, ``close``."""

    def __init__(
        self,
        desc: str,
        unit: str,
        total: int | None = None,
        file: Any = None,
        every_s: float = 30.0,
    ) -> None:
        import time

        self.desc, self.unit, self.total, self.n = desc, unit, total, 0
        self.file = sys.stderr if file is None else file
        self.every_s, self._clock = every_s, time.monotonic
        self._start = self._last_time = self._clock()
        self._last_step, self._last_n = -1, None
        self._postfix = ""

    def update(self, k: int = 1) -> None:
        self.n += k
        self.refresh()

    def set_postfix(self, refresh: bool = True, **values: object) -> None:
        self._postfix = ", ".join(f"{k}={v}" for k, v in values.items())
        if refresh:
            self.refresh()

    def refresh(self) -> None:
        """Write a line if another tenth is done (or ``every_s`` passed without a total)."""
        if self.total:
            step = int(10 * self.n / self.total)
            if step > self._last_step:
                self._last_step = step
                self._write()
        elif self._clock() - self._last_time >= self.every_s:
            self._write()

    def close(self) -> None:
        if self._last_n != self.n and (self._last_n is not None or self.n > 0):
            self._write()  # the last state, unless nothing ever happened

    def _write(self) -> None:
        self._last_time, self._last_n = self._clock(), self.n
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        unit = self.unit if (self.total or self.n) == 1 else self.unit + "s"
        text = f"{self.desc}: {done} {unit}"
        if self.total:
            text += f" ({100 * self.n / self.total:.0f} %)"
        text += f", {self._last_time - self._start:.0f} s"
        if self._postfix:
            text += f", {self._postfix}"
        print(text, file=self.file, flush=True)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LazyBar:
    """Progress bars and stage lines on stderr that never cut into each other (nothing with
    ``--quiet``). A context manager: ``progress(done, total)`` opens a tqdm bar on its first
    call, so that nothing shows before the stage it measures begins; ``stage(name)`` closes the
    open bar (its last state stays on its own line) before it prints "name ...", and the next
    ``progress`` opens a new bar: one bar per stage."""

    def __init__(self, desc: str, unit: str, args: argparse.Namespace) -> None:
        self.desc, self.unit, self.args, self.bar = desc, unit, args, None

    def progress(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = progress_bar(self.desc, self.unit, self.args, total)
        fraction_progress(self.bar)(done, total)

    def stage(self, name: str) -> None:
        self.close()
        if not self.args.quiet:
            print(f"{name} ...", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> LazyBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fraction_progress(bar: Any) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback that moves ``bar``."""

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return progress


def add_prepare(p: argparse.ArgumentParser, default: str = "auto") -> None:
    """``--prepare`` and the per-step switches of :class:`..prepare.PrepareSettings`."""
    from ..prepare import PREPARE_MODES

    p.add_argument(
        "--prepare",
        choices=list(PREPARE_MODES),
        default=default,
        help="bring the scan into the model's template space first: auto (bias correction, "
        "brain extraction when a skull is found, registration), full (every step), none "
        "(score the scan as given: it must already be a skull-stripped brain in the model's "
        "space) (default: %(default)s)",
    )
    for step, what in (
        ("bias-correction", "N4 bias-field correction"),
        ("brain-extraction", "brain extraction (deepbet); auto: when a skull is detected"),
        ("registration", "affine registration to the model's template"),
    ):
        p.add_argument(
            f"--{step}",
            action=argparse.BooleanOptionalAction,
            default=None,
            help=f"force {what} on or off (default: as --prepare says)",
        )


def prepare_settings(args: argparse.Namespace) -> Any:
    """The :class:`..prepare.PrepareSettings` that the ``--prepare`` options ask for."""
    from ..prepare import PrepareSettings

    return PrepareSettings(
        mode=args.prepare,
        bias_correction=args.bias_correction,
        brain_extraction=args.brain_extraction,
        registration=args.registration,
    )


def stage_printer(args: argparse.Namespace) -> Callable[[str], None] | None:
    """A ``stage(name)`` callback that prints each stage on stderr, for a command without a
    progress bar (None with ``--quiet``); with a bar, use :meth:`LazyBar.stage`."""
    if args.quiet:
        return None
    return lambda name: print(f"{name} ...", file=sys.stderr, flush=True)


#: the preparation's advice, and the options of this command line that do what it says
OPTION_WORDS = {
    "force brain extraction on or off": "force brain extraction on or off "
    "(--brain-extraction or --no-brain-extraction)",
}


def in_option_words(message: str, model_auto: bool = True) -> str:
    """``message`` with the preparation's advice naming this command line's options;
    ``model_auto``: the command takes ``--model auto`` (``vaeloc evaluate``'s benchmarks
    do not: they score built-in anatomy with the model named)."""
    for words, here in OPTION_WORDS.items():
        if here not in message:
            message = message.replace(words, here)
    hint = r"\1 (--model NAME; `vaeloc models` lists them)"
    if model_auto:
        hint = r"\1 (--model auto picks one)"
    return re.sub(r"(choose an? \w+ model)(?! \()", hint, message)
