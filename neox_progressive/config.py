"""Model shapes read from GPT-NeoX YAML configs, exactly as NeoX reads them.

Two architectures NeoX trains are represented (NEOX_FACTS.md sections 2 and 11): the Llama shape
(`norm: rmsnorm`, `activation: swiglu`, rotary, sequential residual) and NeoX's classic transformer,
Pythia-style (`norm: layernorm` with bias, `activation: gelu`, `gpt_j_residual`, partial rotary or
learned position embeddings, biases). The fields `norm`, `activation`, `parallel_residual` and
`pos_emb` say which parts a model has; anything else NeoX can build is refused, one key at a time.

NeoX (megatron/neox_arguments/arguments.py) merges every YAML file given to `deepy.py`:
top-level keys may use dashes or underscores, and the same key in two files is an error
(no later-file override). We read the same way, then derive the shape facts a checkpoint
depends on:

- SwiGLU FFN width: NeoX turns `intermediate_size` I into linear1 rows
  roundup(int(2I/3), 2m) and linear2 columns roundup(int(2I/3)//2, m), m = `mlp_multiple_of`
  (transformer.py ParallelMLP). The width users think in (HF `intermediate_size`, e.g. 7168)
  is the second; `neox_intermediate_size(7168)` gives the I that produces it (21504).
- GeLU FFN width: linear1 rows roundup(I, 2m), linear2 columns roundup(I, m) (the same code
  path without the 2/3); NeoX runs only when the two agree, so F = I with F a multiple of 2m.
- GeLU flavour: `bias_gelu_fusion: true` computes the tanh approximation (activations.py
  `bias_gelu`), otherwise `F.gelu` or `erf_gelu` (`onnx_safe`), both the exact erf form.
- `num_kv_heads` defaults to the head count (MHA). Fused QKV rows are per-head interleaved
  for MHA and blocked [Q|K|V] per TP rank for GQA (see `arch.py`).
- Padded vocab: the tokenizer's size rounded up to `make_vocab_size_divisible_by` x TP
  (tokenizer.py `_vocab_size_with_padding`). Where no tokenizer file is on this machine the
  size comes from the checkpoint instead (`ModelShape.with_vocab`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from neox_progressive.errors import UserError
from neox_progressive.neox_keys import (  # noqa: F401 (re-exported: the tables belong with the shape)
    ACTIVATIONS,
    ATTENTION_TYPES,
    GELU_APPROX,
    NEOX_DEFAULTS,
    NORMS,
    POS_EMBS,
    REFUSAL_REASONS,
    REQUIRED_VALUES,
    SUPPORTED_CHOICES,
    architecture_fields,
)


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


def gelu_widths(intermediate_size: int, multiple_of: int) -> tuple[int, int]:
    """(linear1 rows, linear2 columns) NeoX builds for a plain (ungated) MLP with this config value."""
    rows = 2 * multiple_of * math.ceil(intermediate_size / (2 * multiple_of))
    cols = multiple_of * math.ceil(intermediate_size / multiple_of)
    return rows, cols


def gelu_intermediate_size(ffn_width: int, multiple_of: int = 1) -> int:
    """The NeoX `intermediate_size` that yields a GeLU FFN of `ffn_width` (the width itself).

    Raises UserError when NeoX would round linear1 and linear2 apart (width not a multiple of 2m).
    """
    if gelu_widths(ffn_width, multiple_of) != (ffn_width, ffn_width):
        raise UserError(
            f"GeLU FFN width {ffn_width} cannot be built with mlp_multiple_of={multiple_of}: NeoX rounds linear1 "
            f"to a multiple of {2 * multiple_of} and linear2 to a multiple of {multiple_of}; use a width that is "
            f"a multiple of {2 * multiple_of}, e.g. {2 * multiple_of * math.ceil(ffn_width / (2 * multiple_of))}"
        )
    return ffn_width


def pad_vocab(vocab_size: int, divisible_by: int, tp: int) -> int:
    multiple = divisible_by * tp
    return multiple * math.ceil(vocab_size / multiple)


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """Everything about a NeoX model (Llama shape or classic transformer) that decides its checkpoint tensors."""

    hidden_size: int
    """Model width h."""
    num_layers: int
    """Transformer layers L."""
    num_heads: int
    """Query heads; head_dim = hidden_size / num_heads."""
    num_kv_heads: int
    """Key/value heads (== num_heads for MHA)."""
    ffn_size: int
    """Real FFN width F: SwiGLU (HF Llama `intermediate_size`; linear1 has 2F rows) or GeLU (linear1 has F rows)."""
    padded_vocab_size: int | None
    """Embedding/head rows; None until known from the tokenizer or a checkpoint."""
    vocab_size: int | None = None
    """The tokenizer's own size before padding, when its file is available."""
    make_vocab_size_divisible_by: int = 128
    mlp_multiple_of: int = 1
    seq_length: int = 2048
    max_position_embeddings: int = 2048
    """Also the rows of the learned position table (`pos_emb: learned`)."""
    rotary_pct: float = 1.0
    rotary_emb_base: int = 10000
    rms_norm_eps: float = 1.0e-8
    """`rms_norm_epsilon` (used with `norm: rmsnorm`)."""
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
    # ---- architecture (defaults: the Llama shape) ----
    norm: str = "rmsnorm"
    """'rmsnorm' (NeoX param `scale`) or 'layernorm' (`weight` and `bias`)."""
    layernorm_eps: float = 1.0e-5
    """`layernorm_epsilon` (used with `norm: layernorm`)."""
    activation: str = "swiglu"
    """'swiglu' (gated: linear1 = [up; gate] per TP rank) or 'gelu' (plain linear1)."""
    gelu_approx: str = "erf"
    """GeLU flavour: 'tanh' (NeoX `bias_gelu_fusion: true`; HF `gelu_pytorch_tanh`) or 'erf' (exact; HF `gelu`)."""
    parallel_residual: bool = False
    """`gpt_j_residual`: x + attn(ln1(x)) + mlp(ln2(x)) instead of two sequential residual steps."""
    pos_emb: str = "rotary"
    """'rotary' (on the first `rotary_dims` of each head) or 'learned' (`position_embeddings` in layer 0)."""

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_size", "tp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        for name, allowed in (("norm", NORMS), ("activation", ACTIVATIONS), ("gelu_approx", GELU_APPROX),
                              ("pos_emb", POS_EMBS)):
            if getattr(self, name) not in allowed:
                raise UserError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
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
        if self.pos_emb == "rotary" and self.rotary_dims < 2:
            raise UserError(f"rotary_pct {self.rotary_pct} of head_dim {self.head_dim} rotates no dimension pair; "
                            "raise rotary_pct")
        if self.pp < 0:
            raise UserError(f"pipe_parallel_size must be >= 0, got {self.pp}")
        if self.parallel_residual and not self.mlp_bias:
            raise UserError(
                "gpt_j_residual: true with use_bias_in_mlp: false is not supported: NeoX's parallel residual "
                "(transformer.py) drops the attention output when the MLP has no bias; set use_bias_in_mlp: true"
            )

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
    def gated(self) -> bool:
        """SwiGLU (gate and up projections) rather than a plain GeLU MLP."""
        return self.activation == "swiglu"

    @property
    def norm_bias(self) -> bool:
        """LayerNorm has a bias (`weight` and `bias`); RMSNorm only a `scale`."""
        return self.norm == "layernorm"

    @property
    def norm_eps(self) -> float:
        """The epsilon of the norm in use (`layernorm_epsilon` or `rms_norm_epsilon`)."""
        return self.layernorm_eps if self.norm == "layernorm" else self.rms_norm_eps

    @property
    def architecture(self) -> str:
        """'llama' (RMSNorm, SwiGLU, sequential residual, rotary), 'neox' (LayerNorm, GeLU: the classic
        transformer) or, for other mixes of the supported parts, a description of the parts."""
        if (self.norm, self.activation) == ("rmsnorm", "swiglu") and not self.parallel_residual and self.pos_emb == "rotary":
            return "llama"
        if (self.norm, self.activation) == ("layernorm", "gelu"):
            return "neox"
        return f"{self.norm}+{self.activation}{'+parallel' if self.parallel_residual else ''}+{self.pos_emb}"

    @property
    def intermediate_size(self) -> int:
        """The NeoX config value that produces `ffn_size`."""
        if self.gated:
            return neox_intermediate_size(self.ffn_size, self.mlp_multiple_of)
        return gelu_intermediate_size(self.ffn_size, self.mlp_multiple_of)

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
        """Parameters of the model (embeddings and untied head included unless asked not to)."""
        from neox_progressive import arch

        size = lambda s: math.prod(s)  # noqa: E731
        per_layer = sum(size(s) for s in arch.logical_layer_shapes(self).values())
        total = self.num_layers * per_layer
        embeddings = ("embed.weight", "pos_embed.weight", "head.weight")
        if include_embeddings and self.padded_vocab_size is None:
            raise UserError("the vocab size is unknown: give a tokenizer file or a checkpoint")
        for key, s in arch.logical_global_shapes(self).items():
            if key not in embeddings or include_embeddings:
                total += size(s)
        return total

    def to_neox(self) -> dict[str, Any]:
        """The NeoX config keys that reproduce this shape (architecture keys only)."""
        out = {
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
            "pos_emb": self.pos_emb,
            "rotary_pct": self.rotary_pct,
            "rotary_emb_base": self.rotary_emb_base,
            "norm": self.norm,
        }
        if self.norm == "rmsnorm":
            out["rms_norm_epsilon"] = self.rms_norm_eps
        else:
            out["layernorm_epsilon"] = self.layernorm_eps
        out["activation"] = self.activation
        if not self.gated:
            out["bias_gelu_fusion"] = self.gelu_approx == "tanh"
        out.update({
            "no_weight_tying": True,
            "gpt_j_residual": self.parallel_residual,
            "use_bias_in_attn_linear": self.attn_bias,
            "use_bias_in_mlp": self.mlp_bias,
            "make_vocab_size_divisible_by": self.make_vocab_size_divisible_by,
            "output_layer_parallelism": "column",
        })
        return out

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_neox(cls, cfg: dict[str, Any], base_dir: Path | None = None) -> ModelShape:
        """Build from a merged NeoX config dict (see `merge_neox_configs`)."""
        get = lambda key: cfg.get(key, NEOX_DEFAULTS.get(key))  # noqa: E731
        arch = architecture_fields(get)
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
        if arch["activation"] == "swiglu":
            rows, cols = swiglu_widths(inter, multiple_of)
            if rows != 2 * cols:
                raise UserError(
                    f"intermediate_size {inter} with mlp_multiple_of {multiple_of} makes NeoX build "
                    f"linear1 with {rows} rows but linear2 with {cols} columns (not half); NeoX cannot "
                    f"run that model. Use intermediate_size = 3 x the FFN width, e.g. {3 * cols}"
                )
        else:
            rows, cols = gelu_widths(inter, multiple_of)
            if rows != cols:
                raise UserError(
                    f"intermediate_size {inter} with mlp_multiple_of {multiple_of} makes NeoX build linear1 with "
                    f"{rows} rows but linear2 with {cols} columns; NeoX cannot run that model. Use an "
                    f"intermediate_size that is a multiple of {2 * multiple_of}, e.g. {rows}"
                )
        tp = int(get("model_parallel_size"))
        divisible = int(get("make_vocab_size_divisible_by"))
        from neox_progressive.tokenizer import config_vocabulary

        known = config_vocabulary(cfg, base_dir, required=False)
        vocab = known.size if known is not None else None
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
            attn_bias=bool(get("use_bias_in_attn_linear")),
            mlp_bias=bool(get("use_bias_in_mlp")),
            rotary_save_freqs_buffer=bool(get("rotary_save_freqs_buffer")),
            tp=tp,
            pp=int(get("pipe_parallel_size")),
            params_dtype=dtype,
            **arch,
        )

    @classmethod
    def from_yamls(cls, paths: Iterable[str | Path]) -> ModelShape:
        """Read the member's NeoX YAML file(s); relative tokenizer paths also resolve next to them."""
        paths = list(paths)
        cfg = merge_neox_configs(paths)
        return cls.from_neox(cfg, base_dir=Path(paths[0]).parent)
