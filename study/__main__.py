"""`python -m study COMMAND ...`: the functional-roles study as jobs of the project.

    python -m study report --sweep-id study-digits   tables, verdicts, plots, parent MLflow run
    python -m study run ...                          (study/run.py)

Each command is its own module with a `main(argv) -> exit code`, imported only when chosen, so
one command's dependencies never slow down or break another.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "report": ("study.report", "read a study's runs from MLflow: results.csv, summary.csv, report.md with "
                               "the paper's findings, plots, and a parent run nesting the variants"),
    "run": ("study.run", "train and evaluate every variant x seed of the study, then report"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        # no help of its own: `python -m study report --help` is the command's own help
        sub.add_parser(name, help=help_text, add_help=False)
    args, rest = parser.parse_known_args(argv)
    return importlib.import_module(COMMANDS[args.command][0]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
