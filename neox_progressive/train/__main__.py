"""`python -m neox_progressive.train stage.yml [...]`: train one stage with the builtin engine
(the counterpart of NeoX's `deepy.py train.py stage.yml`)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from neox_progressive.errors import UserError
from neox_progressive.train.engine import train_stage


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m neox_progressive.train", description=__doc__)
    p.add_argument("configs", nargs="+", help="the stage's NeoX YAML file(s)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA when available)")
    p.add_argument("--log-path", help="metrics JSONL (default <save>/metrics.jsonl)")
    p.add_argument("--no-resume", action="store_true", help="refuse to continue a checkpoint already in `save`")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--debug", action="store_true", help="full tracebacks")
    args = p.parse_args(argv)
    try:
        result = train_stage(args.configs, device=args.device, quiet=args.quiet, log_path=args.log_path,
                             resume=not args.no_resume)
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(asdict(result), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
