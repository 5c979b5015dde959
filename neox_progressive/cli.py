"""The `neox-progressive` command: one entry point, one verb per job.

Each verb lives in ``neox_progressive/commands/<verb>.py`` and provides:

- ``HELP``: one line for the verb list;
- the module docstring: the verb's ``--help`` description;
- ``EXAMPLES``: shown at the end of ``--help``;
- ``add_arguments(parser)`` and ``run(args) -> int``.

Errors meant for users are `UserError`s: printed as one line, exit status 2 (1 for a check that
found problems); ``--debug`` prints the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from neox_progressive import __version__
from neox_progressive.errors import UserError

# verb -> module under neox_progressive.commands, in the order `--help` lists them.
VERBS = {
    "demo": "demo",
    "plan": "plan",
    "generate-configs": "generate_configs",
    "prepare-data": "prepare_data",
    "run": "run",
    "expand": "expand",
    "inspect": "inspect",
    "export-hf": "export_hf",
    "eval": "eval",
    "neox-patch": "neox_patch",
}


def _command_modules():
    for verb, name in VERBS.items():
        full = f"neox_progressive.commands.{name}"
        if importlib.util.find_spec(full) is not None:
            yield verb, importlib.import_module(full)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neox-progressive",
        description=(
            "Build a GPT-NeoX model family by progressive training (Yano et al. 2025): plan the "
            "token budgets, generate per-stage NeoX configs, grow each trained member into the "
            "next with bert2BERT AKI, train, and evaluate the family."
        ),
        epilog="Run `neox-progressive VERB --help` for the options and examples of each verb.",
    )
    parser.add_argument("--version", action="version", version=f"neox-progressive {__version__}")
    parser.add_argument("--debug", action="store_true", help="print full tracebacks on errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, mod in _command_modules():
        examples = getattr(mod, "EXAMPLES", "").strip()
        p = sub.add_parser(
            verb,
            help=mod.HELP,
            description=(mod.__doc__ or mod.HELP).strip(),
            epilog=("examples:\n" + examples) if examples else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="print full tracebacks on errors")
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run_tool(verb: str, argv: list[str] | None = None) -> int:
    """Entry for the thin scripts in tools/: `run_tool("expand")` == `neox-progressive expand`."""
    return main([verb, *(sys.argv[1:] if argv is None else argv)])
