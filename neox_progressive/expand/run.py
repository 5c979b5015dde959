"""The streaming executor: read a NeoX checkpoint, write its expansion, one layer at a time.

It follows the plan's tensor list (plan.py): each target tensor is `rules.RULES[op.rule]` applied to
its source keys with its maps. Width first, then depth (bert2BERT Algorithm 1): the target layers
that copy source layer l are built together, each distinct (rule, sources, maps) computed once (AKI
reads l and l+1), and written to every target position whose depth order names it. The writer
takes layers in any order, so b2b's revisits of earlier layers need neither a cache nor a
recomputation. Memory: the source layers l and l+1, the widened layer and the writer's per-rank
copies; the embedding and head are widened in row chunks. Output: TP degree and format of the target config,
written atomically (nothing at `out` until `latest` is in place), with `expansion.json` and the
maps (`expansion_maps.npz`) inside `out`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import shlex
import sys
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from neox_progressive import __version__, arch
from neox_progressive.config import ModelShape
from neox_progressive.errors import UserError
from neox_progressive.expand import rules
from neox_progressive.expand.options import DEFAULT_OPTIONS, ExpandOptions
from neox_progressive.expand.plan import ExpansionPlan, TensorOp, plan_expansion
from neox_progressive.io import finite
from neox_progressive.io.reader import CheckpointReader
from neox_progressive.io.writer import CheckpointWriter, check_destination

MANIFEST = "expansion.json"
MAPS_FILE = "expansion_maps.npz"


def _paths(configs: str | Path | Sequence[str | Path]) -> list[Path]:
    return [Path(configs)] if isinstance(configs, (str, Path)) else [Path(c) for c in configs]


def load_shapes(src_configs, dst_configs) -> tuple[ModelShape, ModelShape]:
    return ModelShape.from_yamls(_paths(src_configs)), ModelShape.from_yamls(_paths(dst_configs))


def plan_for(src, src_configs, dst_configs, options: ExpandOptions = DEFAULT_OPTIONS, stage: str = "",
             ) -> tuple[ExpansionPlan, CheckpointReader | None]:
    """The plan, from the source checkpoint's metadata when it exists (vocab rows, dtype), else from the configs."""
    src_shape, dst_shape = load_shapes(src_configs, dst_configs)
    reader = None
    dtype = None
    if src is not None and Path(src).exists():
        reader = CheckpointReader(src, src_shape)
        src_shape = reader.shape
        raw = reader.file_state(arch.embed_index())[0][arch.EMBED_KEY]  # memory-mapped: only the header is read
        dtype = str(raw.dtype).replace("torch.", "")
    return plan_expansion(src_shape, dst_shape, options, stage, dtype=dtype), reader


class _MapCache:
    """The plan's maps as torch units (built once each), and the Maps of a TensorOp."""

    def __init__(self, plan: ExpansionPlan):
        self.plan = plan
        self.arrays = plan.maps_arrays()
        self.alpha = torch.from_numpy(plan.alpha())
        self.units: dict[str, rules.Unit] = {}

    def unit(self, name: str) -> rules.Unit:
        if name not in self.units:
            s = self.plan.src
            n = {"hidden": s.hidden_size, "heads": s.num_heads, "kv_heads": s.num_kv_heads, "ffn": s.ffn_size}
            self.units[name] = rules.Unit.of(self.arrays[name], n[name.rsplit(".", 1)[-1]])
        return self.units[name]

    def maps(self, op: TensorOp) -> rules.Maps:
        units = op.units
        block = self.plan.src.head_dim if units and units.endswith("heads") else 1
        rows = op.shape[0] if op.rule in ("embedding", "position_embedding", "head") else None
        return rules.Maps(self.unit("hidden"), self.alpha, units and self.unit(units), block, rows)


def _embed(reader: CheckpointReader) -> torch.Tensor:
    """The source embedding; at TP 1 the memory-mapped tensor itself (no copy of V x h)."""
    if hasattr(reader, "file_state") and reader.tp == 1:
        t = reader.file_state(arch.embed_index())[0][arch.EMBED_KEY]
        if tuple(t.shape) == (reader.shape.padded_vocab_size, reader.shape.hidden_size):
            return t
    return reader.embed()


def _maps_npz(plan: ExpansionPlan) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **plan.maps_arrays())
    return buf.getvalue()


def expand_checkpoint(src, src_configs, dst_configs, out, options: ExpandOptions = DEFAULT_OPTIONS, *,
                      force: bool = False, quiet: bool = False, stage: str = "", allow_nonfinite: bool = False) -> dict:
    """Expand the NeoX checkpoint `src` (save dir or global_stepN dir) into `out`; return the expansion.json record.

    Every check runs before anything is written (UserError on bad input). `out` gets the target
    TP degree and format of `dst_configs`, `finetune: true`-loadable (NEOX_FACTS section 5).
    """
    if src is None or not Path(src).exists():
        raise UserError(f"source checkpoint {str(src)!r} does not exist; pass --src the NeoX save dir or a global_stepN dir")
    plan, reader = plan_for(src, src_configs, dst_configs, options, stage)
    out = Path(out)
    if out.resolve() == Path(src).resolve() or Path(src).resolve() in out.resolve().parents:
        raise UserError(f"--out {out} is (inside) the source checkpoint {src}; write the expansion elsewhere")
    check_destination(out, force)
    record = _record(plan, reader, src, src_configs, dst_configs)
    with ThreadPoolExecutor(1) as pool:  # hashing the source overlaps the expansion (hashlib releases the GIL)
        pending = {"source_sha256": pool.submit(reader.sha256)}
        run_plan(plan, reader, out, force=force, quiet=quiet, record=record, pending=pending, configs=_paths(dst_configs),
                 allow_nonfinite=allow_nonfinite)
    return record


def _record(plan: ExpansionPlan, reader: CheckpointReader, src, src_configs, dst_configs) -> dict:
    rec = {"format": "neox-progressive-expansion/1", "plugin_version": __version__,
           "command_line": shlex.join(sys.argv), "source_checkpoint": str(Path(src).resolve()),
           "source_tag": getattr(reader, "tag", None), "source_iteration": getattr(reader, "iteration", None),
           "source_configs": [str(p) for p in _paths(src_configs)], "target_configs": [str(p) for p in _paths(dst_configs)],
           "source_sha256": None}
    rec.update(plan.summary())
    npz = _maps_npz(plan)
    rec["maps_file"] = MAPS_FILE
    rec["maps_sha256"] = hashlib.sha256(npz).hexdigest()
    return rec


class _Saver:
    """At most one save in flight on a worker thread (torch.save and the file writes release the GIL)."""

    def __init__(self, pool: ThreadPoolExecutor):
        self.pool = pool
        self.job: Future | None = None

    def __call__(self, fn, *args) -> None:
        self.wait()
        self.job = self.pool.submit(fn, *args)

    def wait(self) -> None:
        if self.job is not None:
            job, self.job = self.job, None
            job.result()


def run_plan(plan: ExpansionPlan, reader: CheckpointReader, out: str | Path, *, force: bool = False, quiet: bool = False,
             record: dict | None = None, pending: dict[str, Future] | None = None,
             configs: Sequence[str | Path] | None = None, allow_nonfinite: bool = False, writer=None) -> Path:
    """Execute a plan against an open reader; writes `out` atomically.

    `record` (the expansion.json content) is completed with the results of `pending` at the end. `writer`: an
    unopened writer with CheckpointWriter's interface (`io.hf_writer.HFWriter` for HF output); default a NeoX
    CheckpointWriter for `plan.dst`. An HF reader checks NaN/Inf itself (`HFReader(allow_nonfinite=...)`).
    """
    from neox_progressive.progress import progress_bar

    dst = plan.dst
    if hasattr(reader, "file_state"):  # a NeoX reader (an HF reader checks its tensors itself)
        reader = finite.guard(reader, allow_nonfinite, plan.dtype)  # NaN/Inf (unless --allow-nonfinite), mixed dtypes
    bar = progress_bar(total=plan.total_bytes, unit="B", unit_scale=True, desc="expand", quiet=quiet)
    if writer is None:
        writer = CheckpointWriter(out, dst, force=force, configs=configs, need_bytes=plan.total_bytes)
    with bar, writer as w, ThreadPoolExecutor(1) as pool:
        save = _Saver(pool)  # the next part is computed while the previous one is saved

        def write_part(write, tensor, index):
            write(tensor)
            bar.update(plan.file_bytes[index])

        def write_targets(layers: list[tuple[int, dict[str, torch.Tensor]]]) -> None:
            for t, layer in layers:
                w.write_layer(t, layer)
                bar.update(plan.file_bytes[arch.layer_index(t)])

        apply = _Apply(plan, reader)
        model = plan.model_ops()

        def write_model_part(part: str) -> None:
            tensors = {key: apply(model[key]) for key in arch.logical_part_keys(part, dst)}
            save(write_part, lambda ts: w.write_part(part, ts), tensors, arch.part_index(part, dst))

        write_model_part("embed")
        for layer in range(plan.src.num_layers):
            apply.need_layers(layer)
            _release_free_memory()
            memo: dict[tuple, torch.Tensor] = {}
            targets = []
            for t in plan.targets_of(layer):
                ops = plan.layer_ops(t)
                for op in ops:
                    if op.compute not in memo:
                        memo[op.compute] = apply(op)
                targets.append((t, {op.key.split(".", 2)[2]: memo[op.compute] for op in ops}))
            save(write_targets, targets)
            del memo, targets
        apply.need_layers(None)
        write_model_part("final_norm")
        write_model_part("head")
        save.wait()
        if w.root is not None:
            (w.root / MAPS_FILE).write_bytes(_maps_npz(plan))
        if record is not None:
            record.update({key: fut.result() for key, fut in (pending or {}).items()})
            w.extra_files[MANIFEST] = json.dumps(record, indent=1, default=str) + "\n"
    return Path(out)


class _Apply:
    """Computes a TensorOp: reads its source tensors (source layers held only while the plan needs them)."""

    def __init__(self, plan: ExpansionPlan, reader: CheckpointReader):
        self.reader = reader
        self.maps = _MapCache(plan)
        self.opt = rules.RuleOptions(plan.options.aki_second, plan.options.aki_hidden, getattr(torch, plan.dtype))
        self.layers: dict[int, dict[str, torch.Tensor]] = {}
        self.plan = plan

    def need_layers(self, first: int | None) -> None:
        """Drop the source layers below `first` (None: all of them)."""
        for i in [i for i in self.layers if first is None or i < first]:
            del self.layers[i]

    def source(self, key: str) -> torch.Tensor:
        if key.startswith("layers."):
            _, i, rest = key.split(".", 2)
            if int(i) not in self.layers:
                self.layers[int(i)] = self.reader.layer(int(i))
            return self.layers[int(i)][rest]
        return _model_tensor(self.reader, key)

    def __call__(self, op: TensorOp) -> torch.Tensor:
        src = rules.Sources(*(self.source(k) for k in op.sources))
        return rules.RULES[op.rule](src, self.maps.maps(op), self.opt)


def _release_free_memory() -> None:
    """Hand the allocator's free pages back to the OS (glibc `malloc_trim`; elsewhere nothing).

    glibc raises its mmap threshold after large frees, so later medium-size tensors come from its
    heaps, which fragment over a long run: peak RSS crept up by ~6 MB per layer in the 1B -> 2B
    benchmark (0.1 GiB over 18 layers; bench/expand_speed.md). Trimming once per source layer keeps
    the peak at the working set (two source layers, two widened layers).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _model_tensor(reader: CheckpointReader, key: str) -> torch.Tensor:
    """A model-level source tensor; the embedding memory-mapped where it can be (TP 1)."""
    if key == "embed.weight":
        return _embed(reader)
    part = "embed" if key == "pos_embed.weight" else key.split(".")[0]  # final_norm, head
    return reader.part(part)[key]


def load_maps(out: str | Path) -> dict[str, np.ndarray]:
    """The maps sidecar of an expanded checkpoint."""
    with np.load(Path(out) / MAPS_FILE) as z:
        return {k: z[k] for k in z.files}
