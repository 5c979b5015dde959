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

The member's tokenizer goes into the export too (`tokenizer_type` / `vocab_file` of --config: an
HF tokenizer.json as it is, a SentencePiece model converted to a tokenizer.json that gives
SentencePiece's ids, GPT-2 vocab.json + merges.txt), with bos/eos/pad ids in config.json and
generation_config.json, so `AutoTokenizer.from_pretrained(OUT)` and lm-eval's `hf` model
work on the export as written.
"""

from __future__ import annotations

import json
from pathlib import Path

from neox_progressive.config import ModelShape, merge_neox_configs

HELP = "export a NeoX checkpoint as a transformers directory (LlamaForCausalLM or GPTNeoXForCausalLM)"
EXAMPLES = """
  neox-progressive export-hf runs/family/progressive/8B/checkpoints --config configs/neox/stage_8B.yml --out hf/8B
  neox-progressive export-hf ckpt/global_step1000 --config a.yml --config b.yml --out hf/1B --dtype bf16
  neox-progressive export-hf runs/pythia/160M/checkpoints --config configs/neox/pythia_family/stage_160M.yml --out hf/160M
  neox-progressive export-hf ckpt --config a.yml --out hf/1B --dry-run --format json   # what would be written
"""


def add_arguments(p) -> None:
    p.add_argument("ckpt", help="NeoX save dir (with `latest`) or a global_stepN dir")
    p.add_argument("--config", action="append", required=True, metavar="YML",
                   help="the member's NeoX YAML file(s), repeatable")
    p.add_argument("--out", required=True, help="output directory (refused if it exists, unless --force)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="tensor dtype of the export (auto: as stored in the checkpoint)")
    p.add_argument("--bos-id", type=int, default=None,
                   help="bos_token_id (default: the tokenizer's end-of-text token, which NeoX puts between documents)")
    p.add_argument("--eos-id", type=int, default=None,
                   help="eos_token_id (default: the tokenizer's end-of-text token, <|endoftext|> or </s>)")
    p.add_argument("--no-tokenizer", action="store_true",
                   help="write the weights only, without the config's tokenizer (AutoTokenizer will not load the export)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="export NaN/Inf weights as they are (refused by default: a diverged checkpoint)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything (config, checkpoint, tokenizer, destination) and print what would be written; "
                        "write nothing")
    p.add_argument("--format", choices=["text", "json"], default="text", help="output format of the summary")


def run(args) -> int:
    from neox_progressive.hf import export_hf, hf_arch
    from neox_progressive.io.reader import CheckpointReader
    from neox_progressive.io.writer import check_destination
    from neox_progressive.progress import progress_bar

    cfg, base_dir = merge_neox_configs(args.config), Path(args.config[0]).parent
    shape = ModelShape.from_neox(cfg, base_dir)
    hf = hf_arch(shape)
    check_destination(args.out, args.force)
    reader = CheckpointReader(args.ckpt, shape)
    tokenizer = None
    if not args.no_tokenizer:
        from neox_progressive.hf_tokenizer import export_tokenizer

        tokenizer = export_tokenizer(cfg, base_dir, reader.shape.padded_vocab_size, seq_length=reader.shape.seq_length,
                                     bos=args.bos_id, eos=args.eos_id)
    summary = {"out": str(args.out), "architecture": hf.name, "layers": reader.shape.num_layers,
               "vocab_rows": reader.shape.padded_vocab_size, "dtype": args.dtype, "parameters": reader.shape.param_count(),
               "tokenizer": tokenizer.kind if tokenizer else None,
               "eos_token_id": tokenizer.specials["eos"][0] if tokenizer else args.eos_id, "dry_run": bool(args.dry_run)}
    if args.dry_run:
        _print(summary, args.format, f"dry run: nothing written (would write {args.out}: {hf.name}, "
                                     f"{summary['layers']} layers, vocab {summary['vocab_rows']})")
        return 0
    with progress_bar(total=reader.shape.num_layers, desc="export-hf", unit="layer", quiet=args.quiet) as bar:
        out = export_hf(reader, args.out, dtype=args.dtype, force=args.force, bos=args.bos_id, eos=args.eos_id,
                        progress=lambda i: bar.update(1), tokenizer=tokenizer,
                        allow_nonfinite=args.allow_nonfinite)
    tok = f", {tokenizer.kind} tokenizer, eos {tokenizer.specials['eos'][0]}" if tokenizer else ", no tokenizer"
    _print(summary, args.format,
           f"wrote {out} ({hf.name}, {reader.shape.num_layers} layers, vocab {reader.shape.padded_vocab_size}{tok})")
    return 0


def _print(summary: dict, fmt: str, line: str) -> None:
    print(json.dumps(summary, indent=1) if fmt == "json" else line)
