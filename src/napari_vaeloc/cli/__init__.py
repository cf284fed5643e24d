"""The ``vaeloc`` command: a thin front over the engine.

vaeloc localize SCAN [--model auto|NAME|PATH] [--prepare auto|full|none] [--device DEV] [--out DIR]
vaeloc screen INPUT... --out DIR [--scheduler ADDRESS] [--workers N]
vaeloc prepare SCAN [--model auto|NAME|PATH] [--out DIR]
vaeloc models
vaeloc train SOURCES... --out DIR
vaeloc calibrate MODEL [--weights MAP=W,...] [--fpr F|best-dice]
vaeloc demo [--out DIR]
vaeloc evaluate {fashion-mnist,synthetic,scans,brain} ...

One module per subcommand group adds its sub-parser (``add_parser``) and runs it; the options
they share are defined once in :mod:`.options`.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from .. import __version__
from ..errors import OutputExistsError, VaelocError, describe_os_error, one_line
from . import calibrate, demo, evaluate, localize, models, options, prepare, screen, train

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other error of the
    command (``vaeloc: error: ...``, exit status 2), naming where the options are listed.
    Sub-commands' parsers are of the same class."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        see = f"vaeloc {command} --help" if command else "vaeloc --help"
        self.exit(2, f"vaeloc: error: {' '.join(message.split())} (see {see})\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``vaeloc`` argument parser with every subcommand."""
    p = _Parser(
        prog="vaeloc",
        description="Unsupervised anomaly localization in MRI with variational auto-encoders "
        "(Zimmerer et al., MICCAI 2019).",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (localize, screen, prepare, models, train, calibrate, evaluate, demo):
        group.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``vaeloc`` with ``argv`` (default: the command line); returns the exit status:
    0 on success, 2 on a usage, input or output error (one line on stderr: ``vaeloc: error:
    ...``, never a traceback; a scan the preparation refused first gets its steps and checks,
    one a line, unless --quiet), 130 when interrupted."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except OutputExistsError as exc:
        print(f"vaeloc: error: {exc}; pass --overwrite to replace", file=sys.stderr)
        return 2
    except VaelocError as exc:  # InputError, ModelError, OutputError, ...
        report = getattr(exc, "report", None)  # a refused scan: what the preparation found
        if report is not None and not getattr(args, "quiet", False):
            print("preparation:", file=sys.stderr)  # laid out as a run that goes on lays it out
            for line in report.refusal_lines():
                print(f"  {line}", file=sys.stderr)
        said = options.in_option_words(one_line(exc), getattr(args, "model_auto", True))
        print(f"vaeloc: error: {said}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the front itself could not read or write
        print(f"vaeloc: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vaeloc: interrupted", file=sys.stderr)
        return 130
