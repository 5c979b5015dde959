"""The `neox-progressive` command: one entry point, one verb per job.

Each verb lives in ``neox_progressive/commands/<verb>.py`` and provides:

- ``HELP``: one line for the verb list;
- the module docstring: the verb's ``--help`` description;
- ``EXAMPLES``: shown at the end of ``--help``;
- ``add_arguments(parser)`` and ``run(args) -> int``.

Errors meant for users are `UserError`s: printed as one line, exit status 2 (1 for a check that
found problems). What the user's system raises (an `OSError` with an errno: a read-only or full
disk, a file where a directory goes; a binary file where text goes) is printed the same way, naming
the path and the fix. Anything else is a bug in the plugin: one line asking to report it, exit
status 3. ``--debug`` prints the traceback instead, for all of them.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import shlex
import sys

from neox_progressive import __version__
from neox_progressive.errors import UserError, system_error_line

BUG_EXIT = 3
"""Exit status of an internal error (a bug to report); 2 is the user's input, 1 a check that failed."""

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
    "import-hf": "import_hf",
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
    except BrokenPipeError:  # `... | head`: the reader left; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (OSError, UnicodeDecodeError) as exc:
        if args.debug:
            raise
        print(f"error: {system_error_line(exc)}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug in the plugin, not the user's input
        if args.debug:
            raise
        print(f"error: internal error in neox-progressive {__version__} ({type(exc).__name__}: "
              f"{str(exc).splitlines()[0] if str(exc) else ''}); this is a bug: please report it with the output of "
              f"`neox-progressive --debug {shlex.join(argv if argv is not None else sys.argv[1:])}`", file=sys.stderr)
        return BUG_EXIT


def run_tool(verb: str, argv: list[str] | None = None) -> int:
    """Entry for the thin scripts in tools/: `run_tool("expand")` == `neox-progressive expand`."""
    return main([verb, *(sys.argv[1:] if argv is None else argv)])
