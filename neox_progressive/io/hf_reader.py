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
hidden_size / num_attention_heads: such configs are refused (`hf_shape.py`: config.json -> ModelShape).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from neox_progressive import arch
from neox_progressive.config import ModelShape
from neox_progressive.errors import UserError
from neox_progressive.hf import GPT_NEOX, LLAMA, HfArch
from neox_progressive.hf_shape import (  # noqa: F401 (re-exported: the reader's public names)
    SUPPORTED,
    _architecture,
    check_same_model,
    divisible_by_for,
    read_hf_config,
    shape_from_hf_config,
)
from neox_progressive.io import finite
from neox_progressive.io.reader import logical_state_dict

ZERO_FILLED = {"Qwen2ForCausalLM": ("attn.o.bias",)}
"""Logical tensors the NeoX model has but the HF architecture lacks; written as zeros (exact)."""
BUFFERS = ("rotary_emb.inv_freq", "attention.bias", "attention.masked_bias")
"""HF keys that are buffers, not weights (older saves hold them); recomputed, so skipped."""
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _check_shape(path: Path, key: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    if got != want:
        raise UserError(f"{path}: {key} has shape {got} but config.json implies {want} (hidden_size, heads, "
                        "intermediate_size, vocab_size); the weights do not match config.json")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class HFReader:
    """Read an HF model directory lazily as logical tensors (the interface of `CheckpointReader`).

    Args:
        hf_dir: a directory with config.json and safetensors (or pytorch_model*.bin) weights.
        shape: the NeoX config's shape; checked against config.json (`check_same_model`), its TP/PP kept.
        shape_from: where `shape` came from (the YAML file), for the messages.
        tp, pp: TP degree and pipe_parallel_size of the shape when no `shape` is given.
        allow_nonfinite: hand out NaN/Inf weights instead of refusing them.
    """

    format = "hf"

    def __init__(self, hf_dir: str | Path, shape: ModelShape | None = None, *, tp: int = 1, pp: int = 1,
                 allow_nonfinite: bool = False, shape_from: str = "--config"):
        self.dir = Path(hf_dir)
        self.config = read_hf_config(self.dir)
        self.config_path = self.dir / "config.json"
        self.arch_name = _architecture(self.config, self.config_path)
        self.hf: HfArch = GPT_NEOX if self.arch_name == GPT_NEOX.name else LLAMA
        hf_shape = shape_from_hf_config(self.config, self.config_path, tp=shape.tp if shape else tp,
                                        pp=shape.pp if shape else pp)
        self.shape = check_same_model(hf_shape, shape, shape_from) if shape is not None else hf_shape
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
        """sha256 of config.json and every weight file, by file name (reads every byte: slow on big models)."""
        return {p.name: sha256_file(p) for p in [self.config_path, *self.files()]}

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
        self._check_shapes({k: v for t in tables for k, v in self._expected(t).items()})
        known = {a for k in need for a in self._aliases(k)} | {self._head_key(), "lm_head.weight"}
        extra = [k for k in self.weight_map if k not in known and not k.endswith(BUFFERS)]
        if extra:
            raise UserError(f"{self.dir}: weight {extra[0]!r} ({len(extra)} unknown in all) is not part of "
                            f"{self.arch_name} as config.json describes it (NeoX would drop it); check config.json "
                            "(attention_bias, mlp_bias, num_hidden_layers) against the weights")

    def _check_shapes(self, want: dict[str, tuple[int, ...]]) -> None:
        """Every tensor's shape from the safetensors headers (no data read), so a wrong shard fails before writing;
        .bin files are checked as they are read."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for key in want:
            by_file.setdefault(self.weight_map[self._find(key)], []).append(key)
        for path, keys in by_file.items():
            if path.suffix != ".safetensors":
                continue
            with safe_open(str(path), framework="pt") as f:
                names = set(f.keys())
                for k in keys:
                    _check_shape(path, k, tuple(f.get_slice(self._in(k, names, path)).get_shape()), want[k])

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
                _check_shape(path, k, tuple(t.shape), want[k])
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
        return logical_state_dict(self)

    def dtype(self) -> torch.dtype:
        """The dtype of the stored embedding (from the safetensors header: no data read)."""
        key = self._find(next(iter(self._table("embed"))))
        path = self.weight_map[key]
        if path.suffix != ".safetensors":
            return self._bin(path)[key].dtype
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            name = f.get_slice(key).get_dtype()
        return SAFETENSORS_DTYPES.get(name) or self.part("embed")["embed.weight"].dtype
