"""lm-eval's own command line with the `neox-progressive` model registered.

    python -m neox_progressive.eval.lm_eval_cli --model neox-progressive \\
        --model_args checkpoint=CKPT,config=stage.yml --tasks lambada_openai --device cpu

Every argument is lm-eval's (`lm_eval --help`). The plain `lm_eval` command cannot name this model:
lm-eval loads no plugins, so a model registered from another package is only known once that
package is imported. This entry imports the plugin first (which also makes lm-eval 0.4.1 importable
offline, see harness.py), then runs lm-eval's `cli_evaluate` on the same arguments.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    import importlib

    importlib.import_module("neox_progressive.eval.lm")  # first: registers the model (and lm-eval's offline metric)
    cli_evaluate = importlib.import_module("lm_eval.__main__").cli_evaluate
    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
