"""Export a NeoX checkpoint to a transformers LlamaForCausalLM directory.

Reads the checkpoint one layer at a time (any TP degree, pipeline or sequential format) and
writes safetensors shards plus a config.json with the real FFN width (`intermediate_size`),
`num_key_value_heads`, `rms_norm_eps` and `rope_theta`. The fused QKV is split the way NeoX
itself fuses it: per head interleaved for MHA, blocked for GQA (NeoX's own converter gets MHA
wrong). Models with partial rotary (`rotary_pct` < 1) have no HF Llama equivalent and are refused.
"""

from __future__ import annotations

import sys

from neox_progressive.config import ModelShape
from neox_progressive.hf import export_hf
from neox_progressive.io.reader import CheckpointReader

HELP = "export a NeoX checkpoint as a transformers LlamaForCausalLM directory"
EXAMPLES = """
  neox-progressive export-hf runs/family/progressive/8B/checkpoints --config configs/neox/stage_8B.yml --out hf/8B
  neox-progressive export-hf ckpt/global_step1000 --config a.yml --config b.yml --out hf/1B --dtype bf16
"""


def add_arguments(p) -> None:
    p.add_argument("ckpt", help="NeoX save dir (with `latest`) or a global_stepN dir")
    p.add_argument("--config", action="append", required=True, metavar="YML",
                   help="the member's NeoX YAML file(s), repeatable")
    p.add_argument("--out", required=True, help="output directory (refused if it exists, unless --force)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="tensor dtype of the export (auto: as stored in the checkpoint)")
    p.add_argument("--bos-id", type=int, default=None, help="bos_token_id for config.json")
    p.add_argument("--eos-id", type=int, default=None, help="eos_token_id for config.json")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="export NaN/Inf weights as they are (refused by default: a diverged checkpoint)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from tqdm import tqdm

    from neox_progressive.hf import check_exportable
    from neox_progressive.io.writer import check_destination

    shape = ModelShape.from_yamls(args.config)
    check_exportable(shape)
    check_destination(args.out, args.force)
    reader = CheckpointReader(args.ckpt, shape)
    with tqdm(total=reader.shape.num_layers, desc="export-hf", unit="layer", disable=args.quiet, file=sys.stderr) as bar:
        out = export_hf(reader, args.out, dtype=args.dtype, force=args.force, bos=args.bos_id, eos=args.eos_id,
                        progress=lambda i: bar.update(1), allow_nonfinite=args.allow_nonfinite)
    print(f"wrote {out} (LlamaForCausalLM, {reader.shape.num_layers} layers, vocab {reader.shape.padded_vocab_size})")
    return 0
