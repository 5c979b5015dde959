"""Atomic, streaming writer of transformers directories (sharded safetensors), part by part, in any order.

One writer for `export-hf` and for the HF-native `expand`. It takes logical tensors like the NeoX
`CheckpointWriter` (`write_part`, `write_layer`, in any order: b2b depth revisits earlier layers)
and writes:

    <out>/model-0000K-of-0000N.safetensors   (or model.safetensors when N is 1)
    <out>/model.safetensors.index.json       weight_map + total_size (N > 1)
    <out>/config.json, generation_config.json, tokenizer files (when given), extra files (a manifest)

Every HF key, its shape and dtype follow from the target shape and the architecture's key map
(`hf.HfArch`) before any tensor is computed, so the shards are laid out up front: each shard file
gets its safetensors header at the start, and each tensor is written at its offset when it
arrives (`os.pwrite`). Memory is the tensor being written, never a whole shard; the free space is
checked for the exact byte count. Nothing appears at `out` until every tensor was written (the
writer refuses to finish otherwise) and the files are fsynced (`io/atomic.py`).

The safetensors format (header length as u64 little endian, a JSON header of dtype / shape /
data_offsets per tensor plus `__metadata__`, padded with spaces to 8 bytes, then the data
contiguous in header order) is what `safetensors.safe_open` and transformers read; the tests load
every shard with both.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from neox_progressive import arch, hf
from neox_progressive.config import ModelShape
from neox_progressive.io.atomic import AtomicDir

ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Slot:
    """Where one HF tensor goes: its shard, its byte range in the shard's data section, its shape."""

    shard: int
    begin: int
    end: int
    shape: tuple[int, ...]


def part_shapes(shape: ModelShape, hf_arch: hf.HfArch, part: str) -> dict[str, tuple[int, ...]]:
    """HF keys (un-prefixed for a layer) and shapes of one logical part, from the key map itself (meta tensors)."""
    if part == "layer":
        logical, table = arch.logical_layer_shapes(shape), hf_arch.layer
    else:
        glob = arch.logical_global_shapes(shape)
        logical, table = {k: glob[k] for k in arch.logical_part_keys(part, shape)}, hf_arch.globals
    meta = {k: torch.empty(s, device="meta") for k, s in logical.items()}
    return {k: tuple(v.shape) for k, v in hf.hf_tensors(meta, table, shape, hf_arch).items()}


def hf_layout(shape: ModelShape, hf_arch: hf.HfArch) -> list[tuple[str, tuple[int, ...]]]:
    """Every HF key of the model with its shape, in file order: embedding, layers 0..L-1, final norm, head."""
    keys = list(part_shapes(shape, hf_arch, "embed").items())
    layer = part_shapes(shape, hf_arch, "layer")
    for i in range(shape.num_layers):
        keys += [(hf_arch.layer_prefix.format(i=i) + k, s) for k, s in layer.items()]
    for part in ("final_norm", "head"):
        keys += list(part_shapes(shape, hf_arch, part).items())
    return keys


def shard_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]


class HFWriter:
    """Write a transformers directory for `shape`, from logical tensors, part by part in any order.

    Use as a context manager; call `write_part` ('embed', 'final_norm', 'head') and `write_layer` for
    every layer. The writer knows the whole key list up front (`hf_layout`), so shards are laid out
    before the first tensor arrives and each tensor goes straight to its place on disk.

    Args:
        out: destination directory.
        shape: target shape (`padded_vocab_size` known); decides every HF key and shape.
        dtype: dtype of every tensor in the output (tensors handed in are cast to it).
        config: config.json content (without `torch_dtype`, which the writer sets); default `hf.hf_config`.
        hf_arch: key map; default `hf.hf_arch(shape)`.
        force: replace an existing `out`.
        max_shard_bytes: shard size limit (a tensor larger than it gets a shard of its own).
        generation_config: generation_config.json content; default bos / eos of `config`, greedy.
        tokenizer: anything with `.write(dir)` (hf_tokenizer.ExportTokenizer, CopiedFiles), run after config.json.
        extra_files: {relative name: text} written into `out` at the end (a manifest); may be filled while writing.
    """

    def __init__(self, out: str | Path, shape: ModelShape, dtype: torch.dtype, *, config: dict | None = None,
                 hf_arch: hf.HfArch | None = None, force: bool = False, max_shard_bytes: int = 5 * 2**30,
                 generation_config: dict | None = None, tokenizer=None, extra_files: dict[str, str] | None = None):
        if dtype not in ST_DTYPES:
            raise ValueError(f"dtype {dtype} cannot be written to safetensors by this writer")
        self.shape, self.dtype = shape, dtype
        self.hf = hf_arch or hf.hf_arch(shape)
        self.config = dict(config) if config is not None else hf.hf_config(shape, dtype)
        self.config["torch_dtype"] = str(dtype).removeprefix("torch.")
        self.generation_config = generation_config
        self.tokenizer = tokenizer
        self.extra_files = dict(extra_files or {})
        self.slots, self.names = self._layout(max_shard_bytes)
        self.total_bytes = sum(s.end - s.begin for s in self.slots.values())
        self._atomic = AtomicDir(out, force, need_bytes=self.total_bytes)
        self._fds: list[int] = []
        self._data_start: list[int] = []
        self._written: set[str] = set()
        self.root: Path | None = None
        self.bytes_written = 0

    def _layout(self, max_shard_bytes: int) -> tuple[dict[str, Slot], list[str]]:
        item = torch.empty((), dtype=self.dtype).element_size()
        slots: dict[str, Slot] = {}
        shard, used = 0, 0
        for key, s in hf_layout(self.shape, self.hf):
            n = item * int(torch.Size(s).numel())
            if used and used + n > max_shard_bytes:
                shard, used = shard + 1, 0
            slots[key] = Slot(shard, used, used + n, s)
            used += n
        return slots, shard_names(shard + 1)

    # ---- context ---------------------------------------------------------------------------
    def __enter__(self) -> HFWriter:
        self.root = self._atomic.__enter__()
        try:
            for k, name in enumerate(self.names):
                self._open_shard(k, name)
        except BaseException:
            self._close()
            self._atomic.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self._finish()
            except BaseException:
                self._close()
                self._atomic.__exit__(*sys.exc_info())
                raise
        self._close()
        return self._atomic.__exit__(exc_type, exc, tb)

    @property
    def out(self) -> Path:
        return self._atomic.out

    def _open_shard(self, k: int, name: str) -> None:
        tag = ST_DTYPES[self.dtype]
        header = {"__metadata__": {"format": "pt"}}
        header.update({key: {"dtype": tag, "shape": list(s.shape), "data_offsets": [s.begin, s.end]}
                       for key, s in self.slots.items() if s.shard == k})
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        path = self.root / name
        self._atomic.current = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        self._fds.append(fd)
        size = max(s.end for s in self.slots.values() if s.shard == k)
        os.pwrite(fd, struct.pack("<Q", len(text)) + text, 0)
        os.ftruncate(fd, 8 + len(text) + size)
        self._data_start.append(8 + len(text))

    def _close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    # ---- parts -----------------------------------------------------------------------------
    def write_part(self, part: str, tensors: dict[str, torch.Tensor], layer: int | None = None) -> None:
        """Write one part ('embed', 'layer' with its index, 'final_norm', 'head') from its logical tensors."""
        if part == "layer":
            table, prefix = self.hf.layer, self.hf.layer_prefix.format(i=layer)
        else:
            table, prefix = self.hf.globals, ""
        used = {s for sources in table.values() for s in sources}
        for key, t in tensors.items():  # a tensor the architecture lacks (Qwen2's o bias) must be zero
            if key not in used and bool(t.any()):
                raise RuntimeError(f"{prefix}{key}: {self.hf.name} has no such tensor and it is not zero")
        for key, t in hf.hf_tensors(tensors, table, self.shape, self.hf).items():
            self._put(prefix + key, t)

    def write_layer(self, i: int, layer: dict[str, torch.Tensor]) -> None:
        if not 0 <= i < self.shape.num_layers:
            raise RuntimeError(f"layer {i} is outside the target's {self.shape.num_layers} layers")
        self.write_part("layer", layer, i)

    def _put(self, key: str, t: torch.Tensor) -> None:
        slot = self.slots.get(key)
        if slot is None:
            raise RuntimeError(f"{key} is not a tensor of the target model")
        if key in self._written:
            raise RuntimeError(f"{key} written twice")
        if tuple(t.shape) != slot.shape:
            raise RuntimeError(f"{key}: shape {tuple(t.shape)} does not match the target's {slot.shape}")
        data = t.detach().to(self.dtype).contiguous().reshape(-1).view(torch.uint8).numpy()
        assert data.nbytes == slot.end - slot.begin
        self._atomic.current = self.root / self.names[slot.shard]
        fd, offset, view = self._fds[slot.shard], self._data_start[slot.shard] + slot.begin, memoryview(data)
        while view.nbytes:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
        self._written.add(key)
        self.bytes_written += data.nbytes

    # ---- finish ----------------------------------------------------------------------------
    def _finish(self) -> None:
        missing = [k for k in self.slots if k not in self._written]
        if missing:
            raise RuntimeError(f"HF output incomplete: {len(missing)} tensors not written (first {missing[0]})")
        for fd in self._fds:
            os.fsync(fd)
        self._close()
        root = self.root
        if len(self.names) > 1:
            weight_map = {k: self.names[s.shard] for k, s in self.slots.items()}
            _dump(root / INDEX, {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})
        _dump(root / "config.json", self.config)
        gen = self.generation_config
        if gen is None:
            gen = {"bos_token_id": self.config.get("bos_token_id"), "eos_token_id": self.config.get("eos_token_id"),
                   "do_sample": False}
        _dump(root / "generation_config.json", gen)
        if self.tokenizer is not None:
            self.tokenizer.write(root)
        for name, text in self.extra_files.items():
            (root / name).write_text(text)


def _dump(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


@dataclass(frozen=True)
class CopiedFiles:
    """Files copied as they are into the output (a source HF directory's tokenizer files)."""

    files: tuple[Path, ...]

    def write(self, out: Path) -> None:
        for f in self.files:
            shutil.copyfile(f, Path(out) / f.name)
