"""Import a Hugging Face checkpoint into GPT-NeoX: HF directory -> NeoX checkpoint (+ the member's NeoX YAML).

`HFReader` (io/hf_reader.py) reads the HF model one part at a time as logical tensors; `CheckpointWriter`
writes them in NeoX's layout (pipeline or sequential format, any TP degree), atomically and under the
output's lock, loadable by NeoX with `finetune: true`. With a NeoX config (`--config`), the config must
describe the HF model (every architecture field, the norm epsilon, the rotary base and, when its
tokenizer is on this machine, the padded vocab); its TP and format are used. `write_config` writes
the member's NeoX YAML from config.json instead (`member_config`), validated like every generated
stage, with a `make_vocab_size_divisible_by` that makes NeoX pad the tokenizer to exactly the HF
embedding rows.

`import.json` in the output records the source (directory, architecture, sha256 of config.json,
every weight file's size), the shape, the notes (tied head, zero biases) and the command line.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from neox_progressive import __version__
from neox_progressive.config import ModelShape, merge_neox_configs
from neox_progressive.errors import UserError
from neox_progressive.io.atomic import check_destination
from neox_progressive.io.hf_reader import HFReader, divisible_by_for, read_hf_config, shape_from_hf_config
from neox_progressive.io.reader import copy_model
from neox_progressive.io.writer import CheckpointWriter
from neox_progressive.tokenizer import config_vocabulary

MANIFEST = "import.json"
DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOKENIZERS = (("tokenizer.json", "HFTokenizer"), ("tokenizer.model", "SPMTokenizer"))


def tokenizer_keys(hf_dir: Path) -> dict[str, str]:
    """NeoX tokenizer keys for the tokenizer files in an HF directory ({} if it has none)."""
    for name, kind in TOKENIZERS:
        if (hf_dir / name).is_file():
            return {"tokenizer_type": kind, "vocab_file": str((hf_dir / name).resolve())}
    if (hf_dir / "vocab.json").is_file() and (hf_dir / "merges.txt").is_file():
        return {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": str((hf_dir / "vocab.json").resolve()),
                "merge_file": str((hf_dir / "merges.txt").resolve())}
    return {}


def member_config(hf_dir: str | Path, tp: int = 1, pp: int = 1) -> dict[str, Any]:
    """The member's NeoX config keys from config.json (shape, norm epsilon, rotary base, tokenizer, vocab padding),
    validated with the NeoX argument validator; NeoX pads the tokenizer to exactly the HF vocab rows."""
    from neox_progressive.neox_args import validate_config

    hf_dir = Path(hf_dir)
    cfg = read_hf_config(hf_dir)
    shape = shape_from_hf_config(cfg, hf_dir / "config.json", tp=tp, pp=pp)
    out: dict[str, Any] = {**tokenizer_keys(hf_dir)}
    vocab = config_vocabulary(out, required=False) if out else None
    size = vocab.size if vocab else None
    rows = shape.padded_vocab_size
    if size is not None and size > rows:
        raise UserError(f"{out['vocab_file']}: the tokenizer has {size} tokens but config.json's vocab_size is "
                        f"{rows}; the tokenizer does not belong to this model")
    shape = shape.replace(make_vocab_size_divisible_by=divisible_by_for(rows, tp, size))
    out = {**shape.to_neox(), **out}
    problems = validate_config(out)
    if problems:
        raise UserError(f"{hf_dir / 'config.json'}: the NeoX config made from it would not run: {problems[0]}")
    return out


def config_yaml(cfg: dict[str, Any], hf_dir: Path) -> str:
    head = (f"# GPT-NeoX model config of {hf_dir.resolve()} (config.json), written by neox-progressive {__version__}\n"
            "# import-hf. Load the imported checkpoint with `load: <its dir>` and `finetune: true`.\n")
    return head + yaml.safe_dump(cfg, sort_keys=False)


def _shape(hf_dir: Path, configs: list[str | Path] | None, tp: int | None, pp: int | None) -> ModelShape | None:
    if not configs:
        return None
    cfg = merge_neox_configs(configs)
    shape = ModelShape.from_neox(cfg, base_dir=Path(configs[0]).parent)
    for flag, value, have in (("--tp", tp, shape.tp), ("--ckpt-format", pp, shape.pp)):
        if value is not None and (value != have if flag == "--tp" else (value == 0) != (have == 0)):
            key = "model_parallel_size" if flag == "--tp" else "pipe_parallel_size"
            raise UserError(f"{flag} disagrees with {configs[0]} ({key}: {have}); NeoX loads a checkpoint only with the "
                            f"config's layout: drop {flag} or change the config")
    return shape


def plan_import(hf_dir: str | Path, configs: list[str | Path] | None = None, *, tp: int | None = None,
                pp: int | None = None, allow_nonfinite: bool = False) -> HFReader:
    """The reader of `hf_dir` with the target shape (from `configs`, else from config.json with `tp` and `pp`);
    every check that needs no tensor data runs here."""
    shape = _shape(Path(hf_dir), configs, tp, pp)
    return HFReader(hf_dir, shape, tp=tp or 1, pp=1 if pp is None else pp, allow_nonfinite=allow_nonfinite,
                    shape_from=", ".join(map(str, configs or [])) or "--config")


def summary(reader: HFReader, out: str | Path, dtype: str = "auto") -> dict[str, Any]:
    s = reader.shape
    size = (DTYPES[dtype] or reader.dtype()).itemsize
    return {"source": str(reader.dir), "architecture": reader.arch_name, "out": str(out),
            "format": "sequential" if s.sequential else "pipeline", "tp": s.tp, "num_layers": s.num_layers,
            "hidden_size": s.hidden_size, "num_heads": s.num_heads, "num_kv_heads": s.num_kv_heads,
            "ffn_size": s.ffn_size, "padded_vocab_size": s.padded_vocab_size, "norm": s.norm,
            "activation": s.activation, "bytes": s.param_count() * size, "notes": list(reader.notes)}


def _record(reader: HFReader, out: str | Path, dtype: str) -> dict[str, Any]:
    from neox_progressive.io.hf_reader import sha256_file

    rec = summary(reader, out, dtype)
    rec.update({"tool": f"neox-progressive {__version__}", "command": sys.argv,
                "config_sha256": sha256_file(reader.config_path),
                "weight_files": {p.name: p.stat().st_size for p in reader.files()}})
    return rec


def import_hf(hf_dir: str | Path, out: str | Path, configs: list[str | Path] | None = None, *, tp: int | None = None,
              pp: int | None = None, dtype: str = "auto", write_config: str | Path | None = None, force: bool = False,
              allow_nonfinite: bool = False, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write `out` as a NeoX checkpoint of the HF model in `hf_dir` (and `write_config` as its NeoX YAML).

    Nothing is written unless every check passes; a failure mid-way leaves nothing that looks like a checkpoint."""
    hf_dir = Path(hf_dir)
    if write_config is not None:
        if configs:
            raise UserError("--write-config writes the member's NeoX config from config.json; with --config the config "
                            "exists already: give one of them")
        member = member_config(hf_dir, tp or 1, 1 if pp is None else pp)
        check_destination(write_config, force, "--write-config")
    reader = plan_import(hf_dir, configs, tp=tp, pp=pp, allow_nonfinite=allow_nonfinite)
    shape = reader.shape
    target = DTYPES[dtype]
    record = _record(reader, out, dtype)
    staged = None
    if write_config is not None:
        staged = Path(tempfile.mkdtemp(prefix=f".{Path(write_config).name}.tmp-", dir=Path(write_config).parent or "."))
        (staged / Path(write_config).name).write_text(config_yaml(member, hf_dir))
        check = ModelShape.from_yamls([staged / Path(write_config).name])
        assert check.padded_vocab_size in (None, shape.padded_vocab_size), (check, shape)
    try:
        copied = [staged / Path(write_config).name] if staged else [Path(c) for c in configs or []]
        writer = CheckpointWriter(out, shape, force=force, configs=copied, dtype=target, need_bytes=record["bytes"],
                                  extra_files={MANIFEST: json.dumps(record, indent=1) + "\n"})
        with writer as w:
            copy_model(reader, w, progress)
        if staged:
            os.replace(staged / Path(write_config).name, write_config)
    finally:
        if staged:
            shutil.rmtree(staged, ignore_errors=True)
    return record

