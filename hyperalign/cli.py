"""``hyperalign``: the project's one command line; every subcommand registers here.

A subcommand is a module with two functions (and a docstring, shown as its ``--help``)::

    def add_arguments(parser: argparse.ArgumentParser) -> None: ...
    def run(args: argparse.Namespace) -> int: ...

and one line in :data:`COMMANDS`. Modules are imported only when their command runs.
Ordinary user errors (a missing file, a bad value: ``ValueError``, ``OSError``, ``KeyError``
and ``TypeError`` raised while running) print ``hyperalign NAME: error: <message>`` and exit 2;
``--debug`` (or ``HYPERALIGN_DEBUG=1``) shows the traceback instead. Distributed runs use
``accelerate launch -m hyperalign rl-train ...``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help). Explicit registry: an unknown name fails loudly.
COMMANDS: dict[str, tuple[str, str]] = {
    "score": ("reward.score_cli", "score images against prompts with a HyperAlign reward"),
    "train-reward": (
        "reward.train",
        "train HyperAlign on alignment MOS (AGIQA-3K, AIGCIQA2023, PKU-I2IQA, CSV)",
    ),
    "eval-reward": (
        "reward.evaluate",
        "evaluate HyperAlign checkpoints on labelled MOS data (SRCC/PLCC, CSV, plot)",
    ),
    "rl-train": ("rlhf.train", "RL fine-tuning of Stable Diffusion (DDPO with LoRA)"),
    "eval-checkpoints": (
        "rlhf.evaluation.cli",
        "compare generator checkpoints: generate with pipeline/LoRAs, score, report",
    ),
    "demo": ("rlhf.demo", "the main job: RL on the shapes world, judged by its oracle"),
    "shapes-data": ("shapes.dataset", "build a shapes-world alignment dataset (PNG + CSV)"),
    "llava": ("vlm_tools.llava_cli", "contrastive-attention LLaVA critic: score, masking"),
    "disclip": ("vlm_tools.description_cli", "description-selection CLIP: evaluate on a folder"),
}

RENAMED = {"train": "train-reward", "eval": "eval-reward", "evaluate": "eval-checkpoints"}
"""Names of earlier releases, answered with the new name."""

USER_ERRORS = (ValueError, OSError, KeyError, TypeError)
"""Exceptions reported as a message (exit 2) rather than a traceback."""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser (lists the commands; no subcommand module is imported)."""
    parser = argparse.ArgumentParser(
        prog="hyperalign",
        description="HyperAlign reward model, RL fine-tuning, evaluation and critics. "
        "Run 'hyperalign COMMAND --help' for a command's options.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def command_parser(name: str) -> argparse.ArgumentParser:
    """The full parser of one subcommand (imports its module)."""
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(
        prog=f"hyperalign {name}",
        description=module.__doc__ or help_text,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    return parser


def _debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    debug = os.environ.get("HYPERALIGN_DEBUG", "").lower() in ("1", "true", "yes", "on")
    if "--debug" in argv:
        argv = [a for a in argv if a != "--debug"]
        debug = True
    return debug, argv


def main(argv: list[str] | None = None) -> int:
    """Run ``hyperalign ARGV``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug, argv = _debug_requested(argv)
    if not argv or argv[0] in ("-h", "--help"):
        build_parser().print_help()
        return 0 if argv else 2
    name = argv[0]
    if name not in COMMANDS:
        hint = f" (renamed to {RENAMED[name]!r})" if name in RENAMED else ""
        print(
            f"hyperalign: unknown command {name!r}{hint}; valid commands: {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    args = command_parser(name).parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except USER_ERRORS as err:
        if debug:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"hyperalign {name}: error: {message}", file=sys.stderr)
        print("(run with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
