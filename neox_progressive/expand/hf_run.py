"""Grow a Hugging Face checkpoint directly: HF directory in, HF directory out, the NeoX path's rules.

`expand --src HF_DIR --dst-config TARGET --out HF_OUT`. The source is read by `io/hf_reader.HFReader`
(Llama, Mistral without sliding window, Qwen2, GPTNeoX) as logical tensors; the plan (`plan.py`), the
rules (`rules.py`) and the streaming executor (`run.run_plan`) are the NeoX path's, unchanged; only
the writer differs (`io/hf_writer.HFWriter`: sharded safetensors + index). So the two formats give the
same tensors for the same model (tests/test_expand_hf.py checks it).

TARGET is an HF `config.json` (a file, or a directory holding one) of the same architecture, or the
target member's NeoX YAML file(s). The output's config.json is the target's (HF TARGET) or the
source's with the target's shape (NeoX TARGET: hidden, FFN, layers, heads, KV heads; every other key,
max_position_embeddings included, stays the source's). The output is always untied
(`tie_word_embeddings: false`): the widened head is not the widened embedding. Tokenizer files and
generation_config.json of the source directory are copied as they are. The vocabulary (embedding
rows) stays the source's. `expansion.json` and `expansion_maps.npz` are written inside HF_OUT as on
the NeoX path; transformers ignores them.
"""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from neox_progressive import __version__, hf
from neox_progressive.config import ModelShape
from neox_progressive.errors import UserError
from neox_progressive.expand.options import DEFAULT_OPTIONS, ExpandOptions
from neox_progressive.expand.plan import ExpansionPlan, plan_expansion
from neox_progressive.io.writer import check_destination

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
"""Files of a source HF directory copied into the output as they are."""
LLAMA_SHAPE_KEYS = {"hidden_size": "hidden_size", "intermediate_size": "ffn_size", "num_hidden_layers": "num_layers",
                    "num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads", "head_dim": "head_dim"}
NEOX_SHAPE_KEYS = {k: v for k, v in LLAMA_SHAPE_KEYS.items() if k not in ("num_key_value_heads", "head_dim")}


def is_hf_dir(path: str | Path | None) -> bool:
    """An HF model directory: it holds a config.json naming its `architectures`."""
    cfg = Path(path) / "config.json" if path is not None else None
    if cfg is None or not cfg.is_file():
        return False
    try:
        return "architectures" in json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False


def output_arch(name: str) -> hf.HfArch:
    """The key map of an HF architecture the reader reads (Mistral and Qwen2 use Llama's names; Qwen2 has no o bias)."""
    if name == hf.GPT_NEOX.name:
        return hf.GPT_NEOX
    layer = dict(hf.LLAMA.layer)
    if name == "Qwen2ForCausalLM":
        del layer["self_attn.o_proj.bias"]
    return dataclasses.replace(hf.LLAMA, name=name, layer=layer)


def _hf_target(dst_configs: list[Path]) -> Path | None:
    """The target's config.json when TARGET is an HF config (a .json file or a dir holding config.json)."""
    if len(dst_configs) == 1:
        p = dst_configs[0]
        if p.is_dir() and (p / "config.json").is_file():
            return p / "config.json"
        if p.suffix == ".json":
            return p
    if any(p.suffix == ".json" or p.is_dir() for p in dst_configs):
        raise UserError(f"--dst-config {' '.join(map(str, dst_configs))}: give one HF config.json, or the target's NeoX "
                        "YAML file(s), not both")
    return None


def target_of(reader, dst_configs: list[Path]) -> tuple[ModelShape, dict]:
    """(target shape, the output's config.json without dtype) for TARGET (HF config.json or NeoX YAMLs)."""
    from neox_progressive.hf_shape import _architecture, read_hf_config, shape_from_hf_config

    src = reader.shape
    path = _hf_target(dst_configs)
    if path is not None:
        if not path.is_file():
            raise UserError(f"--dst-config {path} does not exist; pass the target's HF config.json or NeoX YAML")
        cfg = read_hf_config(path.parent) if path.name == "config.json" else _read_json(path)
        name = _architecture(cfg, path)
        if name != reader.arch_name:
            raise UserError(f"{path}: architectures = [{name!r}] but the source is {reader.arch_name}; expansion keeps "
                            f"the architecture: use a {reader.arch_name} target config")
        dst = shape_from_hf_config(cfg, path)  # refuses sliding windows, rope scaling, MoE as for a source
        types = cfg.get("layer_types")
        if isinstance(types, list) and len(types) != dst.num_layers:
            raise UserError(f"{path}: layer_types has {len(types)} entries but num_hidden_layers is {dst.num_layers}; "
                            "give one entry per layer (\"full_attention\") or drop the key")
        if dst.padded_vocab_size != src.padded_vocab_size:
            raise UserError(f"{path}: vocab_size = {dst.padded_vocab_size} but the source has {src.padded_vocab_size}; "
                            f"expansion keeps the vocabulary: set vocab_size: {src.padded_vocab_size}")
        cfg = dict(cfg)
    else:
        dst = ModelShape.from_yamls(dst_configs)
        cfg = _config_for(reader.config, dst, hf.GPT_NEOX.name == reader.arch_name)
    # HF has no vocab padding: the target keeps the source's rows (plan.target_vocab re-pads with these).
    dst = dst.replace(tp=1, pp=1, make_vocab_size_divisible_by=src.make_vocab_size_divisible_by,
                      padded_vocab_size=None)
    cfg.update(vocab_size=src.padded_vocab_size, tie_word_embeddings=False)
    cfg["architectures"] = [reader.arch_name]
    return dst, with_legacy_rope_keys(cfg, dst)


def with_legacy_rope_keys(cfg: dict, shape: ModelShape) -> dict:
    """`cfg` with the 4.x rotary keys next to a 5.x `rope_parameters` (same values), so both majors read one base.

    transformers 5.x saves only `rope_parameters`; 4.x ignores that key and falls back to its default base
    (10000) and, for GPTNeoX, `rotary_pct` 0.25: a model that loads without a word and computes something
    else. 5.x reads the 4.x keys too (it folds them into `rope_parameters`), so writing both is safe. Only
    plain RoPE reaches here (`hf_shape._rope` refuses scaling), so the shape's base and fraction are the values.
    """
    if not isinstance(cfg.get("rope_parameters"), dict):
        return cfg
    cfg = dict(cfg)
    if cfg["architectures"] == [hf.GPT_NEOX.name]:  # target_of sets the source's architecture
        cfg.update(rotary_emb_base=shape.rotary_emb_base, rotary_pct=shape.rotary_pct)
    else:
        cfg["rope_theta"] = float(shape.rotary_emb_base)
    return cfg


def _read_json(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); pass the target's HF config.json") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a JSON object (an HF config.json), got {type(cfg).__name__}")
    return cfg


def _config_for(src_cfg: dict, dst: ModelShape, neox: bool) -> dict:
    """The source's config.json with the target's shape (a NeoX YAML TARGET)."""
    cfg = dict(src_cfg)
    for key, field in (NEOX_SHAPE_KEYS if neox else LLAMA_SHAPE_KEYS).items():
        if key in cfg or key != "head_dim":
            cfg[key] = getattr(dst, field)
    if isinstance(cfg.get("layer_types"), list) and cfg["layer_types"]:
        cfg["layer_types"] = [cfg["layer_types"][0]] * dst.num_layers  # the reader allows full_attention only
    if "max_window_layers" in cfg:
        cfg["max_window_layers"] = dst.num_layers
    return cfg


def source_dtype(reader) -> str:
    """The stored dtype of the source embedding (HFReader.dtype: from the safetensors header, no data read)."""
    dtype = str(reader.dtype()).removeprefix("torch.")
    if dtype not in ("bfloat16", "float16", "float32"):
        raise UserError(f"{reader.dir}: the embedding is stored as {dtype}; the expansion reads bf16, fp16 or fp32 weights")
    return dtype


def plan_for_hf(src, dst_configs, options: ExpandOptions = DEFAULT_OPTIONS, stage: str = "", *,
                allow_nonfinite: bool = False):
    """(plan, reader, output config) for an HF source directory."""
    from neox_progressive.io.hf_reader import HFReader

    reader = HFReader(src, allow_nonfinite=allow_nonfinite)
    dst, cfg = target_of(reader, [Path(p) for p in _list(dst_configs)])
    plan = plan_expansion(reader.shape, dst, options, stage, dtype=source_dtype(reader))
    if plan.dst.padded_vocab_size != reader.shape.padded_vocab_size:
        raise UserError(f"vocab: the target has {plan.dst.padded_vocab_size} rows but the HF source "
                        f"{reader.shape.padded_vocab_size}; expansion keeps the vocabulary: use the source's tokenizer")
    return plan, reader, cfg


def _list(x) -> list:
    return [x] if isinstance(x, (str, Path)) else list(x)


def expand_hf(src, dst_configs, out, options: ExpandOptions = DEFAULT_OPTIONS, *, force: bool = False,
              quiet: bool = False, stage: str = "", allow_nonfinite: bool = False,
              max_shard_bytes: int = 5 * 2**30) -> dict:
    """Expand the HF directory `src` into the HF directory `out`; returns the expansion.json record."""
    from neox_progressive.expand.run import _record, run_plan
    from neox_progressive.io.hf_writer import CopiedFiles, HFWriter

    plan, reader, cfg = plan_for_hf(src, dst_configs, options, stage, allow_nonfinite=allow_nonfinite)
    out = Path(out)
    if out.resolve() == Path(src).resolve() or Path(src).resolve() in out.resolve().parents:
        raise UserError(f"--out {out} is (inside) the source directory {src}; write the expansion elsewhere")
    check_destination(out, force)
    record = _record(plan, reader, src, [reader.config_path], _list(dst_configs))
    record.update(source_format="hf", source_architecture=reader.arch_name, output_format="hf",
                  notes=[*reader.notes, *_notes(plan, reader)])
    cfg["neox_progressive_version"] = __version__
    if "dtype" in cfg:
        cfg["dtype"] = plan.dtype
    gen = Path(src) / "generation_config.json"
    tok = tuple(Path(src) / n for n in TOKENIZER_FILES if (Path(src) / n).is_file())
    writer = HFWriter(out, plan.dst, getattr(torch, plan.dtype), config=cfg, hf_arch=output_arch(reader.arch_name),
                      force=force, max_shard_bytes=max_shard_bytes, tokenizer=CopiedFiles(tok),
                      generation_config=json.loads(gen.read_text()) if gen.is_file() else None)
    with ThreadPoolExecutor(1) as pool:  # hashing the source overlaps the expansion
        pending = {"source_sha256": pool.submit(reader.sha256)}
        run_plan(plan, reader, out, quiet=quiet, record=record, pending=pending, writer=writer,
                 allow_nonfinite=allow_nonfinite)
    return record


def _notes(plan: ExpansionPlan, reader) -> list[str]:
    notes = []
    if reader.tied:
        notes.append("the output is untied (tie_word_embeddings: false): the widened head is not the widened embedding")
    return notes
