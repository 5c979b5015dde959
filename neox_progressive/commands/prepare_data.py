"""Tokenize text or JSONL files into GPT-NeoX's mmap dataset format (`PREFIX.bin` + `PREFIX.idx`).

The output is what NeoX's tools/datasets/preprocess_data.py writes with `--dataset-impl mmap
--append-eod` (one item per document: its token ids, then the EOD id), readable by NeoX's
MMapIndexedDataset and by the builtin engine. Differences: the files are exactly PREFIX.bin/.idx
(NeoX appends `_text_document`), they are written atomically, and `--valid-fraction` holds out
documents (chosen by a hash of their text) into a validation dataset.

Inputs: `.jsonl` files hold one document per line (`--jsonl-key`, default `text`); any other file
is one document. `--stdlib-corpus N` uses N characters of Python standard-library docstrings
instead (real text on every machine, no download).

Tokenizer: a SentencePiece `.model` (NeoX `tokenizer_type: SPMTokenizer`) or an HF
`tokenizer.json` (`HFTokenizer`). Without `--tokenizer`, a SentencePiece model of `--vocab-size`
pieces is trained on the training documents first and saved as PREFIX.tokenizer.model, with
`<|endoftext|>` as its EOD. PREFIX.meta.json records counts, the tokenizer and the NeoX config keys
to use (`tokenizer_type`, `vocab_file`, `train_data_paths`, `valid_data_paths`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from neox_progressive.data.corpus import read_documents, stdlib_corpus
from neox_progressive.data.prepare import output_paths, prepare_data
from neox_progressive.errors import UserError

HELP = "tokenize text/JSONL files into NeoX's mmap dataset format (.bin/.idx)"
EXAMPLES = """
  neox-progressive prepare-data corpus.jsonl --tokenizer tokenizer.json --out data/corpus
  neox-progressive prepare-data docs/*.txt --vocab-size 8000 --valid-fraction 0.01 --out data/docs
  neox-progressive prepare-data --stdlib-corpus 2000000 --vocab-size 2048 --valid-fraction 0.05 --out data/stdlib
  neox-progressive prepare-data --family configs/neox/tiny_family.yml --mode both
"""


def add_arguments(p) -> None:
    p.add_argument("inputs", nargs="*", help="text or .jsonl files")
    p.add_argument("--out", metavar="PREFIX", help="output prefix: writes PREFIX.bin and PREFIX.idx (required without --family)")
    p.add_argument("--stdlib-corpus", type=int, metavar="N_CHARS",
                   help="use N_CHARS characters of Python standard-library docstrings as the input")
    p.add_argument("--jsonl-key", default="text", help="the JSONL key holding the text (default: text)")
    p.add_argument("--tokenizer", metavar="FILE", help="SentencePiece .model or HF tokenizer.json; omit to train one")
    p.add_argument("--vocab-size", type=int, default=8000, help="pieces of the trained SentencePiece model (default 8000)")
    p.add_argument("--spm-model-type", choices=["bpe", "unigram"], default="bpe", help="trained model type (default bpe)")
    p.add_argument("--eod-token", default=None,
                   help="the end-of-document token appended to each document (default: the tokenizer's EOD, the first "
                        "of <|endoftext|> (as NeoX), </s>, <|end_of_text|>, <eos> it has)")
    p.add_argument("--no-eod", action="store_true", help="do not append the EOD id to each document")
    p.add_argument("--valid-fraction", type=float, default=0.0, help="share of documents held out for validation")
    p.add_argument("--valid-out", metavar="PREFIX", help="validation dataset prefix (default: PREFIX_valid)")
    p.add_argument("--family", metavar="FAMILY_YML",
                   help="prepare the family's data (data.train/valid; inputs and options from data.prepare unless given "
                        "here; skipped if it exists) and cut every member's token window (family_plan.json's data_windows)")
    p.add_argument("--mode", choices=["progressive", "independent", "both"],
                   help="with --family: whose windows to cut (default: the family file's mode)")
    p.add_argument("--force", action="store_true", help="replace existing outputs")
    p.add_argument("--dry-run", action="store_true", help="print what would be written (JSON), write nothing")
    p.add_argument("--format", choices=["text", "json"], default="text", help="output format of the summary")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _documents(args):
    if args.stdlib_corpus is not None:
        if args.inputs:
            raise UserError("give either input files or --stdlib-corpus, not both")
        if args.stdlib_corpus <= 0:
            raise UserError(f"--stdlib-corpus needs a positive number of characters, got {args.stdlib_corpus}")
        docs = stdlib_corpus(args.stdlib_corpus)
        return (lambda: iter(docs)), [f"stdlib-corpus:{args.stdlib_corpus}"]
    if not args.inputs:
        raise UserError("no input: pass text/.jsonl files, or --stdlib-corpus N_CHARS for built-in real text")
    for path in args.inputs:
        if not Path(path).is_file():
            raise UserError(f"input file {path!r} does not exist")

    def gen():
        for path in args.inputs:
            try:
                yield from read_documents(path, args.jsonl_key)
            except UnicodeDecodeError as exc:
                raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); pass text or .jsonl "
                                "files, not binary ones") from None
    return gen, list(args.inputs)


def run(args) -> int:
    if args.family:
        return _run_family(args)
    if not args.out:
        raise UserError("--out PREFIX is required (or --family FAMILY_YML, whose data block names the outputs)")
    summary = _prepare(args, emit=args.format == "text" or args.dry_run)
    if args.format == "json" and not args.dry_run:
        print(json.dumps(summary, indent=1))
    return 0


def _prepare(args, emit: bool = True) -> dict:
    """Prepare one dataset (and its validation part); prints the summary as text when `emit`, returns it."""
    documents, inputs = _documents(args)
    if args.tokenizer and not Path(args.tokenizer).is_file():
        raise UserError(f"--tokenizer {args.tokenizer!r} does not exist")
    if args.vocab_size < 16:
        raise UserError(f"--vocab-size must be at least 16, got {args.vocab_size}")
    if args.dry_run:
        valid_out = args.valid_out or (args.out + "_valid" if args.valid_fraction > 0 else None)
        plan = {"inputs": inputs, "tokenizer": args.tokenizer or f"train SentencePiece ({args.vocab_size} pieces)",
                "writes": [str(p) for p in output_paths(args.out, valid_out, args.tokenizer is None)]}
        if emit:
            print(json.dumps(plan, indent=1))
        return plan
    result = prepare_data(documents, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                          spm_model_type=args.spm_model_type, valid_fraction=args.valid_fraction,
                          valid_out=args.valid_out, append_eod=not args.no_eod, eod_token=args.eod_token,
                          force=args.force, quiet=args.quiet, inputs=inputs)
    summary = {**dataclasses.asdict(result), "neox_keys": result.neox_keys()}
    if not emit:
        return summary
    out = sys.stdout
    print(f"wrote {result.train_prefix}.bin/.idx: {result.train_documents} documents, {result.train_tokens} tokens "
          f"({result.dtype})", file=out)
    if result.valid_prefix:
        print(f"wrote {result.valid_prefix}.bin/.idx: {result.valid_documents} documents, {result.valid_tokens} tokens",
              file=out)
    print(f"tokenizer: {result.vocab_file} ({result.tokenizer_type}, {result.vocab_size} tokens, EOD id {result.eod_id})",
          file=out)
    print("NeoX config keys:", file=out)
    for key, value in result.neox_keys().items():
        print(f"  {key}: {json.dumps(value)}", file=out)
    return summary


def _run_family(args) -> int:
    """Prepare the family's training/validation data if missing, then cut the members' windows."""
    from neox_progressive.data import cut_member_windows, dataset_exists
    from neox_progressive.family import load_family, plan_family

    if args.out or args.valid_out:
        raise UserError("--out/--valid-out cannot be used with --family: the family file's data.train and data.valid "
                        "name the datasets")
    report: dict = {"family": args.family, "prepared": None, "windows": [], "dry_run": bool(args.dry_run)}
    say = print if args.format == "text" else (lambda line: None)
    family = load_family(args.family)
    src = family.data.prepare
    args.out, args.valid_out = family.data.train, family.data.valid
    if not (dataset_exists(args.out) and dataset_exists(args.valid_out)) or args.force:
        if not args.inputs and args.stdlib_corpus is None:
            args.inputs, args.stdlib_corpus = src.get("inputs", []), src.get("stdlib_corpus")
        if not args.inputs and args.stdlib_corpus is None:
            raise UserError(f"{args.family}: {args.out}.bin/.idx does not exist and data.prepare names no source; add "
                            "data.prepare.inputs (files) or data.prepare.stdlib_corpus, or pass input files here")
        defaults = {"jsonl_key": "text", "tokenizer": None, "spm_model_type": "bpe", "eod_token": None,
                    "no_eod": False, "valid_fraction": 0.0}
        for key, default in defaults.items():
            if getattr(args, key) == default and key in src:
                setattr(args, key, src[key])
        if args.vocab_size == 8000:  # the parser default: the family's own vocabulary
            args.vocab_size = src.get("vocab_size", family.model.vocab_size)
        if not args.valid_fraction:
            raise UserError(f"{args.family}: the family's validation data {args.valid_out} is prepared from the same "
                            "source: set data.prepare.valid_fraction (e.g. 0.05) or --valid-fraction")
        report["prepared"] = _prepare(args, emit=args.format == "text")
    elif not args.quiet and args.format == "text":
        print(f"using the existing {args.out}.bin/.idx and {args.valid_out}.bin/.idx")
    mode = args.mode or family.mode
    for m in (["progressive", "independent"] if mode == "both" else [mode]):
        rows = [r.__dict__ for r in plan_family(family, m).rows]
        if args.dry_run:
            for r in rows:
                report["windows"].append({"mode": m, "member": r["name"], "prefix": r["train_data_path"],
                                          "windows": r["data_windows"], "cut": False})
                say(f"would cut {r['train_data_path']}: windows {r['data_windows']} ({m})")
            continue
        for name, ds in cut_member_windows(args.out, rows, force=args.force).items():
            report["windows"].append({"mode": m, "member": name, "prefix": ds.prefix, "tokens": ds.num_tokens, "cut": True})
            say(f"{m} {name}: {ds.prefix}.bin/.idx, {ds.num_tokens} tokens")
    if args.format == "json":
        print(json.dumps(report, indent=1, default=str))
    return 0
