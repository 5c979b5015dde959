"""Lazy reader of Hugging Face checkpoints with the logical interface of `CheckpointReader`.

`HFReader(hf_dir)` reads `config.json` into a `ModelShape` and hands out the plugin's logical
tensors (`arch.py`) one part at a time: `shape`, `part("embed"|"final_norm"|"head")`, `layer(i)`,
`iter_layers()`, `state_dict()`, so the NeoX writer and the expansion take either reader.
Weights come from safetensors (`model.safetensors`, or shards named by
`model.safetensors.index.json`, read with `safe_open`: only the tensors of the part asked for are
read) or from `pytorch_model*.bin` through the package's safe loader (`weights_only`, memory-mapped).
The HF key names are `hf.py`'s tables (one copy of them).

Architectures and what they become (everything else is refused with the config key that decides it):

    LlamaForCausalLM     the Llama shape; attention_bias (q, k, v, o biases) and mlp_bias as they are
    MistralForCausalLM   the Llama shape, if no sliding window is in use (`sliding_window` null or at least
                         `max_position_embeddings`: then every token attends to all earlier ones, as in NeoX)
    Qwen2ForCausalLM     the Llama shape with q/k/v biases; NeoX's `use_bias_in_attn_linear` also biases the
                         output projection, which is written as zeros (exact: the same function)
    GPTNeoXForCausalLM   NeoX's classic transformer (LayerNorm, GeLU, partial rotary, parallel residual)

Tied input/output embeddings (`tie_word_embeddings: true`) are read untied: the head is a copy of the
embedding, which computes the same function (NeoX runs with `no_weight_tying: true`); `notes` says so.
NeoX has no rotary scaling, no sliding window, no mixture of experts and no head_dim other than
hidden_size / num_attention_heads: such configs are refused.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from neox_progressive import arch
from neox_progressive.config import ModelShape
from neox_progressive.errors import UserError
from neox_progressive.hf import GPT_NEOX, LLAMA, HfArch
from neox_progressive.io import finite

LLAMA_FAMILY = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED = (*LLAMA_FAMILY, GPT_NEOX.name)
ZERO_FILLED = {"Qwen2ForCausalLM": ("attn.o.bias",)}
"""Logical tensors the NeoX model has but the HF architecture lacks; written as zeros (exact)."""
BUFFERS = ("rotary_emb.inv_freq", "attention.bias", "attention.masked_bias")
"""HF keys that are buffers, not weights (older saves hold them); recomputed, so skipped."""
TANH_GELU = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")
MOE_KEYS = ("num_local_experts", "num_experts", "moe_intermediate_size", "num_experts_per_tok")
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "gpt_neox": GPT_NEOX.name}
"""`model_type` -> architecture, for a config.json without `architectures` (a config saved on its own)."""
HF_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """`config.json` of an HF directory as a dict (one-line errors for a missing or broken file)."""
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise UserError(f"{hf_dir} is not a directory; pass a Hugging Face model directory (with config.json)")
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass a Hugging Face model directory (save_pretrained writes it)")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); restore the file from the model's source") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _refuse(where: Path, key: str, value: Any, why: str, fix: str) -> UserError:
    return UserError(f"{where}: {key} = {json.dumps(value)}: {why}; {fix}")


def _architecture(cfg: dict, where: Path) -> str:
    names = cfg.get("architectures") or ([MODEL_TYPES[cfg["model_type"]]] if cfg.get("model_type") in MODEL_TYPES else [])
    if len(names) != 1 or names[0] not in SUPPORTED:
        kind = "mixture of experts" if any(cfg.get(k) for k in MOE_KEYS) else "not a supported architecture"
        raise _refuse(where, "architectures", names, f"{kind} (NeoX can represent {', '.join(SUPPORTED)})",
                      "import a model of one of those architectures")
    if any(cfg.get(k) for k in MOE_KEYS):
        key = next(k for k in MOE_KEYS if cfg.get(k))
        raise _refuse(where, key, cfg[key], "mixture of experts: NeoX's transformer has one dense MLP per layer",
                      "import a dense model")
    return names[0]


def _rope(cfg: dict, where: Path) -> tuple[float, float]:
    """(rope base, partial rotary factor) from a 4.x config (rope_theta, rope_scaling, rotary_pct,
    rotary_emb_base) or a 5.x one (rope_parameters)."""
    params = cfg.get("rope_parameters")
    key = "rope_parameters" if params is not None else "rope_scaling"
    scaling = params if params is not None else cfg.get("rope_scaling")
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise _refuse(where, key, scaling, "expected an object or null", "restore config.json")
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in (None, "default"):
            raise _refuse(where, f"{key}.rope_type", kind, "NeoX's rotary embedding has no scaling (only the "
                          "plain rotate-half RoPE)", "import a model without rope scaling")
    scaling = scaling or {}
    base = scaling.get("rope_theta", cfg.get("rope_theta", cfg.get("rotary_emb_base", 10000)))
    pct = scaling.get("partial_rotary_factor", cfg.get("partial_rotary_factor", cfg.get("rotary_pct", 1.0)))
    if float(base) != int(float(base)):
        raise _refuse(where, "rope_theta", base, "NeoX's rotary_emb_base is an integer", "use an integer base")
    return int(float(base)), float(pct)


def _sliding_window(cfg: dict, name: str, where: Path) -> None:
    layer_types = cfg.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise _refuse(where, "layer_types", sorted(set(layer_types)), "sliding-window attention in some layers: "
                      "NeoX's attention is full causal", "import a model whose layers all use full_attention")
    window = cfg.get("sliding_window")
    in_use = cfg.get("use_sliding_window", name == "MistralForCausalLM")
    if in_use and window is not None and window < cfg.get("max_position_embeddings", math.inf):
        raise _refuse(where, "sliding_window", window, f"attention limited to the last {window} tokens, which "
                      "NeoX cannot represent", f"set it to null in config.json if the model is only used on "
                      f"sequences of at most {window} tokens (attention is then the same)")


def shape_from_hf_config(cfg: dict, where: str | Path = "config.json", *, tp: int = 1, pp: int = 1) -> ModelShape:
    """The NeoX `ModelShape` that computes what transformers computes for `cfg`, or a one-line UserError.

    Vocab: `padded_vocab_size` = the HF embedding rows (`vocab_size`); `make_vocab_size_divisible_by` is the
    largest of 128, 64, ..., 1 that makes NeoX pad exactly to it (see `divisible_by_for`)."""
    where = Path(where)
    name = _architecture(cfg, where)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(cfg.get(key), int):
            raise _refuse(where, key, cfg.get(key), "expected an integer", "restore config.json")
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if h % heads:
        raise _refuse(where, "num_attention_heads", heads, f"does not divide hidden_size {h}", "restore config.json")
    if cfg.get("head_dim") not in (None, h // heads):
        raise _refuse(where, "head_dim", cfg["head_dim"], f"NeoX's head size is hidden_size / num_attention_heads "
                      f"= {h // heads}", "import a model with head_dim = hidden_size / num_attention_heads")
    base, pct = _rope(cfg, where)
    act = cfg.get("hidden_act", "silu" if name in LLAMA_FAMILY else "gelu")
    kv = cfg.get("num_key_value_heads") or heads
    common = dict(hidden_size=h, num_layers=cfg["num_hidden_layers"], num_heads=heads, ffn_size=cfg["intermediate_size"],
                  padded_vocab_size=cfg["vocab_size"], rotary_emb_base=base, tp=tp, pp=pp,
                  make_vocab_size_divisible_by=divisible_by_for(cfg["vocab_size"], tp),
                  max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
                  params_dtype=HF_DTYPES.get(str(cfg.get("dtype") or cfg.get("torch_dtype")), "float32"))
    common["seq_length"] = common["max_position_embeddings"]  # NeoX's RoPE cache length; a config may lower it
    if name in LLAMA_FAMILY:
        if act != "silu":
            raise _refuse(where, "hidden_act", act, "NeoX's gated MLP is SwiGLU (silu)", "import a silu model")
        if pct != 1:
            raise _refuse(where, "partial_rotary_factor", pct, "a Llama-family model rotates every head dimension "
                          "in transformers", "restore config.json")
        _sliding_window(cfg, name, where)
        qwen = name == "Qwen2ForCausalLM"
        attn_bias = True if qwen else bool(cfg.get("attention_bias", False))
        return ModelShape(num_kv_heads=kv, rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), attn_bias=attn_bias,
                          mlp_bias=bool(cfg.get("mlp_bias", False)), **common)
    if kv != heads:
        raise _refuse(where, "num_key_value_heads", kv, "GPTNeoX has no grouped-query attention", "restore config.json")
    if act not in ("gelu", *TANH_GELU):
        raise _refuse(where, "hidden_act", act, "NeoX's classic MLP computes GeLU (erf, or tanh with "
                      "bias_gelu_fusion)", "import a model with gelu or gelu_pytorch_tanh")
    return ModelShape(num_kv_heads=heads, norm="layernorm", activation="gelu", pos_emb="rotary",
                      gelu_approx="tanh" if act in TANH_GELU else "erf", rotary_pct=pct,
                      layernorm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
                      parallel_residual=bool(cfg.get("use_parallel_residual", True)),
                      attn_bias=bool(cfg.get("attention_bias", True)), mlp_bias=True, **common)


def divisible_by_for(rows: int, tp: int, tokenizer_size: int | None = None) -> int:
    """The largest `make_vocab_size_divisible_by` in 128, 64, ..., 1 with which NeoX pads the tokenizer's size
    (`rows` when unknown) to exactly `rows` at this TP; `rows // tp` if none does (it always does)."""
    size = rows if tokenizer_size is None else tokenizer_size
    for d in (128, 64, 32, 16, 8, 4, 2, 1):
        if rows % (d * tp) == 0 and d * tp * math.ceil(size / (d * tp)) == rows:
            return d
    return rows // tp


# Fields of a NeoX config that must equal the HF model's (a NeoX config given with --config is checked).
MATCHED = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_size", "norm", "activation", "pos_emb",
           "parallel_residual", "attn_bias", "mlp_bias", "rotary_pct", "rotary_emb_base")
NEOX_NAME = {"num_heads": "num_attention_heads", "ffn_size": "intermediate_size (as the FFN width)",
             "parallel_residual": "gpt_j_residual", "attn_bias": "use_bias_in_attn_linear",
             "mlp_bias": "use_bias_in_mlp", "norm_eps": "rms_norm_epsilon / layernorm_epsilon",
             "gelu_approx": "bias_gelu_fusion", "padded_vocab_size": "the padded vocab"}


def check_same_model(hf: ModelShape, neox: ModelShape, where: str | Path) -> ModelShape:
    """UserError naming the first NeoX config field that makes `neox` compute another model than `hf`;
    returns `neox` with the HF vocab rows filled in."""
    fields = [*MATCHED, "norm_eps", *(("gelu_approx",) if not hf.gated else ())]
    if neox.padded_vocab_size is not None:
        fields.append("padded_vocab_size")
    for f in fields:
        a, b = getattr(hf, f), getattr(neox, f)
        if a != b:
            extra = ""
            if f == "padded_vocab_size":
                extra = f" (set make_vocab_size_divisible_by: {divisible_by_for(a, neox.tp, neox.vocab_size)})"
            raise UserError(f"{where}: {NEOX_NAME.get(f, f)} gives {b!r} but the HF model has {a!r}; the NeoX config "
                            f"does not describe this model: fix it{extra}, or let --write-config write it")
    return neox.replace(padded_vocab_size=hf.padded_vocab_size)


class HFReader:
    """Read an HF model directory lazily as logical tensors (the interface of `CheckpointReader`).

    Args:
        hf_dir: a directory with config.json and safetensors (or pytorch_model*.bin) weights.
        shape: the NeoX config's shape; checked against config.json (`check_same_model`), its TP/PP kept.
        tp, pp: TP degree and pipe_parallel_size of the shape when no `shape` is given.
        allow_nonfinite: hand out NaN/Inf weights instead of refusing them.
    """

    format = "hf"

    def __init__(self, hf_dir: str | Path, shape: ModelShape | None = None, *, tp: int = 1, pp: int = 1,
                 allow_nonfinite: bool = False):
        self.dir = Path(hf_dir)
        self.config = read_hf_config(self.dir)
        self.config_path = self.dir / "config.json"
        self.arch_name = _architecture(self.config, self.config_path)
        self.hf: HfArch = GPT_NEOX if self.arch_name == GPT_NEOX.name else LLAMA
        hf_shape = shape_from_hf_config(self.config, self.config_path, tp=shape.tp if shape else tp,
                                        pp=shape.pp if shape else pp)
        self.shape = check_same_model(hf_shape, shape, "--config") if shape is not None else hf_shape
        self.tied = bool(self.config.get("tie_word_embeddings", False))
        self.allow_nonfinite = allow_nonfinite
        self.notes: list[str] = []
        if self.tied:
            self.notes.append("tie_word_embeddings: the head is written as a copy of the embedding (NeoX runs untied: "
                              "same function; the two train apart from now on)")
        if self.arch_name in ZERO_FILLED:
            self.notes.append(f"{self.arch_name} has no bias on {', '.join(ZERO_FILLED[self.arch_name])}: NeoX's "
                              "use_bias_in_attn_linear has one, written as zeros (same function)")
        self._bin_cache: tuple[Path, dict[str, torch.Tensor]] | None = None
        self.weight_map = self._weight_map()
        self._check_keys()

    # ---- files ---------------------------------------------------------------------------------
    def _weight_map(self) -> dict[str, Path]:
        """HF key -> file holding it; every file named must exist."""
        d = self.dir
        for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                                   ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            index = d / index_name
            if index.is_file():
                try:
                    names = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                    raise UserError(f"{index}: not an index (expected a JSON object with a weight_map); restore it "
                                    "from the model's source") from None
                files = {n: d / n for n in set(names.values())}
                for n, p in sorted(files.items()):
                    if not p.is_file():
                        raise UserError(f"{index} names {n}, which does not exist in {d}; the download is incomplete: "
                                        "fetch the missing shard")
                return {k: files[n] for k, n in names.items()}
            if (d / single).is_file():
                return {k: d / single for k in self._file_keys(d / single)}
        found = sorted(p.name for p in d.iterdir() if p.suffix in (".safetensors", ".bin"))
        raise UserError(f"{d} has no model.safetensors, model.safetensors.index.json, pytorch_model.bin or its index "
                        f"(found {found or 'no weight files'}); pass a directory written by save_pretrained")

    def _file_keys(self, path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as f:
                    return list(f.keys())
            except Exception as exc:  # safetensors raises its own error types for damaged headers
                raise UserError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]}); "
                                "fetch it again") from None
        return list(self._bin(path))

    def _bin(self, path: Path) -> dict[str, torch.Tensor]:
        if self._bin_cache is None or self._bin_cache[0] != path:
            from neox_progressive.io.safe import load_state_dict

            self._bin_cache = (path, load_state_dict(path))  # weights_only, memory-mapped
        return self._bin_cache[1]

    def files(self) -> list[Path]:
        return sorted(set(self.weight_map.values()))

    def sha256(self) -> dict[str, str]:
        """sha256 of every weight file and config.json, by file name."""
        out = {}
        for p in [self.config_path, *self.files()]:
            h = hashlib.sha256()
            with p.open("rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            out[p.name] = h.hexdigest()
        return out

    # ---- keys and shapes -----------------------------------------------------------------------
    def _table(self, part: str, i: int | None = None) -> dict[str, tuple[str, ...]]:
        """HF key -> logical keys of one part, for the tensors this shape has (hf.py's tables)."""
        shape = self.shape
        if part == "layer":
            keep = set(arch.logical_layer_keys(shape)) - set(ZERO_FILLED.get(self.arch_name, ()))
            prefix = self.hf.layer_prefix.format(i=i)
            return {prefix + k: v for k, v in self.hf.layer.items() if all(s in keep for s in v)}
        keep = set(arch.logical_part_keys(part, shape))
        table = {k: v for k, v in self.hf.globals.items() if all(s in keep for s in v)}
        if part == "head" and self.tied:
            return {}
        return table

    def _expected(self, table: dict[str, tuple[str, ...]]) -> dict[str, tuple[int, ...]]:
        logical = {**arch.logical_layer_shapes(self.shape.replace(tp=1)),
                   **arch.logical_global_shapes(self.shape.replace(tp=1))}
        out = {}
        for key, sources in table.items():
            shapes = [logical[s.split(".", 2)[-1] if s.startswith("layers.") else s] for s in sources]
            out[key] = (sum(s[0] for s in shapes), *shapes[0][1:])
        return out

    def _head_key(self) -> str:
        return next(k for k, v in self.hf.globals.items() if v == ("head.weight",))

    def _aliases(self, key: str) -> tuple[str, ...]:
        """The names a key may have in the files (transformers 5.x saves GPTNeoX's head as lm_head)."""
        return (key, "lm_head.weight") if key == "embed_out.weight" else (key,)

    def _find(self, key: str) -> str | None:
        return next((k for k in self._aliases(key) if k in self.weight_map), None)

    def _check_keys(self) -> None:
        """Every tensor the model needs is in the weight map; no weight the model does not know is there."""
        tables = [self._table(p) for p in arch.GLOBAL_PARTS]
        tables += [self._table("layer", i) for i in range(self.shape.num_layers)]
        need = [k for t in tables for k in t]
        missing = [k for k in need if self._find(k) is None]
        if missing:
            raise UserError(f"{self.dir}: weight {missing[0]!r} is missing ({len(missing)} missing in all) but "
                            f"config.json ({self.arch_name}) needs it; the weights do not match config.json")
        known = {a for k in need for a in self._aliases(k)} | {self._head_key(), "lm_head.weight"}
        extra = [k for k in self.weight_map if k not in known and not k.endswith(BUFFERS)]
        if extra:
            raise UserError(f"{self.dir}: weight {extra[0]!r} ({len(extra)} unknown in all) is not part of "
                            f"{self.arch_name} as config.json describes it (NeoX would drop it); check config.json "
                            "(attention_bias, mlp_bias, num_hidden_layers) against the weights")

    # ---- reading -------------------------------------------------------------------------------
    def _read(self, table: dict[str, tuple[str, ...]]) -> dict[str, torch.Tensor]:
        """The HF tensors of `table`, checked for shape (and NaN/Inf), grouped by file."""
        from safetensors import safe_open

        want = self._expected(table)
        by_file: dict[Path, list[str]] = {}
        for key in table:
            by_file.setdefault(self.weight_map[self._find(key)], []).append(key)
        out = {}
        for path, keys in by_file.items():
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    names = set(f.keys())
                    got = {k: f.get_tensor(self._in(k, names, path)) for k in keys}
            else:
                sd = self._bin(path)
                got = {k: sd[self._in(k, set(sd), path)] for k in keys}
            for k, t in got.items():
                if tuple(t.shape) != want[k]:
                    raise UserError(f"{path}: {k} has shape {tuple(t.shape)} but config.json implies {want[k]} "
                                    "(hidden_size, heads, intermediate_size, vocab_size); the weights do not match "
                                    "config.json")
            if not self.allow_nonfinite:
                finite.check_finite(got, path)
            out.update(got)
        return out

    def _in(self, key: str, names: set[str], path: Path) -> str:
        name = next((a for a in self._aliases(key) if a in names), None)
        if name is None:
            raise UserError(f"{path}: the index puts {key!r} in this file but it is not there; the index and the "
                            "shards disagree: fetch the model again")
        return name

    def _logical(self, table: dict[str, tuple[str, ...]], prefix: str = "") -> dict[str, torch.Tensor]:
        out = {}
        for key, t in self._read(table).items():
            sources = tuple(s.removeprefix(prefix) for s in table[key])
            parts = arch.unfuse_qkv([t], self.shape.replace(tp=1)) if len(sources) == 3 else (t,)
            out.update(zip(sources, parts))
        return out

    def part(self, part: str) -> dict[str, torch.Tensor]:
        """Logical tensors of 'embed', 'final_norm' or 'head' (keys as in `arch.logical_part_keys`)."""
        if part == "head" and self.tied:
            return {"head.weight": self.part("embed")["embed.weight"].clone()}
        out = self._logical(self._table(part))
        return {k: out[k] for k in arch.logical_part_keys(part, self.shape)}

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        """Logical tensors of transformer layer i (keys as in `arch.logical_layer_keys`)."""
        if not 0 <= i < self.shape.num_layers:
            raise IndexError(i)
        prefix = f"layers.{i}."
        table = {k: tuple(prefix + s for s in v) for k, v in self._table("layer", i).items()}
        out = self._logical(table, prefix)
        like = next(iter(out.values()))
        shapes = arch.logical_layer_shapes(self.shape.replace(tp=1))
        for key in ZERO_FILLED.get(self.arch_name, ()):
            if key in shapes:
                out[key] = torch.zeros(shapes[key], dtype=like.dtype)
        return {k: out[k] for k in arch.logical_layer_keys(self.shape)}

    def iter_layers(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        for i in range(self.shape.num_layers):
            yield i, self.layer(i)

    def embed(self) -> torch.Tensor:
        return self.part("embed")["embed.weight"]

    def head(self) -> torch.Tensor:
        return self.part("head")["head.weight"]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole logical model in memory (small models: tests, eval)."""
        sd = dict(self.part("embed"))
        for i, layer in self.iter_layers():
            sd.update({f"layers.{i}.{k}": v for k, v in layer.items()})
        sd.update(self.part("final_norm"))
        sd.update(self.part("head"))
        return sd

    def dtype(self) -> torch.dtype:
        """The dtype of the stored embedding (no data read for safetensors)."""
        return self.part("embed")["embed.weight"].dtype
