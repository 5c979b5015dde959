"""Model shapes read from GPT-NeoX YAML configs, exactly as NeoX reads them.

NeoX (megatron/neox_arguments/arguments.py) merges every YAML file given to `deepy.py`:
top-level keys may use dashes or underscores, and the same key in two files is an error
(no later-file override). We read the same way, then derive the shape facts a checkpoint
depends on:

- SwiGLU FFN width: NeoX turns `intermediate_size` I into linear1 rows
  roundup(int(2I/3), 2m) and linear2 columns roundup(int(2I/3)//2, m), m = `mlp_multiple_of`
  (transformer.py ParallelMLP). The width users think in (HF `intermediate_size`, e.g. 7168)
  is the second; `neox_intermediate_size(7168)` gives the I that produces it (21504).
- `num_kv_heads` defaults to the head count (MHA). Fused QKV rows are per-head interleaved
  for MHA and blocked [Q|K|V] per TP rank for GQA (see `arch.py`).
- Padded vocab: the tokenizer's size rounded up to `make_vocab_size_divisible_by` x TP
  (tokenizer.py `_vocab_size_with_padding`). Where no tokenizer file is on this machine the
  size comes from the checkpoint instead (`ModelShape.with_vocab`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from neox_progressive.errors import UserError

# NeoX defaults (megatron/neox_arguments/neox_args.py) for the keys that decide a shape.
NEOX_DEFAULTS: dict[str, Any] = {
    "pipe_parallel_size": 0,
    "model_parallel_size": 1,
    "intermediate_size": None,
    "expansion_factor": None,
    "mlp_multiple_of": 1,
    "num_kv_heads": None,
    "norm": "layernorm",
    "rms_norm_epsilon": 1.0e-8,
    "pos_emb": "learned",
    "no_weight_tying": False,
    "make_vocab_size_divisible_by": 128,
    "activation": "gelu",
    "rotary_pct": 1.0,
    "rotary_emb_base": 10000,
    "rotary_save_freqs_buffer": False,
    "gpt_j_residual": False,
    "use_bias_in_attn_linear": True,
    "use_bias_in_mlp": True,
    "use_qk_layernorm": False,
    "use_mup": False,
    "soft_prompt_tuning": None,
    "output_layer_parallelism": "column",
    "moe_num_experts": 1,
    "tokenizer_type": "GPT2BPETokenizer",
    "vocab_file": None,
    "precision": None,
}

# Keys that select a model NeoX can build but this plugin cannot represent, with the value
# this plugin needs (Llama-style decoder, see NEOX_FACTS.md).
REQUIRED_VALUES = {
    "norm": "rmsnorm",
    "activation": "swiglu",
    "pos_emb": "rotary",
    "no_weight_tying": True,
    "gpt_j_residual": False,
    "use_qk_layernorm": False,
    "use_mup": False,
    "soft_prompt_tuning": None,
    "moe_num_experts": 1,
}


def _yaml_loader():
    class Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise UserError(f"{node.start_mark.name}: key {key!r} appears twice in one mapping")
            seen.add(key)
        return loader.construct_mapping_orig(node, deep=deep)

    Loader.construct_mapping_orig = yaml.SafeLoader.construct_mapping
    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return Loader


def read_yaml(path: str | Path) -> dict[str, Any]:
    """One YAML file as a dict (duplicate keys are an error, as in NeoX)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} does not exist")
    try:
        with path.open(encoding="utf-8") as f:
            data = yaml.load(f, Loader=_yaml_loader())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except (UnicodeDecodeError, ValueError) as exc:  # binary garbage; PyYAML's reader raises ValueError subclasses
        raise UserError(f"{path}: not a text (UTF-8 YAML) file ({str(exc).splitlines()[0][:80]}); pass the YAML "
                        "file itself") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a NeoX config must be a mapping of keys, got {type(data).__name__}")
    return data


def _check_key(key: str, value: Any, path: Path) -> None:
    """NeoX refuses unknown keys (here with a "did you mean") and values of the wrong type (`hidden_size: 64.5`)."""
    from neox_progressive.neox_args.validator import arg_spec, type_problem

    if arg_spec(key) is None:
        raise UserError(f"{path}: {type_problem(key, value)}: correct the key or remove it")
    if value is not None and (problem := type_problem(key, value)):  # NeoX's validate_types, every key
        raise UserError(f"{path}: {problem}; NeoX would refuse this config: correct the value")


def merge_neox_configs(paths: Iterable[str | Path]) -> dict[str, Any]:
    """Merge NeoX YAML files the way NeoX does: dashes become underscores, no key twice, no unknown key,
    every value of the type NeoX requires."""
    merged: dict[str, Any] = {}
    origin: dict[str, Path] = {}
    paths = list(paths)
    if not paths:
        raise UserError("no NeoX config given; pass the member's YAML file(s), e.g. --config stage_1B.yml")
    for path in paths:
        for key, value in read_yaml(path).items():
            norm_key = str(key).replace("-", "_")
            if norm_key in merged:
                raise UserError(
                    f"key {norm_key!r} is set in both {origin[norm_key]} and {path}; NeoX refuses "
                    "a key repeated across config files: keep it in one file"
                )
            _check_key(norm_key, value, Path(path))
            merged[norm_key] = value
            origin[norm_key] = Path(path)
    return merged


def swiglu_widths(intermediate_size: int, multiple_of: int) -> tuple[int, int]:
    """(linear1 rows, linear2 columns) NeoX builds for a gated MLP with this config value."""
    ffn = int(intermediate_size * 2 / 3)
    ffn_in = ffn // 2
    ffn = 2 * multiple_of * math.ceil(ffn / (2 * multiple_of))
    ffn_in = multiple_of * math.ceil(ffn_in / multiple_of)
    return ffn, ffn_in


def neox_intermediate_size(ffn_width: int, multiple_of: int = 1) -> int:
    """The NeoX `intermediate_size` that yields a SwiGLU FFN of `ffn_width` (3 x width).

    Raises UserError when `mlp_multiple_of` rounds the width away (e.g. 11200 with 256).
    """
    value = 3 * ffn_width
    rows, cols = swiglu_widths(value, multiple_of)
    if rows != 2 * ffn_width or cols != ffn_width:
        good = [m for m in (256, 128, 64, 32, 16, 8, 1) if ffn_width % m == 0][0]
        raise UserError(
            f"FFN width {ffn_width} cannot be built with mlp_multiple_of={multiple_of} (NeoX would "
            f"make {cols}); use an mlp_multiple_of that divides {ffn_width}, e.g. {good}"
        )
    return value


def tokenizer_vocab_size(cfg: dict[str, Any], base_dir: Path | None = None) -> int | None:
    """The unpadded vocab size of the config's tokenizer, or None if its file is not here.

    Reads the files directly (no tokenizer library needed for HF JSON or GPT-2 BPE).
    """
    ttype = str(cfg.get("tokenizer_type") or NEOX_DEFAULTS["tokenizer_type"]).lower()
    if ttype == "charleveltokenizer":
        return 512
    vocab_file = cfg.get("vocab_file")
    if not vocab_file:
        return None
    path = Path(vocab_file)
    if not path.is_absolute() and base_dir is not None and not path.exists():
        path = base_dir / path
    if not path.is_file():
        return None
    if ttype in ("hftokenizer",):
        data = json.loads(path.read_text())
        vocab = data.get("model", {}).get("vocab", {})
        ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab)))
        ids |= {tok["id"] for tok in data.get("added_tokens", [])}
        return len(ids)
    if ttype in ("gpt2bpetokenizer", "hfgpt2tokenizer"):
        return len(json.loads(path.read_text()))
    if ttype == "spmtokenizer":
        try:
            import sentencepiece as spm
        except ImportError:
            return None
        return int(spm.SentencePieceProcessor(model_file=str(path)).vocab_size())
    return None


def pad_vocab(vocab_size: int, divisible_by: int, tp: int) -> int:
    multiple = divisible_by * tp
    return multiple * math.ceil(vocab_size / multiple)


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """Everything about a NeoX Llama-style model that decides its checkpoint tensors."""

    hidden_size: int
    """Model width h."""
    num_layers: int
    """Transformer layers L."""
    num_heads: int
    """Query heads; head_dim = hidden_size / num_heads."""
    num_kv_heads: int
    """Key/value heads (== num_heads for MHA)."""
    ffn_size: int
    """Real SwiGLU width F (HF `intermediate_size`); linear1 has 2F rows."""
    padded_vocab_size: int | None
    """Embedding/head rows; None until known from the tokenizer or a checkpoint."""
    vocab_size: int | None = None
    """The tokenizer's own size before padding, when its file is available."""
    make_vocab_size_divisible_by: int = 128
    mlp_multiple_of: int = 1
    seq_length: int = 2048
    max_position_embeddings: int = 2048
    rotary_pct: float = 1.0
    rotary_emb_base: int = 10000
    rms_norm_eps: float = 1.0e-8
    attn_bias: bool = False
    """`use_bias_in_attn_linear`: biases on QKV and dense."""
    mlp_bias: bool = False
    """`use_bias_in_mlp`: biases on linear1 and linear2."""
    rotary_save_freqs_buffer: bool = False
    """If true NeoX saves `attention.rotary_emb.inv_freq` in every layer file."""
    tp: int = 1
    """`model_parallel_size`."""
    pp: int = 1
    """`pipe_parallel_size`; 0 selects the sequential checkpoint format."""
    params_dtype: str = "float32"

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_size", "tp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise UserError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_heads}; pick heads so that head_dim = hidden/heads is an integer"
            )
        if self.num_heads % self.num_kv_heads:
            raise UserError(
                f"num_attention_heads {self.num_heads} is not divisible by num_kv_heads "
                f"{self.num_kv_heads}; each KV head must serve a whole group of query heads"
            )
        if self.num_heads % self.tp or self.num_kv_heads % self.tp:
            raise UserError(
                f"model_parallel_size {self.tp} must divide num_attention_heads {self.num_heads} "
                f"and num_kv_heads {self.num_kv_heads}"
            )
        if self.ffn_size % self.tp:
            raise UserError(f"model_parallel_size {self.tp} must divide the FFN width {self.ffn_size}")
        if self.hidden_size % self.tp:
            raise UserError(f"model_parallel_size {self.tp} must divide hidden_size {self.hidden_size}")
        if self.padded_vocab_size is not None and self.padded_vocab_size % self.tp:
            raise UserError(
                f"padded vocab {self.padded_vocab_size} is not divisible by model_parallel_size {self.tp}"
            )
        if not 0 < self.rotary_pct <= 1:
            raise UserError(f"rotary_pct must be in (0, 1], got {self.rotary_pct}")
        if self.pp < 0:
            raise UserError(f"pipe_parallel_size must be >= 0, got {self.pp}")

    # ---- derived ---------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def gqa(self) -> bool:
        """NeoX takes its GQA code path (blocked QKV) only when kv heads differ from heads."""
        return self.num_kv_heads != self.num_heads

    @property
    def rotary_dims(self) -> int:
        return self.head_dim if self.rotary_pct == 1 else int(self.head_dim * self.rotary_pct)

    @property
    def intermediate_size(self) -> int:
        """The NeoX config value that produces `ffn_size`."""
        return neox_intermediate_size(self.ffn_size, self.mlp_multiple_of)

    @property
    def sequential(self) -> bool:
        """True for the pp=0 checkpoint format (`mp_rank_XX` files holding `sequential.N.` keys)."""
        return self.pp == 0

    def replace(self, **changes) -> ModelShape:
        return dataclasses.replace(self, **changes)

    def with_vocab(self, padded_vocab_size: int) -> ModelShape:
        """Fill in (or check) the padded vocab from a checkpoint's embedding rows."""
        if self.padded_vocab_size is not None and self.padded_vocab_size != padded_vocab_size:
            raise UserError(
                f"the checkpoint has {padded_vocab_size} vocab rows but the config's tokenizer pads "
                f"to {self.padded_vocab_size}; the config does not describe this checkpoint"
            )
        return self.replace(padded_vocab_size=padded_vocab_size)

    def param_count(self, include_embeddings: bool = True) -> int:
        """Parameters of the model (embedding and untied head included unless asked not to)."""
        h, f, d = self.hidden_size, self.ffn_size, self.head_dim
        attn = h * (self.num_heads * d) * 2 + h * (self.num_kv_heads * d) * 2
        if self.attn_bias:
            attn += (self.num_heads + 2 * self.num_kv_heads) * d + h
        mlp = 3 * h * f + ((2 * f + h) if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * h
        total = self.num_layers * per_layer + h
        if include_embeddings:
            if self.padded_vocab_size is None:
                raise UserError("the vocab size is unknown: give a tokenizer file or a checkpoint")
            total += 2 * self.padded_vocab_size * h
        return total

    def to_neox(self) -> dict[str, Any]:
        """The NeoX config keys that reproduce this shape (architecture keys only)."""
        return {
            "pipe_parallel_size": self.pp,
            "model_parallel_size": self.tp,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "intermediate_size": self.intermediate_size,
            "mlp_multiple_of": self.mlp_multiple_of,
            "seq_length": self.seq_length,
            "max_position_embeddings": self.max_position_embeddings,
            "pos_emb": "rotary",
            "rotary_pct": self.rotary_pct,
            "rotary_emb_base": self.rotary_emb_base,
            "norm": "rmsnorm",
            "rms_norm_epsilon": self.rms_norm_eps,
            "activation": "swiglu",
            "no_weight_tying": True,
            "gpt_j_residual": False,
            "use_bias_in_attn_linear": self.attn_bias,
            "use_bias_in_mlp": self.mlp_bias,
            "make_vocab_size_divisible_by": self.make_vocab_size_divisible_by,
            "output_layer_parallelism": "column",
        }

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_neox(cls, cfg: dict[str, Any], base_dir: Path | None = None) -> ModelShape:
        """Build from a merged NeoX config dict (see `merge_neox_configs`)."""
        get = lambda key: cfg.get(key, NEOX_DEFAULTS.get(key))  # noqa: E731
        for key, want in REQUIRED_VALUES.items():
            have = get(key)
            if isinstance(want, str) and isinstance(have, str):
                ok = have.lower() == want
            else:
                ok = have == want
            if not ok:
                raise UserError(
                    f"config key {key}: {have!r} is not supported; neox-progressive handles "
                    f"Llama-style models, which need {key}: {want!r}"
                )
        for key in ("num_layers", "hidden_size", "num_attention_heads"):
            if cfg.get(key) is None:
                raise UserError(f"config key {key} is missing; NeoX needs it to build the model")
        hidden = cfg["hidden_size"]
        multiple_of = int(get("mlp_multiple_of"))
        if get("intermediate_size"):
            inter = int(get("intermediate_size"))
        elif get("expansion_factor"):
            inter = int(float(get("expansion_factor")) * hidden)
        else:
            inter = 4 * hidden
        rows, cols = swiglu_widths(inter, multiple_of)
        if rows != 2 * cols:
            raise UserError(
                f"intermediate_size {inter} with mlp_multiple_of {multiple_of} makes NeoX build "
                f"linear1 with {rows} rows but linear2 with {cols} columns (not half); NeoX cannot "
                f"run that model. Use intermediate_size = 3 x the FFN width, e.g. {3 * cols}"
            )
        tp = int(get("model_parallel_size"))
        divisible = int(get("make_vocab_size_divisible_by"))
        vocab = tokenizer_vocab_size(cfg, base_dir)
        padded = pad_vocab(vocab, divisible, tp) if vocab is not None else None
        seq = cfg.get("seq_length") or cfg.get("max_position_embeddings") or 2048
        precision = str(get("precision") or "fp32").lower()
        if cfg.get("bf16", {}) and isinstance(cfg.get("bf16"), dict) and cfg["bf16"].get("enabled"):
            precision = "bfloat16"
        if cfg.get("fp16", {}) and isinstance(cfg.get("fp16"), dict) and cfg["fp16"].get("enabled"):
            precision = "fp16"
        dtype = {"bfloat16": "bfloat16", "fp16": "float16"}.get(precision, "float32")
        return cls(
            hidden_size=int(hidden),
            num_layers=int(cfg["num_layers"]),
            num_heads=int(cfg["num_attention_heads"]),
            num_kv_heads=int(get("num_kv_heads") or cfg["num_attention_heads"]),
            ffn_size=cols,
            padded_vocab_size=padded,
            vocab_size=vocab,
            make_vocab_size_divisible_by=divisible,
            mlp_multiple_of=multiple_of,
            seq_length=int(seq),
            max_position_embeddings=int(cfg.get("max_position_embeddings") or seq),
            rotary_pct=float(get("rotary_pct")),
            rotary_emb_base=int(get("rotary_emb_base")),
            rms_norm_eps=float(get("rms_norm_epsilon")),
            attn_bias=bool(get("use_bias_in_attn_linear")),
            mlp_bias=bool(get("use_bias_in_mlp")),
            rotary_save_freqs_buffer=bool(get("rotary_save_freqs_buffer")),
            tp=tp,
            pp=int(get("pipe_parallel_size")),
            params_dtype=dtype,
        )

    @classmethod
    def from_yamls(cls, paths: Iterable[str | Path]) -> ModelShape:
        """Read the member's NeoX YAML file(s); relative tokenizer paths also resolve next to them."""
        paths = list(paths)
        cfg = merge_neox_configs(paths)
        return cls.from_neox(cfg, base_dir=Path(paths[0]).parent)
