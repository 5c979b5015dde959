"""Export a NeoX checkpoint to a transformers directory: LlamaForCausalLM or GPTNeoXForCausalLM.

Reads the checkpoint one layer at a time (any TP degree, pipeline or sequential format) and
writes safetensors shards plus a config.json. The Llama shape becomes LlamaForCausalLM with the
real FFN width (`intermediate_size`), `num_key_value_heads`, `rms_norm_eps` and `rope_theta`; the
fused QKV is split the way NeoX itself fuses it: per head interleaved for MHA, blocked for GQA
(NeoX's own converter gets MHA wrong). NeoX's classic transformer (Pythia: LayerNorm, GeLU)
becomes GPTNeoXForCausalLM with `use_parallel_residual` (gpt_j_residual), `rotary_pct`,
`layer_norm_eps` and `hidden_act` gelu_pytorch_tanh when NeoX computed the tanh GeLU
(`bias_gelu_fusion: true`), gelu otherwise. Models with no HF equivalent (a partial-rotary Llama
shape, learned positions, GQA in the classic transformer) are refused before anything is written.
"""

from __future__ import annotations

import sys

from neox_progressive.config import ModelShape
from neox_progressive.hf import export_hf
from neox_progressive.io.reader import CheckpointReader

HELP = "export a NeoX checkpoint as a transformers directory (LlamaForCausalLM or GPTNeoXForCausalLM)"
EXAMPLES = """
  neox-progressive export-hf runs/family/progressive/8B/checkpoints --config configs/neox/stage_8B.yml --out hf/8B
  neox-progressive export-hf ckpt/global_step1000 --config a.yml --config b.yml --out hf/1B --dtype bf16
  neox-progressive export-hf runs/pythia/160M/checkpoints --config configs/neox/pythia_family/stage_160M.yml --out hf/160M
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
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from tqdm import tqdm

    from neox_progressive.hf import hf_arch
    from neox_progressive.io.writer import check_destination

    shape = ModelShape.from_yamls(args.config)
    hf = hf_arch(shape)
    check_destination(args.out, args.force)
    reader = CheckpointReader(args.ckpt, shape)
    with tqdm(total=reader.shape.num_layers, desc="export-hf", unit="layer", disable=args.quiet, file=sys.stderr) as bar:
        out = export_hf(reader, args.out, dtype=args.dtype, force=args.force, bos=args.bos_id, eos=args.eos_id,
                        progress=lambda i: bar.update(1))
    print(f"wrote {out} ({hf.name}, {reader.shape.num_layers} layers, vocab {reader.shape.padded_vocab_size})")
    return 0
