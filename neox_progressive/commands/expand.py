"""Grow a trained NeoX checkpoint into the initialization of a bigger model (bert2BERT AKI or exact FPI).

Both architectures NeoX trains: the Llama shape and NeoX's classic transformer (Pythia: LayerNorm,
GeLU, biases, gpt_j_residual, partial rotary). Width (hidden, heads with head_dim fixed, FFN) and
depth in one pass, width first then depth (bert2BERT Algorithm 1), one global hidden-unit map, heads
copied as whole blocks, one FFN map for gate and up (EXPANSION_SPEC.md); each tensor by the rule of
its role (expand/rules.py). The target's TP degree and format (model_parallel_size,
pipe_parallel_size) come from --dst-config: the tool reshards on output. The result loads in
NeoX with `finetune: true`; `expansion.json` (shapes, options, seed, maps sha, source sha256s,
command line) and `expansion_maps.npz` (every index map) are written inside --out.

Defaults and the reading of bert2BERT each follows:
  --method aki            the paper's (Yano et al. 2025 grow with bert2BERT AKI); fpi is function preserving
  --depth-rule b2b        bert2BERT Algorithm 1: whole stacks, then the top L'-kL layers
  --rms-comp              none for aki (as bert2BERT / AquilaMoE), exact for fpi (residual rescaling
                          that keeps RMSNorm exact at any width ratio; EXPANSION_SPEC section 4)
  --aki-second current    Wo / W_down columns from layer l (the literal per-matrix reading, LEMON's AKI baseline)
  --aki-hidden copy       new hidden rows of Wo / W_down are copies (the residual stream stays consistent)
  --map-sampling uniform  bert2BERT's f(.): uniform with replacement

Exactness (FPI) is decided by the norms and the added layers:
  RMSNorm    exact with --rms-comp exact at any width ratio (or balanced maps at an integer ratio)
  LayerNorm  exact only when every hidden unit is copied equally often: an integer width ratio with
             --map-sampling balanced (then gamma' = gamma[g], beta' = beta[g]). Otherwise FPI is
             bert2BERT's approximation: the mean and variance of the widened stream change. --rms-comp
             exact keeps the mean square, not the mean, so it cannot fix LayerNorm and is refused;
             --rms-comp is none there.
  depth      added layers are the identity only with --new-layer-init zero_out
--dry-run and expansion.json say `exact: true|false` and why.
An HF model directory as --src (config.json naming Llama, Mistral, Qwen2 or GPTNeoX) is grown into an HF
directory (sharded safetensors, config.json, generation_config.json, its tokenizer files), loadable by
AutoModelForCausalLM, with the same rules and options; --dst-config is then an HF config.json or a NeoX YAML.
Every check (shapes only grow, head_dim, vocab, the architecture, GQA layout, TP divisibility)
runs before anything is written; the output is written atomically.
"""

from __future__ import annotations

import json

from neox_progressive.cli_options import add_flags, values_of
from neox_progressive.errors import UserError
from neox_progressive.expand.options import CHOICES, ExpandOptions

HELP = "grow a NeoX checkpoint into the next member's start (bert2BERT AKI / exact FPI)"
EXAMPLES = """
  neox-progressive expand --src runs/1B/checkpoints --src-config stage_1B.yml --dst-config stage_2B.yml --out runs/2B/expanded
  neox-progressive expand --src ck/global_step800 --src-config a.yml --dst-config b.yml --out x --method fpi --dry-run
  python tools/expand_neox_ckpt.py --src ck --src-config a.yml --dst-config b.yml --out x --seed 3 --quiet
  neox-progressive expand --src hf/llama-1b --dst-config hf/llama-2b/config.json --out hf/llama-2b-grown --method fpi
"""


def add_arguments(p) -> None:
    p.add_argument("--src", required=True, metavar="CKPT",
                   help="NeoX save dir (with `latest`) or a global_stepN dir; or an HF model directory (config.json "
                        "with `architectures`), which is grown into an HF directory")
    p.add_argument("--src-config", action="append", metavar="YML",
                   help="the source member's NeoX YAML file(s), repeatable (NeoX sources; an HF source has config.json)")
    p.add_argument("--dst-config", action="append", required=True, metavar="YML",
                   help="the target member's NeoX YAML file(s), repeatable (TP degree and format come from here); "
                        "for an HF source also an HF config.json")
    p.add_argument("--out", required=True, metavar="DIR", help="the new checkpoint (refused if it exists, unless --force)")
    add_flags(p, ExpandOptions, choices=CHOICES)  # --method ... --aki-hidden, --seed: help from the field docstrings
    p.add_argument("--stage", default="", help="stage name mixed into the hashed draws (chained stages differ)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (shapes, maps, exactness, every target tensor's rule, sources, shape and bytes; "
                        "--format json for the full list); load no tensors")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="copy NaN/Inf weights of the source into the output (refused by default: a diverged checkpoint)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--format", choices=["text", "json"], default="text", help="output format")


def options_of(args) -> ExpandOptions:
    return ExpandOptions(**values_of(ExpandOptions, args))


def run(args) -> int:
    from neox_progressive.expand import expand_checkpoint, plan_for
    from neox_progressive.io.writer import check_destination

    options = options_of(args)
    from neox_progressive.expand.hf_run import is_hf_dir

    if is_hf_dir(args.src):
        return run_hf(args, options)
    if not args.src_config:
        raise UserError(f"--src-config is required for the NeoX checkpoint {args.src} (its member's NeoX YAML); an "
                        "HF source is a directory whose config.json names its architectures")
    if args.dry_run:
        plan, reader = plan_for(args.src, args.src_config, args.dst_config, options, args.stage)
        check_destination(args.out, args.force)
        if args.format == "json":
            print(json.dumps(plan.summary(), indent=1, default=str))
        else:
            print(plan.describe())
            if reader is None:
                print(f"  (no checkpoint at {args.src} yet: planned from the configs, dtype {plan.dtype})")
            print(f"dry run: nothing written (would write {args.out})")
        return 0
    record = expand_checkpoint(args.src, args.src_config, args.dst_config, args.out, options, force=args.force,
                               quiet=args.quiet, stage=args.stage, allow_nonfinite=args.allow_nonfinite)
    if args.format == "json":
        print(json.dumps(record, indent=1, default=str))
    else:
        t, o = record["target"], record["options"]
        default = " (default)" if args.rms_comp is None else ""
        print(f"wrote {args.out}: {t['num_layers']} layers, hidden {t['hidden_size']}, heads {t['num_heads']}/"
              f"{t['num_kv_heads']}, ffn {t['ffn_size']}, TP {t['tp']}, {record['target_bytes']:,} bytes; method "
              f"{o['method']}, rms_comp {o['rms_comp']}{default}; exact: {'yes' if record['exact'] else 'no'} "
              f"({record['exact_reason']}); expansion.json inside")
    return 0


def run_hf(args, options: ExpandOptions) -> int:
    """An HF source directory: HF output (expand/hf_run.py), same options, plan and manifest."""
    from neox_progressive.expand.hf_run import expand_hf, plan_for_hf
    from neox_progressive.io.writer import check_destination

    if args.src_config:
        raise UserError(f"--src-config: {args.src} is an HF directory, described by its own config.json; drop "
                        "--src-config")
    if args.dry_run:
        plan, _, _ = plan_for_hf(args.src, args.dst_config, options, args.stage)
        check_destination(args.out, args.force)
        print(json.dumps(plan.summary(), indent=1, default=str) if args.format == "json" else plan.describe())
        if args.format != "json":
            print(f"dry run: nothing written (would write the HF directory {args.out})")
        return 0
    record = expand_hf(args.src, args.dst_config, args.out, options, force=args.force, quiet=args.quiet,
                       stage=args.stage, allow_nonfinite=args.allow_nonfinite)
    if args.format == "json":
        print(json.dumps(record, indent=1, default=str))
    else:
        t = record["target"]
        print(f"wrote {args.out} ({record['source_architecture']}, HF safetensors): {t['num_layers']} layers, hidden "
              f"{t['hidden_size']}, heads {t['num_heads']}/{t['num_kv_heads']}, ffn {t['ffn_size']}, "
              f"{record['target_bytes']:,} bytes; method {record['options']['method']}; exact: "
              f"{'yes' if record['exact'] else 'no'} ({record['exact_reason']}); expansion.json inside")
    return 0
