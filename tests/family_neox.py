"""Load NeoX YAML files with NeoX's own NeoXArgs.from_ymls, in NeoX's virtualenv (tests marked `neox`)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from neox_run import neox_dir, neox_python

# Runs inside NeoX's environment: one NeoXArgs.from_ymls per case, reports what NeoX derived or why it failed.
PROBE = r"""
import json, sys, contextlib, io
from megatron.neox_arguments import NeoXArgs
out = []
for paths in json.loads(sys.argv[1]):
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            a = NeoXArgs.from_ymls(paths)
        out.append({"ok": True, "train_batch_size": a.train_batch_size, "gradient_accumulation_steps":
                    a.gradient_accumulation_steps, "train_micro_batch_size_per_gpu": a.train_micro_batch_size_per_gpu,
                    "train_iters": a.train_iters, "lr_decay_iters": a.lr_decay_iters, "lr": a.lr, "min_lr": a.min_lr,
                    "precision": a.precision, "finetune": a.finetune, "load": a.load, "save": a.save,
                    "intermediate_size": a.intermediate_size, "num_kv_heads": a.num_kv_heads, "use_wandb": a.use_wandb,
                    "train_data_paths": a.train_data_paths, "warmup": a.warmup, "dp": a.global_num_gpus,
                    "norm": a.norm, "activation": a.activation, "gpt_j_residual": a.gpt_j_residual,
                    "bias_gelu_fusion": a.bias_gelu_fusion, "rotary_pct": a.rotary_pct, "pos_emb": a.pos_emb,
                    "layernorm_epsilon": a.layernorm_epsilon, "rms_norm_epsilon": a.rms_norm_epsilon,
                    "use_bias_in_mlp": a.use_bias_in_mlp, "use_bias_in_attn_linear": a.use_bias_in_attn_linear})
    except BaseException as exc:  # NeoX raises ValueError/TypeError/AssertionError, or exits
        out.append({"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500], "log": buf.getvalue()[-1500:]})
open(sys.argv[2], "w").write(json.dumps(out))
"""


def neox_load(cases: list[list[str | Path]], timeout: int = 300) -> list[dict]:
    """NeoXArgs.from_ymls(paths) for every case (a list of YAML paths), in one NeoX subprocess."""
    env = dict(os.environ)
    env.update(PYTHONPATH=str(neox_dir()), WANDB_MODE="disabled")
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        proc = subprocess.run([neox_python(), "-c", PROBE, json.dumps([[str(p) for p in c] for c in cases]), str(result)],
                              cwd=neox_dir(), env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not result.is_file():
            raise RuntimeError(f"NeoX probe failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return json.loads(result.read_text())


def mock_config(tmp: Path, gpus: int) -> Path:
    """NeoX's configs/cpu_mock_config.yml as is for one GPU; for N GPUs the same mock saying N."""
    if gpus == 1:
        return neox_dir() / "configs" / "cpu_mock_config.yml"
    path = Path(tmp) / f"mock_{gpus}_gpus" / "cpu_mock_config.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{{\"global_num_gpus\": {gpus}}}\n")
    return path


FIELDS_PROBE = r"""
import json, sys, typing
from megatron.neox_arguments import NeoXArgs
out = {}
for name, f in NeoXArgs.__dataclass_fields__.items():
    t = f.type
    origin = getattr(t, "__origin__", None)
    if origin is typing.Literal:
        kind = {"kind": "literal", "choices": list(t.__args__)}
    elif origin is typing.Union:
        kind = {"kind": "union", "members": [getattr(a, "__name__", str(a)) for a in t.__args__]}
    elif t is typing.Any:
        kind = {"kind": "any"}
    else:
        kind = {"kind": getattr(t, "__name__", str(t))}
    default = f.default
    try:
        json.dumps(default)
    except TypeError:
        default = repr(default)
    out[name] = {"type": kind, "default": default}
open(sys.argv[1], "w").write(json.dumps(out))
"""


def neox_fields(timeout: int = 300) -> dict:
    """{name: {"type", "default"}} of NeoX's own NeoXArgs dataclass, read in NeoX's environment."""
    env = dict(os.environ)
    env.update(PYTHONPATH=str(neox_dir()), WANDB_MODE="disabled")
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "fields.json"
        proc = subprocess.run([neox_python(), "-c", FIELDS_PROBE, str(result)], cwd=neox_dir(), env=env,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not result.is_file():
            raise RuntimeError(f"NeoX fields probe failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(result.read_text())
