"""Run real GPT-NeoX on CPU in a subprocess (tests marked `neox`; NEOX_DIR must point at a checkout).

Uses the CPU shim of ../shared/neox_cpu (or $NEOX_CPU_SHIM_DIR): NEOX_CPU_SHIM=1, DS_ACCELERATOR=cpu,
NeoX's own virtualenv python ($NEOX_PYTHON, default: the python beside NEOX_DIR's venv, else
`python3`). NeoX must run with its checkout as the working directory.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

# Keys every CPU run of NeoX needs (../shared/neox_cpu/README.md).
CPU_KEYS = {
    "global_num_gpus": 1, "distributed_backend": "gloo", "precision": "fp32",
    "scaled_upper_triang_masked_softmax_fusion": False, "bias_gelu_fusion": False, "rope_fusion": False,
    "layernorm_fusion": False, "use_wandb": False,
}


def family_cpu_keys() -> dict:
    """CPU_KEYS for a family file's `shared` block: without the keys the planner writes into every stage itself
    (precision, use_wandb, the architecture keys such as bias_gelu_fusion)."""
    from neox_progressive.family.stages import OWNED, SHAPE_KEYS

    return {k: v for k, v in CPU_KEYS.items()
            if k not in ("precision", "use_wandb") and k not in OWNED and k not in SHAPE_KEYS}


def neox_dir() -> Path:
    return Path(os.environ["NEOX_DIR"])


def neox_python() -> str:
    if os.environ.get("NEOX_PYTHON"):
        return os.environ["NEOX_PYTHON"]
    for cand in (neox_dir().parent / "neox_venv" / "bin" / "python", neox_dir() / ".venv" / "bin" / "python"):
        if cand.exists():
            return str(cand)
    return "python3"


def shim_dir() -> Path:
    if os.environ.get("NEOX_CPU_SHIM_DIR"):
        return Path(os.environ["NEOX_CPU_SHIM_DIR"])
    for parent in Path(__file__).resolve().parents[1:]:  # ../shared/neox_cpu beside the checkout (or higher)
        if (parent / "shared" / "neox_cpu" / "sitecustomize.py").is_file():
            return parent / "shared" / "neox_cpu"
    raise RuntimeError("cannot find shared/neox_cpu; set NEOX_CPU_SHIM_DIR")


def run_neox(script: str, *configs: str | Path, timeout: int = 600, log: Path | None = None) -> str:
    """`python deepy.py <script> <configs>` in NEOX_DIR; returns the log; raises with its tail on failure."""
    py = neox_python()
    env = dict(os.environ)
    env.update(NEOX_CPU_SHIM="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(shim_dir()),
               TORCH_EXTENSIONS_DIR=str(Path(py).parent.parent / "ext"), WANDB_MODE="offline",
               PATH=f"{Path(py).parent}{os.pathsep}{env.get('PATH', '')}")
    proc = subprocess.run([py, "deepy.py", script, *map(str, configs)], cwd=neox_dir(), env=env,
                          capture_output=True, text=True, timeout=timeout)
    out = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if "--megatron_config" not in line)
    if log is not None:
        log.write_text(out)
    if proc.returncode != 0:
        raise RuntimeError(f"NeoX {script} failed ({proc.returncode}):\n" + "\n".join(out.splitlines()[-40:]))
    return out
