"""Golden output of the Llama-shape expansion: the sha256 of every tensor NeoX would load, per output file.

The digests were written from the code *before* the expansion became a registry of tensor roles
(issue 11, "Design"), and the refactor had to reproduce them bit for bit: a rule that divides where
it multiplied, gathers in another order or casts twice changes a digest. The source weights are made
here from per-key seeds (independent of any helper's key order), so a digest names the expansion
alone; the source's own digest is pinned too, so a change of torch's generator is told apart from a change of
the expansion. To re-pin after a deliberate change of the output, run this file with
`NEOX_PROGRESSIVE_GOLDEN_PRINT=1 pytest -s tests/test_expand_golden.py` and say why in the commit.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from tiny import write_yaml

from neox_progressive.config import ModelShape
from neox_progressive.expand import ExpandOptions, expand_checkpoint
from neox_progressive.io.safe import load_pt
from neox_progressive.io.writer import write_checkpoint
from neox_progressive.model import Transformer

SRC = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_size=48, padded_vocab_size=64,
           make_vocab_size_divisible_by=32, rms_norm_eps=1e-5, attn_bias=True, mlp_bias=True)
CASES = {
    # AKI (defaults), GQA G-fixed 4/2 -> 8/4, depth 2 -> 3 (b2b), TP 1 -> 2, pipeline -> pipeline
    "aki_gqa_tp2_pipe": (dict(tp=1, pp=1), dict(hidden_size=64, num_heads=8, num_kv_heads=4, ffn_size=72, num_layers=3,
                                                tp=2, pp=1), dict(method="aki", seed=3), torch.float32),
    # FPI (rms_comp exact), kv-fixed 4/2 -> 8/2, depth 2 -> 5 zero_out (interp), TP 2 -> 1, sequential -> sequential
    "fpi_kvfixed_seq": (dict(tp=2, pp=0), dict(hidden_size=64, num_heads=8, num_kv_heads=2, ffn_size=60, num_layers=5,
                                               tp=1, pp=0), dict(method="fpi", new_layer_init="zero_out",
                                                                 depth_rule="interp", seed=1), torch.float32),
    # AKI with both literal switches, balanced maps, MHA, bf16 (the 16-bit division path), sequential -> pipeline
    "aki_upper_bf16": (dict(num_kv_heads=4, tp=1, pp=0), dict(hidden_size=40, num_heads=5, num_kv_heads=5, ffn_size=50,
                                                              num_layers=4, tp=1, pp=1),
                       dict(method="aki", aki_second="upper", aki_hidden="upper", map_sampling="balanced",
                            rms_comp="exact", seed=5), torch.bfloat16),
    # FPI without compensation at a non-integer ratio, MHA 4 -> 6 heads, depth copy (cyclic), fp32, TP 1 -> 2 sequential
    "fpi_none_cyclic": (dict(num_kv_heads=4), dict(hidden_size=48, num_heads=6, num_kv_heads=6, ffn_size=48, num_layers=3,
                                                   tp=2, pp=0), dict(method="fpi", rms_comp="none", depth_rule="cyclic",
                                                                     seed=2), torch.float32),
}


def source_sd(shape: ModelShape, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random logical weights, one generator per key seeded from the key's name (order-independent)."""
    with torch.device("meta"):
        names = {k: tuple(v.shape) for k, v in Transformer(shape).state_dict().items()}
    out = {}
    for k, s in sorted(names.items()):
        g = torch.Generator().manual_seed(int(hashlib.sha256(k.encode()).hexdigest()[:8], 16))
        t = torch.randn(s, generator=g, dtype=torch.float64) * 0.3
        out[k] = (1 + t if k.endswith("norm.weight") else t).to(dtype)
    return out


def tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().contiguous()
    return hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode() + t.view(torch.uint8).numpy().tobytes()).hexdigest()


def tensors_of(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(tensors_of(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {}


def part_of(file: str, key: str) -> str:
    """A pipeline layer file is one part; a sequential mp_rank file has one part per `sequential.N`."""
    parts = key.split(".")
    return f"{file}:{parts[2]}" if parts[:2] == ["module", "sequential"] else file


def file_digests(ckpt: Path) -> dict[str, str]:
    """Output part -> sha256 over the sorted (key, dtype, shape, sha256 of the bytes) of every tensor in it."""
    lines: dict[str, str] = {}
    for f in sorted((ckpt / "global_step0").glob("*.pt")):
        for k, v in sorted(tensors_of(load_pt(f)).items()):
            part = part_of(f.name, k)
            lines[part] = lines.get(part, "") + f"{k}:{tensor_digest(v)}\n"
    return {part: hashlib.sha256(text.encode()).hexdigest()[:16] for part, text in lines.items()}


def expand_case(tmp: Path, name: str) -> tuple[str, dict[str, str]]:
    src_kw, dst_kw, opts, dtype = CASES[name]
    src = ModelShape(**(SRC | src_kw))
    dst = src.replace(**dst_kw, padded_vocab_size=None)
    sd = source_sd(src, dtype)
    src_digest = hashlib.sha256("".join(f"{k}:{tensor_digest(v)}\n" for k, v in sorted(sd.items())).encode()).hexdigest()
    write_checkpoint(tmp / "src", src, sd)
    out = tmp / "out"
    expand_checkpoint(tmp / "src", [write_yaml(tmp / "src.yml", src)], [write_yaml(tmp / "dst.yml", dst)], out,
                      ExpandOptions(**opts), quiet=True, stage="golden")
    return src_digest[:16], file_digests(out)


# name -> (digest of the source weights, {output file: digest of its tensors}), written by the pre-registry code
GOLDEN: dict[str, tuple[str, dict[str, str]]] = {
    "aki_gqa_tp2_pipe": ("6c4d032889a868ff", {
        "layer_00-model_00-model_states.pt": "e7e8f79e3649e292",
        "layer_00-model_01-model_states.pt": "6697d9b1a6ded90d",
        "layer_02-model_00-model_states.pt": "c8179fb2de443fe7",
        "layer_02-model_01-model_states.pt": "7faed95c25b5ee9f",
        "layer_03-model_00-model_states.pt": "d65c223e177a3782",
        "layer_03-model_01-model_states.pt": "b8cc9a21fc0ca434",
        "layer_04-model_00-model_states.pt": "d65c223e177a3782",
        "layer_04-model_01-model_states.pt": "b8cc9a21fc0ca434",
        "layer_06-model_00-model_states.pt": "e58d60e68f529f62",
        "layer_06-model_01-model_states.pt": "e58d60e68f529f62",
        "layer_07-model_00-model_states.pt": "7440f509f097b8bf",
        "layer_07-model_01-model_states.pt": "9ac3643dfb26d992",
    }),
    "fpi_kvfixed_seq": ("6c4d032889a868ff", {
        "mp_rank_00_model_states.pt:0": "6ad372e7dd3c5aa7", "mp_rank_00_model_states.pt:2": "ffdfefb023724e5d",
        "mp_rank_00_model_states.pt:3": "e0dbdcc0f2026af2", "mp_rank_00_model_states.pt:4": "e6c5a5e37b9a24f2",
        "mp_rank_00_model_states.pt:5": "24ab101928fe3dd7", "mp_rank_00_model_states.pt:6": "6e0ccc0e2d48297a",
        "mp_rank_00_model_states.pt:8": "187d2a91e875e184", "mp_rank_00_model_states.pt:9": "09a4084c5b595e7f",
    }),
    "aki_upper_bf16": ("5e7eb91055eaf6e0", {
        "layer_00-model_00-model_states.pt": "ad790a0eec145d02",
        "layer_02-model_00-model_states.pt": "00ff0625421ef6c3",
        "layer_03-model_00-model_states.pt": "a3726ab7f63c4cef",
        "layer_04-model_00-model_states.pt": "00ff0625421ef6c3",
        "layer_05-model_00-model_states.pt": "a3726ab7f63c4cef",
        "layer_07-model_00-model_states.pt": "2987068025d89b85",
        "layer_08-model_00-model_states.pt": "6b68f3f6bb1fe609",
    }),
    "fpi_none_cyclic": ("7d1aa504b2975012", {
        "mp_rank_00_model_states.pt:0": "091c387351b71cdb", "mp_rank_00_model_states.pt:2": "94014be98bbd7f8a",
        "mp_rank_00_model_states.pt:3": "b9bee4a784626d7d", "mp_rank_00_model_states.pt:4": "9e997ad3eeb0f52e",
        "mp_rank_00_model_states.pt:6": "c194f96e854631f0", "mp_rank_00_model_states.pt:7": "daa04096ea11ffbc",
        "mp_rank_01_model_states.pt:0": "9a08cbdeb9bb3ffb", "mp_rank_01_model_states.pt:2": "f5028e3f33b3ce68",
        "mp_rank_01_model_states.pt:3": "3f070e994dc7c40b", "mp_rank_01_model_states.pt:4": "03634bede8b4584c",
        "mp_rank_01_model_states.pt:6": "c194f96e854631f0", "mp_rank_01_model_states.pt:7": "a9eac74a4e743ab1",
    }),
}


@pytest.mark.parametrize("name", list(CASES))
def test_llama_expansion_is_bit_identical_to_the_golden_digests(tmp_path, name):
    src_digest, got = expand_case(tmp_path, name)
    if os.environ.get("NEOX_PROGRESSIVE_GOLDEN_PRINT"):
        print(f"\n    {name!r}: ({src_digest!r}, {got!r}),")
        return
    want_src, want = GOLDEN[name]
    assert src_digest == want_src, "the source weights changed (torch's generator?): the digests cannot be compared"
    assert got.keys() == want.keys()
    bad = [f for f in want if got[f] != want[f]]
    assert not bad, f"{name}: output files differ from the golden expansion: {bad}"
