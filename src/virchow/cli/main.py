"""Entry point of the ``virchow`` command.

Each subcommand lives in its own module that defines ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int``. Modules are imported only when their command runs, so ``virchow --help``
stays fast and a missing optional dependency breaks only the command that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from virchow import __version__
from virchow.errors import VirchowError

# Command name -> module under virchow.cli that implements it, in the order shown by --help.
COMMANDS: dict[str, str] = {
    "info": "info",
    "models": "models",
    "embed-tiles": "embed_tiles",
    "embed-slides": "embed_slides",
    "serve": "serve",
    "probe": "probe",
    "train-mil": "train_mil",
    "predict-mil": "predict_mil",
    "heatmap": "heatmap",
    "finetune": "finetune",
    "predict-tiles": "predict_tiles",
    "pretrain": "pretrain",
}

_logger = logging.getLogger(__name__)


def _load_command(module_name: str):
    return importlib.import_module(f"virchow.cli.{module_name}")


def build_parser() -> argparse.ArgumentParser:
    """Build the parser with one subparser per available command."""
    parser = argparse.ArgumentParser(
        prog="virchow",
        description="Embed pathology tiles and whole slides with Virchow, serve it, and train on its embeddings.",
    )
    parser.add_argument("--version", action="version", version=f"virchow {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        try:
            module = _load_command(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("virchow.cli."):
                continue  # command not built yet in this checkout
            raise
        sub = subparsers.add_parser(
            name, help=module.HELP, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def configure_logging(verbose: int, quiet: bool) -> None:
    """Send log records to stderr; only entry points call this, never library code."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose >= 2 else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if verbose < 2:
        for noisy in ("httpx", "urllib3", "PIL", "h5py", "matplotlib", "timm"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    configure_logging(args.verbose, args.quiet)
    try:
        return int(args._run(args) or 0)
    except VirchowError as exc:
        _logger.error("%s", exc)
        _logger.debug("traceback", exc_info=True)
        return 1
    except KeyboardInterrupt:
        _logger.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
