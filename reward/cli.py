"""``hyperalign``: one command, subcommands dispatched to their modules (imported lazily).

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Explicit registry: an unknown name fails loudly.
COMMANDS: dict[str, tuple[str, str]] = {
    "score": ("reward.cli_score", "score images against prompts with a HyperAlign reward"),
    "train": (
        "reward.train",
        "train HyperAlign on alignment MOS (AGIQA-3K, AIGCIQA2023, PKU-I2IQA, CSV)",
    ),
    "eval": (
        "reward.evaluate",
        "evaluate HyperAlign checkpoints on an IQA dataset (metrics, CSV, plot)",
    ),
    "shapes-data": ("reward.shapes.dataset", "build a shapes-world alignment dataset (PNG + CSV)"),
    "evaluate": (
        "rlhf.checkpoint_eval",
        "compare generator checkpoints: generate with pipeline/LoRAs, score, report",
    ),
    "llava": ("vlm_tools.llava_cli", "contrastive-attention LLaVA critic: score, masking"),
    "disclip": ("vlm_tools.description_cli", "description-selection CLIP: evaluate on a folder"),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser (lists the commands; no subcommand module is imported)."""
    parser = argparse.ArgumentParser(
        prog="hyperalign",
        description="HyperAlign reward model, training, evaluation and critics. "
        "Run 'hyperalign COMMAND --help' for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        build_parser().print_help()
        return 0 if argv else 2
    name = argv[0]
    if name not in COMMANDS:
        print(
            f"hyperalign: unknown command {name!r}; valid commands: {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)  # only the command that runs is imported
    parser = argparse.ArgumentParser(
        prog=f"hyperalign {name}",
        description=module.__doc__ or help_text,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())
