"""Training engines for the family runner: a small interface and its two implementations.

An engine trains one stage from its stage YAML and returns the final checkpoint (the NeoX
`save` dir, whose `latest` names the last tag):

- `NeoXEngine` launches ``python DIR/deepy.py DIR/train.py stage.yml`` in a NeoX checkout,
  captures the log into the family dir, checks the exit status, and resumes an interrupted
  stage from its own latest checkpoint (a derived YAML with `load` = the stage's `save` and
  `finetune: false`, so NeoX restores the optimizer, LR schedule and data position).
- `BuiltinEngine` runs `neox_progressive.train` in this process (one CPU or GPU).

Other engines implement `Engine.train`.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import yaml

from neox_progressive.config import merge_neox_configs
from neox_progressive.errors import UserError


@dataclass
class TrainResult:
    checkpoint: Path
    """The stage's save dir (contains `latest`)."""
    metrics: Path | None = None
    """JSONL of logged training/validation metrics, when the engine writes one."""
    log: Path | None = None


class Engine(Protocol):
    name: str

    def command(self, stage_yaml: Path) -> str:
        """The command `--dry-run` prints for this stage."""

    def train(self, stage_yaml: Path, log_dir: Path, quiet: bool = False,
              callback: Callable[[dict], None] | None = None) -> TrainResult:
        """Train the stage to its `train_iters`, resuming from the stage's own checkpoint if any.

        `callback`, where the engine supports it, gets every metrics record as it is logged (the
        runner's live stage-start check); raising from it stops training."""


def stage_save_dir(stage_yaml: Path) -> Path:
    cfg = merge_neox_configs([stage_yaml])
    if not cfg.get("save"):
        raise UserError(f"{stage_yaml} has no `save` key; the runner needs each stage's checkpoint dir")
    return Path(cfg["save"])


def saved_iteration(save_dir: Path) -> int | None:
    """The iteration of the stage's latest checkpoint, or None if it has none."""
    latest = save_dir / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    digits = "".join(c for c in tag if c.isdigit())
    return int(digits) if digits else None


def resume_yaml(stage_yaml: Path, save_dir: Path) -> Path:
    """A copy of the stage YAML that continues from `save_dir` instead of the expanded init."""
    cfg = yaml.safe_load(stage_yaml.read_text())
    cfg["load"] = str(save_dir)
    cfg["finetune"] = False
    out = stage_yaml.with_name(stage_yaml.stem + ".resume.yml")
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


class NeoXEngine:
    """Train with GPT-NeoX itself (`deepy.py train.py`) in a subprocess."""

    name = "neox"

    def __init__(self, neox_dir: str | Path, python: str | None = None, launcher_args: list[str] | None = None,
                 env: dict[str, str] | None = None):
        self.neox_dir = Path(neox_dir).resolve()
        if not (self.neox_dir / "deepy.py").is_file():
            raise UserError(f"{self.neox_dir} is not a GPT-NeoX checkout (no deepy.py); pass --neox-dir")
        self.python = python or sys.executable
        self.launcher_args = launcher_args or []
        self.env = env or {}

    def _argv(self, stage_yaml: Path) -> list[str]:
        return [self.python, str(self.neox_dir / "deepy.py"), str(self.neox_dir / "train.py"),
                *self.launcher_args, str(Path(stage_yaml).resolve())]

    def command(self, stage_yaml: Path) -> str:
        return f"cd {shlex.quote(str(self.neox_dir))} && " + shlex.join(self._argv(stage_yaml))

    def train(self, stage_yaml: Path, log_dir: Path, quiet: bool = False,
              callback: Callable[[dict], None] | None = None) -> TrainResult:
        save = stage_save_dir(stage_yaml)
        it = saved_iteration(save)
        cfg = merge_neox_configs([stage_yaml])
        target = int(cfg.get("train_iters") or 0)
        run_yaml = stage_yaml
        log = log_dir / f"{Path(stage_yaml).stem}.neox.log"
        if it is not None and it >= target > 0:
            return TrainResult(save, log=log if log.is_file() else None)
        if it:  # interrupted earlier: continue from the stage's own checkpoint
            run_yaml = resume_yaml(stage_yaml, save)
        log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        with log.open("a") as fh:
            fh.write(f"\n# {self.command(run_yaml)}\n")
            fh.flush()
            proc = subprocess.Popen(self._argv(run_yaml), cwd=self.neox_dir, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
            try:
                self._follow(proc, fh, quiet, callback)
            except BaseException:
                _stop(proc)  # the callback stopped the stage (or Ctrl-C): NeoX and its workers go too
                raise
            code = proc.wait()
        if code != 0:
            raise UserError(f"NeoX training of {stage_yaml} failed with exit status {code}; see {log}")
        it = saved_iteration(save)
        if it is None:
            raise UserError(f"NeoX finished {stage_yaml} but {save}/latest does not exist; is `save` set and writable?")
        if target and it < target:
            raise UserError(f"NeoX stopped at iteration {it} of {target} for {stage_yaml}; see {log}")
        return TrainResult(save, log=log)


    @staticmethod
    def _follow(proc: subprocess.Popen, fh, quiet: bool, callback: Callable[[dict], None] | None) -> None:
        """Copy NeoX's output into the log; training lines go to `callback` as metrics records."""
        from neox_progressive.train.start_check import parse_neox_losses

        assert proc.stdout is not None
        for line in proc.stdout:
            if "--megatron_config" in line:  # deepy's base64 argv: megabytes of noise
                line = line[:200] + " ...\n"
            fh.write(line)
            if not quiet and ("iteration" in line or "error" in line.lower()):
                print(line.rstrip()[:300], file=sys.stderr)
            if callback is not None and "lm_loss" in line:
                for it, loss in parse_neox_losses(line):
                    fh.flush()
                    callback({"kind": "train", "iteration": it, "loss": loss})


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to NeoX's process group (deepy, the launcher, the workers), SIGKILL after 30 s."""
    import signal

    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class BuiltinEngine:
    """Train with the embedded single-device engine (`neox_progressive.train`)."""

    name = "builtin"

    def __init__(self, device: str | None = None):
        self.device = device

    def command(self, stage_yaml: Path) -> str:
        dev = f" --device {self.device}" if self.device else ""
        return f"(builtin engine{dev}) train {stage_yaml}"

    def train(self, stage_yaml: Path, log_dir: Path, quiet: bool = False,
              callback: Callable[[dict], None] | None = None) -> TrainResult:
        from neox_progressive.train import train_stage

        log_dir.mkdir(parents=True, exist_ok=True)
        res = train_stage([stage_yaml], device=self.device, quiet=quiet,
                          log_path=log_dir / f"{Path(stage_yaml).stem}.metrics.jsonl", callback=callback)
        if res.save_dir is None:
            raise UserError(f"{stage_yaml} has no `save` key; the runner needs each stage's checkpoint dir")
        return TrainResult(Path(res.save_dir), metrics=res.metrics_path)
