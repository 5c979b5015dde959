"""Lazy reader of GPT-NeoX checkpoints, both formats, any TP degree.

Pipeline format (pipe_parallel_size >= 1): ``<tag>/layer_XX-model_TT-model_states.pt`` per
layer and TP rank, plus ``mp_rank_RR_model_states.pt`` (PP x TP of them, ``module: None``).
Sequential format (pipe_parallel_size 0): ``<tag>/mp_rank_TT_model_states.pt`` per TP rank,
``module`` = {``sequential.N.<key>``: tensor}. See NEOX_FACTS.md sections 1, 4 and 5.

The reader opens one layer file (all TP ranks of it) at a time, memory-mapped, and hands out
logical tensors (`arch.py`) in the files' dtype. Sequential files are memory-mapped too, so
only the tensors being converted are paged in.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neox_progressive import arch
from neox_progressive.config import ModelShape
from neox_progressive.errors import UserError
from neox_progressive.io.safe import load_pt, load_state_dict

LAYER_RE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
MP_RE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
# mp_rank keys we read; everything else in those files is ignored.
META_KEYS = ("iteration", "global_steps", "skipped_steps", "dp_world_size", "mp_world_size", "args", "ds_version")


def resolve_checkpoint_dir(path: str | Path) -> tuple[Path, str | None]:
    """A NeoX save dir (with `latest`) or a tag dir -> (tag dir, tag)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_dir():
        raise UserError(f"checkpoint {str(path)!r} is a file; pass the NeoX save dir (with `latest`) or a global_stepN dir")
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if not tag:
            raise UserError(f"{latest} is empty; it should name the checkpoint's tag dir (e.g. global_step1000): write "
                            "the tag into it, or pass the tag dir itself")
        tag_dir = path / tag
        if not tag_dir.is_dir():
            raise UserError(f"{latest} names tag {tag!r} but {tag_dir} does not exist; fix `latest` or restore that dir")
        return tag_dir, tag
    if any(LAYER_RE.match(p.name) or MP_RE.match(p.name) for p in path.iterdir()):
        return path, path.name
    tags = sorted(p.name for p in path.iterdir() if p.is_dir() and (p / arch.mp_rank_file_name(0)).exists())
    hint = f" (found tag dirs {', '.join(tags)}: pass one of them, or write its name into {latest})" if tags else ""
    raise UserError(f"{path} is not a NeoX checkpoint: no `latest` file and no model_states files{hint}")


@dataclass
class FileInfo:
    path: Path
    size: int


class CheckpointReader:
    """Read a NeoX checkpoint lazily as logical tensors.

    Args:
        path: NeoX save dir (its `latest` names the tag) or a tag dir such as global_step1000.
        shape: the model's shape (from its config). Needed for the logical view; `inspect`
            can use the reader without one for the raw per-file view.
    """

    def __init__(self, path: str | Path, shape: ModelShape | None = None):
        self.dir, self.tag = resolve_checkpoint_dir(path)
        names = sorted(p.name for p in self.dir.iterdir())
        self.layer_files: dict[tuple[int, int], Path] = {}
        for n in names:
            m = LAYER_RE.match(n)
            if m:
                self.layer_files[(int(m.group(1)), int(m.group(2)))] = self.dir / n
        self.mp_files = {int(m.group(1)): self.dir / n for n in names if (m := MP_RE.match(n))}
        if not self.mp_files:
            raise UserError(f"{self.dir} has no mp_rank_XX_model_states.pt file; it is not a complete NeoX checkpoint")
        missing = [i for i in range(len(self.mp_files)) if i not in self.mp_files]
        if missing:
            raise UserError(f"{self.dir}: mp_rank file(s) {missing} are missing (found {sorted(self.mp_files)})")
        self.format = "pipeline" if self.layer_files else "sequential"
        self._meta = self._read_meta()
        if self.format == "pipeline":
            self.tp = 1 + max(t for _, t in self.layer_files)
            self.layer_indices = sorted({i for i, _ in self.layer_files})
        else:
            self.tp = len(self.mp_files)
            self._seq: list[dict[str, torch.Tensor]] | None = None
            self.layer_indices = sorted({int(k.split(".")[1]) for k in self._sequential(0)})
        self._check_world_size()
        self.shape = self.match_shape(shape) if shape is not None else None

    # ---- metadata ------------------------------------------------------------------------------
    def _read_meta(self) -> dict[str, Any]:
        sd = load_pt(self.mp_files[0])
        if not isinstance(sd, dict):
            raise UserError(f"{self.mp_files[0]} is not a DeepSpeed model_states file (expected a dict)")
        if "module" not in sd:
            raise UserError(f"{self.mp_files[0]} has no 'module' entry; it is not a DeepSpeed model_states file")
        meta = {k: sd[k] for k in META_KEYS if k in sd}
        meta["has_module"] = isinstance(sd["module"], dict)
        return meta

    @property
    def meta(self) -> dict[str, Any]:
        """The allowlisted entries of mp_rank_00 (iteration, world sizes, NeoX `args`, ...)."""
        return dict(self._meta)

    @property
    def iteration(self) -> int | None:
        return self._meta.get("iteration")

    def _check_world_size(self) -> None:
        n = len(self.mp_files)
        mp = self._meta.get("mp_world_size")
        if mp is not None and mp != n:
            raise UserError(
                f"{self.mp_files[0]} says mp_world_size={mp} but {self.dir} has {n} mp_rank files; "
                "DeepSpeed refuses that checkpoint (files missing or extra)"
            )
        if self.format == "pipeline":
            for (idx, t) in [(i, t) for i in self.layer_indices for t in range(self.tp)]:
                if (idx, t) not in self.layer_files:
                    raise UserError(f"{self.dir}: {arch.layer_file_name(idx, t)} is missing (TP degree {self.tp})")
            if n % self.tp:
                raise UserError(f"{self.dir}: {n} mp_rank files is not a multiple of the TP degree {self.tp}")
        elif self._meta.get("has_module") is False:
            raise UserError(f"{self.dir}: no layer files and mp_rank_00 holds no module; unknown checkpoint format")

    def match_shape(self, shape: ModelShape) -> ModelShape:
        """Check a config's shape against the checkpoint's layout; take the vocab rows from the files."""
        want = shape.num_layers
        expected = sorted([arch.embed_index(), *(arch.layer_index(i) for i in range(want)),
                           arch.final_norm_index(want), arch.head_index(want)])
        if self.layer_indices != expected:
            have = max(len(self.layer_indices) - 3, 0)
            raise UserError(
                f"{self.dir} has layer indices {self._describe_layers()} ({have} transformer layers) but the "
                f"config has num_layers={want} (indices 0, 2..{want + 1}, {want + 3}, {want + 4}); the config "
                "does not describe this checkpoint"
            )
        if self.tp != shape.tp:
            raise UserError(
                f"{self.dir} is sharded for TP={self.tp} but the config says model_parallel_size={shape.tp}; "
                f"read it with model_parallel_size: {self.tp} (the expansion tool reshards to the target's TP)"
            )
        rows = self._raw(arch.embed_index(), arch.EMBED_KEY).shape[0] * self.tp
        shape = shape.with_vocab(rows)
        self._check_sizes(shape)
        return shape

    def _check_sizes(self, shape: ModelShape) -> None:
        """The embedding's and first layer's keys and tensor shapes against the config's (memory-mapped: no data read),
        so a config that does not describe the checkpoint is named as such before anything is planned from it."""
        want = arch.neox_file_shapes(shape)
        for index in (arch.embed_index(), arch.layer_index(0)):
            for t, sd in enumerate(self.file_state(index)):
                _compare(self.layer_files.get((index, t), self.mp_files.get(t)), arch.modern_keys(sd, shape),
                         want[index], shape)

    def _describe_layers(self) -> str:
        idx = self.layer_indices
        return f"{idx[:4]}...{idx[-2:]}" if len(idx) > 8 else str(idx)

    # ---- raw access ------------------------------------------------------------------------
    def _sequential(self, rank: int) -> dict[str, torch.Tensor]:
        if self._seq is None:
            self._seq = [None] * self.tp
        if self._seq[rank] is None:
            sd = load_pt(self.mp_files[rank])
            module = sd.get("module") if isinstance(sd, dict) else None
            if not isinstance(module, dict):
                raise UserError(f"{self.mp_files[rank]} holds no `module` state dict (sequential format expected)")
            bad = [k for k in module if not k.startswith("sequential.")]
            if bad:
                raise UserError(f"{self.mp_files[rank]}: key {bad[0]!r} is not a NeoX sequential key (`sequential.N.`)")
            self._seq[rank] = module
        return self._seq[rank]

    def file_state(self, index: int) -> list[dict[str, torch.Tensor]]:
        """Every TP rank's state dict of one NeoX layer index (NeoX key names)."""
        if index not in self.layer_indices:
            raise UserError(f"{self.dir} has no layer index {index}")
        if self.format == "pipeline":
            return [load_state_dict(self.layer_files[(index, t)]) for t in range(self.tp)]
        prefix = f"sequential.{index}."
        return [
            {k[len(prefix):]: v for k, v in self._sequential(t).items() if k.startswith(prefix)}
            for t in range(self.tp)
        ]

    def _raw(self, index: int, key: str) -> torch.Tensor:
        sd = self.file_state(index)[0]
        if key not in sd:
            raise UserError(f"{self.dir}: layer index {index} has no key {key!r} (found {sorted(sd)})")
        return sd[key]

    def files(self) -> list[FileInfo]:
        paths = [*self.mp_files.values(), *self.layer_files.values()]
        return [FileInfo(p, p.stat().st_size) for p in sorted(paths)]

    def sha256(self) -> dict[str, str]:
        """sha256 of every model file (not the optimizer shards), by file name."""
        out = {}
        for info in self.files():
            h = hashlib.sha256()
            with info.path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            out[info.path.name] = h.hexdigest()
        return out

    # ---- logical view ------------------------------------------------------------------------
    def _need_shape(self) -> ModelShape:
        if self.shape is None:
            raise UserError("reading logical tensors needs the model's config (pass --config)")
        return self.shape

    def _checked(self, index: int) -> list[dict[str, torch.Tensor]]:
        shape = self._need_shape()
        want = arch.neox_file_shapes(shape)[index]
        ranks = [arch.modern_keys(sd, shape) for sd in self.file_state(index)]
        for t, sd in enumerate(ranks):
            _compare(self.layer_files.get((index, t), self.mp_files.get(t)), sd, want, shape)
        return ranks

    def part(self, part: str) -> dict[str, torch.Tensor]:
        """Logical tensors of 'embed', 'final_norm' or 'head' (keys as in `arch.logical_part_keys`)."""
        shape = self._need_shape()
        return arch.part_from_neox(part, self._checked(arch.part_index(part, shape)), shape)

    def embed(self) -> torch.Tensor:
        return self.part("embed")["embed.weight"]

    def pos_embed(self) -> torch.Tensor | None:
        """The learned position table [P, h], or None for rotary models."""
        return self.part("embed").get("pos_embed.weight")

    def head(self) -> torch.Tensor:
        return self.part("head")["head.weight"]

    def final_norm(self) -> torch.Tensor:
        return self.part("final_norm")["final_norm.weight"]

    def final_norm_bias(self) -> torch.Tensor | None:
        """The final LayerNorm's bias, or None for RMSNorm."""
        return self.part("final_norm").get("final_norm.bias")

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        """Logical tensors of transformer layer i (keys as in `arch.logical_layer_keys`)."""
        shape = self._need_shape()
        if not 0 <= i < shape.num_layers:
            raise IndexError(i)
        return arch.layer_from_neox(self._checked(arch.layer_index(i)), shape)

    def iter_layers(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        for i in range(self._need_shape().num_layers):
            yield i, self.layer(i)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole logical model in memory (small models: tests, eval, the builtin engine)."""
        return logical_state_dict(self)


def logical_state_dict(reader) -> dict[str, torch.Tensor]:
    """Every logical tensor of a reader with the logical interface (CheckpointReader, HFReader), keys as in
    `arch.logical_keys` (layer tensors prefixed `layers.{i}.`)."""
    sd = dict(reader.part("embed"))
    for i, layer in reader.iter_layers():
        sd.update({f"layers.{i}.{k}": v for k, v in layer.items()})
    sd.update(reader.part("final_norm"))
    sd.update(reader.part("head"))
    return sd


def copy_model(reader, writer, progress=None) -> None:
    """Stream a model from a reader to an open writer (CheckpointWriter, HFWriter) part by part, one layer at a
    time; `progress(i)` after layer i."""
    writer.write_part("embed", reader.part("embed"))
    for i, layer in reader.iter_layers():
        writer.write_layer(i, layer)
        if progress:
            progress(i)
    writer.write_part("final_norm", reader.part("final_norm"))
    writer.write_part("head", reader.part("head"))


def _compare(where, sd: dict[str, torch.Tensor], want: dict[str, tuple], shape: ModelShape) -> None:
    """UserError unless the keys of one file's state dict `sd` are `want`'s and every tensor has its shape."""
    missing = sorted(set(want) - set(sd))
    extra = sorted(set(sd) - set(want))
    if missing or extra:
        raise UserError(f"{where}: keys do not match the config (missing {missing}, unexpected {extra}); "
                        f"{_key_hint(missing, extra)}")
    for k, s in want.items():
        if tuple(sd[k].shape) != s:
            raise UserError(f"{where}: {k} has shape {tuple(sd[k].shape)} but the config given for this checkpoint "
                            f"implies {s}; the config (hidden_size {shape.hidden_size}, heads {shape.num_heads}/"
                            f"{shape.num_kv_heads}, FFN {shape.ffn_size}, activation {shape.activation}, positions "
                            f"{shape.pos_emb}, TP {shape.tp}) does not describe it: pass the config the checkpoint was "
                            "trained with")


def _key_hint(missing: list[str], extra: list[str]) -> str:
    """Which config key most likely disagrees with the checkpoint, from the keys that differ."""
    keys = " ".join(missing + extra)
    for needle, hint in ((".scale", "the config's norm (rmsnorm has `scale`, layernorm `weight` and `bias`)"),
                         ("layernorm.bias", "the config's norm (rmsnorm has `scale`, layernorm `weight` and `bias`)"),
                         ("position_embeddings", "the config's pos_emb (learned positions live in layer_00)"),
                         ("inv_freq", "rotary_save_freqs_buffer"),
                         ("query_key_value.bias", "use_bias_in_attn_linear"), ("dense.bias", "use_bias_in_attn_linear"),
                         ("linear1.bias", "use_bias_in_mlp"), ("linear2.bias", "use_bias_in_mlp")):
        if needle in keys:
            return f"check {hint}"
    return "check norm / pos_emb / use_bias_in_attn_linear / use_bias_in_mlp / rotary_save_freqs_buffer"


def read_checkpoint(path: str | Path, config: list[str | Path] | ModelShape) -> tuple[ModelShape, dict[str, torch.Tensor]]:
    """Convenience: (completed shape, whole logical state dict)."""
    shape = config if isinstance(config, ModelShape) else ModelShape.from_yamls(config)
    reader = CheckpointReader(path, shape)
    return reader.shape, reader.state_dict()
