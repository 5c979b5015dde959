"""Import a Hugging Face checkpoint as a GPT-NeoX checkpoint that NeoX loads with `finetune: true`.

Architectures: LlamaForCausalLM, MistralForCausalLM (without a sliding window), Qwen2ForCausalLM (its q/k/v
biases; NeoX's output bias is written as zeros), GPTNeoXForCausalLM (Pythia: NeoX's classic transformer).
The HF directory holds config.json and safetensors shards (model.safetensors.index.json) or one
model.safetensors; pytorch_model*.bin files are read with torch.load(weights_only=True). The model is read
and written one layer at a time, in NeoX's pipeline format (pipe_parallel_size >= 1) or sequential format
(pipe_parallel_size: 0), at any TP degree.

Either --config names the member's NeoX YAML (it must describe the HF model; its model_parallel_size and
pipe_parallel_size choose the layout), or --write-config OUT.yml writes that YAML from config.json (shape,
norm epsilon, rotary base, the HF directory's tokenizer, and make_vocab_size_divisible_by so that NeoX pads
the tokenizer to exactly the HF embedding rows), checked by the NeoX argument validator, with --tp and
--ckpt-format choosing the layout.

Tied input/output embeddings are written untied: the head is a copy of the embedding (the same function;
NeoX trains them apart from then on). What NeoX cannot represent is refused with the config.json key that
says so: rope scaling (llama3, yarn, linear, ...), a sliding window in use, mixture of experts, a head_dim
other than hidden_size / num_attention_heads, another activation, another architecture. A missing shard,
an index naming a missing file, a tensor of the wrong shape and NaN/Inf weights are refused too.
Nothing is written unless every check passes; `import.json` in the output records the source.
"""

from __future__ import annotations

import json
import sys

HELP = "import a Hugging Face checkpoint (Llama, Mistral, Qwen2, GPTNeoX) as a NeoX checkpoint"
EXAMPLES = """
  neox-progressive import-hf hf/TinyLlama --config stage_1B.yml --out runs/1B/imported
  neox-progressive import-hf hf/pythia-160m --write-config pythia160m.yml --out ck/pythia160m --tp 2
  neox-progressive import-hf hf/qwen2-0.5b --write-config qwen.yml --out ck/qwen --ckpt-format sequential --dry-run
"""


def add_arguments(p) -> None:
    p.add_argument("hf_dir", metavar="HF_DIR", help="a Hugging Face model directory (config.json + weights)")
    p.add_argument("--config", action="append", metavar="YML",
                   help="the member's NeoX YAML file(s), repeatable; must describe the HF model")
    p.add_argument("--write-config", metavar="OUT_YML",
                   help="write the member's NeoX YAML from config.json (instead of --config)")
    p.add_argument("--out", required=True, metavar="DIR", help="the NeoX checkpoint (refused if it exists, unless --force)")
    p.add_argument("--tp", type=int, default=None,
                   help="TP degree (model_parallel_size) without --config (default 1); with --config it must agree")
    p.add_argument("--ckpt-format", choices=["pipeline", "sequential"], default=None,
                   help="NeoX checkpoint format without --config (default pipeline: pipe_parallel_size 1; "
                        "sequential: 0); with --config it must agree")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="tensor dtype of the checkpoint (auto: as stored in the HF files)")
    p.add_argument("--dry-run", action="store_true", help="check everything and print what would be written; read no "
                   "tensor data, write nothing")
    p.add_argument("--force", action="store_true", help="replace an existing --out / --write-config")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="copy NaN/Inf weights as they are (refused by default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--format", choices=["text", "json"], default="text", help="output format of the summary")


def _describe(rec: dict, dry: bool) -> str:
    head = "dry run: would write" if dry else "wrote"
    lines = [f"{head} {rec['out']}: {rec['architecture']} -> NeoX {rec['format']} format, TP {rec['tp']}, "
             f"{rec['num_layers']} layers, hidden {rec['hidden_size']}, heads {rec['num_heads']}/{rec['num_kv_heads']}, "
             f"ffn {rec['ffn_size']}, vocab {rec['padded_vocab_size']}, {rec['norm']}/{rec['activation']}, "
             f"{rec['bytes']:,} bytes"]
    lines += [f"  note: {n}" for n in rec["notes"]]
    if dry:
        lines.append("dry run: nothing written")
    return "\n".join(lines)


def run(args) -> int:
    from tqdm import tqdm

    from neox_progressive.errors import UserError
    from neox_progressive.hf_import import import_hf, member_config, plan_import, summary
    from neox_progressive.io.atomic import check_destination
    from neox_progressive.io.hf_reader import read_hf_config

    if not args.config and not args.write_config:
        raise UserError("give the member's NeoX config (--config member.yml) or let import-hf write one from "
                        "config.json (--write-config member.yml)")
    if args.tp is not None and args.tp < 1:
        raise UserError(f"--tp must be a positive integer, got {args.tp}")
    pp = None if args.ckpt_format is None else int(args.ckpt_format == "pipeline")
    if args.dry_run:
        if args.write_config:
            if args.config:
                raise UserError("--write-config writes the member's NeoX config from config.json; with --config the "
                                "config exists already: give one of them")
            member_config(args.hf_dir, args.tp or 1, 1 if pp is None else pp)
            check_destination(args.write_config, args.force, "--write-config")
        reader = plan_import(args.hf_dir, args.config, tp=args.tp, pp=pp)
        check_destination(args.out, args.force)
        rec = summary(reader, args.out, args.dtype)
        print(json.dumps(rec, indent=1) if args.format == "json" else _describe(rec, True))
        return 0
    layers = read_hf_config(args.hf_dir).get("num_hidden_layers")
    with tqdm(total=layers if isinstance(layers, int) else None, desc="import-hf", unit="layer", disable=args.quiet,
              file=sys.stderr) as bar:
        rec = import_hf(args.hf_dir, args.out, args.config, tp=args.tp, pp=pp, dtype=args.dtype,
                        write_config=args.write_config, force=args.force, allow_nonfinite=args.allow_nonfinite,
                        progress=lambda i: bar.update(1))
    if args.write_config:
        rec["config_written"] = args.write_config
    print(json.dumps(rec, indent=1) if args.format == "json" else _describe(rec, False))
    return 0
