"""GPT-NeoX's configuration interface as data, and a validator for NeoX YAML files.

`neox_args.json` lists every NeoX argument (name, type, default) of GPT-NeoX commit ea7aefd8
(megatron/neox_arguments/{neox_args,deepspeed_args}.py), extracted by tools/extract_neox_args.py.
`validate_config(cfg)` / `validate_files(paths)` find what NeoX would refuse at start-up (unknown
key, wrong type, batch triple mismatch, bf16 without ZeRO, ...) without NeoX installed.
"""

from neox_progressive.neox_args.validator import (
    arg_spec,
    known_args,
    source_commit,
    type_problem,
    validate_config,
    validate_files,
)

__all__ = ["arg_spec", "known_args", "source_commit", "type_problem", "validate_config", "validate_files"]
