"""`neox-progressive run`: train a whole family, stage after stage, resumably.

For each mode (progressive, independent) the runner writes the stage configs, cuts each member's
data window, and then for every member in order:

1. `expand` (progressive, member k > 1): grow member k-1's final checkpoint into member k's
   `load` dir with the family's expansion options (bert2BERT AKI by default);
2. `train`: the engine trains the stage YAML (NeoX in a subprocess, or the builtin engine);
3. `start-check` (progressive, k > 1, during `train`): the expanded checkpoint's held-out loss,
   computed with the reference model before training, against the first logged training losses,
   read as the engine logs them: a stage that starts like a random initialization is stopped at
   once (see `neox_progressive.train.start_check`).

`--mode both` (`family_runs`): the first member is the same model in both families (Eq. 4 gives it
its scratch budget; the same window of the same dataset, schedule and seed; `same_first_member`
checks the two stage configs), so the independent run does not train it again: its step records the
progressive checkpoint (`reused_from: progressive`, with that checkpoint's digest as input, so a
retrained progressive member is taken again). With the fixed-data epoch order and NeoX, the stage
is stopped at its first logged loss unless NeoX's log shows it loaded the index maps written beside
the window (see neox_progressive.data.sample_order).

A first member with `init: {hf: DIR}` is imported (`import-hf` with its stage config) instead of
trained: as its checkpoint (`<name>/train`), or with `train: true` as the start it trains from
(`<name>/import`, then `<name>/train` with the stage-start check on the import).

Then `eval` scores every trained member (perplexity, adjacent-pair KL, speculative decoding, the
family file's lm-eval tasks) into `<output_dir>/report/`.

Resuming: `<output_dir>/<mode>/state.json` (`RunState`) records each finished step with the
digests of its inputs and outputs. A step is skipped only if its outputs are unchanged and its
inputs are the same as when it ran; anything else is redone, and everything after it with it
(their inputs changed). An interrupted training stage continues from its own latest checkpoint
(the builtin engine resumes exactly; NeoX restores optimizer and data position), unless its
inputs changed, in which case its partial checkpoints are discarded first.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neox_progressive.errors import CheckFailed, UserError
from neox_progressive.family.spec import MODES
from neox_progressive.runner.engines import Engine, TrainResult, stage_save_dir
from neox_progressive.runner.state import RunState, config_digest, digest, inputs_match, raw_digest


@dataclass
class Step:
    """One unit of work: skipped when the state file says it is done with the same inputs."""

    name: str
    describe: str
    inputs: Callable[[], dict[str, Any]]
    """Digests of what the step reads; computed once per run of the step."""
    action: Callable[[dict[str, Any]], dict[str, Any]]
    """Does the work, given the inputs; returns the info to record."""
    outputs: list[Path] = field(default_factory=list)
    command: str = ""
    configs: dict[str, Path] = field(default_factory=dict)
    """Input key -> the stage YAML it digests (for records of earlier versions, see `state.inputs_match`)."""


def stage_yaml_of(family, mode: str, member: str) -> Path:
    """Where the runner writes a member's stage config: `<output_dir>/<mode>/configs/stage_<member>.yml`."""
    return Path(family.output_dir) / mode / "configs" / f"stage_{member}.yml"


def _log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


class FamilyRun:
    """Plans and runs the steps of one family in one mode (see the module docstring)."""

    def __init__(self, family, mode: str, engine: Engine, *, quiet: bool = False, device: str | None = None,
                 reuse_first: FamilyRun | None = None):
        """`reuse_first`: the progressive run of the same family (run --mode both). The first member is then the same
        model in both families (same budget, data window and schedule; checked on the stage configs), so this
        independent run takes its checkpoint instead of training it again."""
        if mode not in MODES:
            raise UserError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
        from neox_progressive.family import plan_family

        self.family, self.mode, self.engine, self.quiet, self.device = family, mode, engine, quiet, device
        self.plan = plan_family(family, mode)
        self.root = Path(family.output_dir) / mode
        self.configs_dir = self.root / "configs"
        self.state = RunState(self.root / "state.json")
        self.results: dict[str, dict[str, Any]] = {}
        self._planned: dict[Path, str] | None = None
        """The stage YAML texts a dry run would write: its digests are of these, as the run's will be."""
        self.reuse = reuse_first if mode == "independent" and reuse_first and same_first_member(family) else None
        if mode == "progressive":  # every expansion planned from the shapes, before the first member trains
            from neox_progressive.family.stages import check_expansions

            check_expansions(family)

    # ---- paths --------------------------------------------------------------------------------------
    def dirs(self, member: str):
        from neox_progressive.family import member_dirs

        return member_dirs(self.family, self.mode, member)

    def stage_yaml(self, member: str) -> Path:
        """The member's stage config (a reused first member: the progressive one it was trained with)."""
        if self.reused(member):
            return self.reuse.stage_yaml(member)
        return stage_yaml_of(self.family, self.mode, member)

    def reused(self, member: str) -> bool:
        return self.reuse is not None and member == self.names[0]

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.family.members]

    # ---- the steps ----------------------------------------------------------------------------------
    def prepare(self) -> list[Path]:
        """Write the stage configs and cut the members' data windows (cheap, idempotent; every run).
        Missing data is refused before anything is written."""
        from neox_progressive.family import generate_configs

        self.check_data()
        written = generate_configs(self.family, self.configs_dir, self.mode)
        self._cut_windows()
        return written

    def check_data(self) -> None:
        from neox_progressive.data import dataset_exists

        for what, src in (("training", self.family.data.train), ("validation", self.family.data.valid)):
            if src and not dataset_exists(src):
                raise UserError(f"the family's {what} data {src}.bin/.idx does not exist; make it with "
                                f"`neox-progressive prepare-data --family {self.family.path}` (see its `data` block)")

    def _cut_windows(self) -> None:
        from neox_progressive.data import cut_member_windows

        cut_member_windows(self.family.data.train, self.plan.to_dict()["rows"])

    def _config_text(self, path: Path) -> str | None:
        if self._planned is not None and path in self._planned:
            return self._planned[path]
        return path.read_text() if path.is_file() else None

    def config_digest(self, path: Path) -> str | None:
        """The content digest of a stage YAML (a comment, such as the family file's name, does not count)."""
        return config_digest(self._config_text(path))

    def steps(self) -> Iterator[Step]:
        names = self.names
        for k, name in enumerate(names):
            prev = names[k - 1] if k else None
            if self.mode == "progressive" and prev is not None:
                yield self._expand_step(prev, name)
            if self.reused(name):
                yield self._reuse_step(name)
            elif k == 0 and self.family.members[0].init_hf:
                yield self._import_step(name)
                if self.family.members[0].init_train:
                    yield self._train_step(name, expanded=True)
            else:
                yield self._train_step(name, expanded=self.mode == "progressive" and prev is not None)

    def _reuse_step(self, name: str) -> Step:
        """The independent family's first member is the progressive one's: record its checkpoint, train nothing."""
        src, yml = self.reuse, self.reuse.stage_yaml(name)

        def inputs() -> dict[str, Any]:
            return {"reuse": "progressive", "config": digest(yml), "checkpoint": digest(stage_save_dir(yml))
                    if yml.exists() else None}

        def action(_inputs: dict[str, Any]) -> dict[str, Any]:
            info = src.results.get(f"{name}/train") or src.state.info(f"{name}/train")
            if not info.get("checkpoint"):
                raise UserError(f"the progressive family's {name} is not trained yet, so the independent family cannot "
                                "reuse it; run with --mode both (progressive first)")
            keep = {k: v for k, v in info.items() if k not in ("inputs", "seconds", "start_check", "expanded_loss")}
            return {**keep, "reused_from": "progressive"}

        return Step(f"{name}/train", f"reuse progressive {name} (the same model: same budget, data and schedule; trained "
                    "once)", inputs, action, [stage_save_dir(yml)] if yml.exists() else [], "")

    def _import_step(self, name: str) -> Step:
        """The first member from a Hugging Face model (`init: {hf: DIR}`): imported as its stage's checkpoint (the
        step `<name>/train`, nothing trained), or with `train: true` as the start it trains from (`<name>/import`)."""
        from neox_progressive.hf_import import import_hf

        member, yml = self.family.member(name), self.stage_yaml(name)
        out = self.dirs(name).expanded if member.init_train else self.dirs(name).checkpoints

        def inputs() -> dict[str, Any]:
            return {"hf": digest(member.init_hf), "config": self.config_digest(yml)}

        def action(_inputs: dict[str, Any]) -> dict[str, Any]:
            rec = import_hf(member.init_hf, out, [yml], force=True)
            return {"checkpoint": str(out), "imported_from": member.init_hf, "notes": rec["notes"]}

        step = f"{name}/import" if member.init_train else f"{name}/train"
        what = "the start of its training" if member.init_train else "its checkpoint (not trained)"
        return Step(step, f"import {member.init_hf} as {name}: {what}", inputs, action, [out],
                    f"neox-progressive import-hf {member.init_hf} --config {yml} --out {out}", {"config": yml})

    def _expand_step(self, prev: str, name: str) -> Step:
        from neox_progressive.expand import ExpandOptions, expand_checkpoint

        src = self.dirs(prev).checkpoints
        out = self.dirs(name).expanded
        options = ExpandOptions.from_dict(dict(getattr(self.family, "expansion", None) or {}))

        def inputs() -> dict[str, Any]:
            return {"source": digest(src), "src_config": self.config_digest(self.stage_yaml(prev)),
                    "dst_config": self.config_digest(self.stage_yaml(name)), "options": repr(options)}

        def action(_inputs: dict[str, Any]) -> dict[str, Any]:
            record = expand_checkpoint(src, [self.stage_yaml(prev)], [self.stage_yaml(name)], out, options,
                                       force=True, quiet=self.quiet, stage=f"{prev}->{name}")
            return {"expansion": {k: record.get(k) for k in ("method", "options") if k in record}}

        cmd = (f"neox-progressive expand --src {src} --src-config {self.stage_yaml(prev)} "
               f"--dst-config {self.stage_yaml(name)} --out {out}")
        return Step(f"{name}/expand", f"expand {prev} -> {name}", inputs, action, [out], cmd,
                    {"src_config": self.stage_yaml(prev), "dst_config": self.stage_yaml(name)})

    def _train_step(self, name: str, expanded: bool) -> Step:
        yml = self.stage_yaml(name)
        expanded_dir = self.dirs(name).expanded if expanded else None

        def inputs() -> dict[str, Any]:
            return {"config": self.config_digest(yml), "init": digest(expanded_dir) if expanded_dir else "scratch"}

        def action(inputs: dict[str, Any]) -> dict[str, Any]:
            return self._train(name, yml, expanded_dir, inputs)

        start = ("from the imported " if name == self.names[0] else "from the expanded ") + name
        return Step(f"{name}/train", f"train {name} ({start if expanded else 'from scratch'})",
                    inputs, action, [stage_save_dir(yml)] if yml.exists() else [], self.engine.command(yml), {"config": yml})

    # ---- training with the stage-start check --------------------------------------------------------
    def _train(self, name: str, yml: Path, expanded_dir: Path | None, inputs: dict[str, Any]) -> dict[str, Any]:
        save = stage_save_dir(yml)
        marker = self.dirs(name).root / "train_inputs.json"
        same = marker.is_file() and inputs_match(json.loads(marker.read_text()), inputs, {"config": self._legacy(yml)})
        if save.exists() and not same:
            _log(f"{name}: discarding the partial checkpoints in {save} (made from other inputs)", self.quiet)
            shutil.rmtree(save)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(inputs, indent=1, sort_keys=True))
        info: dict[str, Any] = {}
        check = None
        if expanded_dir is not None:
            check = self._start_check(name, yml, expanded_dir)
            info["expanded_loss"] = check.expanded
        guard = self._order_guard(name, yml)
        seen: list[dict] = []

        def callback(record: dict) -> None:
            if guard is not None and not seen:
                guard()  # NeoX has built its datasets by its first logged loss
            seen.append(record)
            if check is not None:
                check.callback(record)

        result: TrainResult = self.engine.train(yml, self.root / "logs", quiet=self.quiet,
                                                callback=callback if check or guard else None)
        if guard is not None and result.log is not None and seen:
            guard()
        if check is not None:
            info["start_check"] = check.finish(result)
        info.update(self._summary(name, result))
        return info

    def _order_guard(self, name: str, yml: Path) -> Callable[[], None] | None:
        """With the fixed-data epoch order and NeoX: a check that NeoX read the window through our index maps."""
        row = self.plan.row(name)
        if not row.sample_order or self.engine.name != "neox":
            return None
        from neox_progressive.data.sample_order import neox_order_problem

        log = self.root / "logs" / f"{yml.stem}.neox.log"  # NeoXEngine's log of the stage

        def guard() -> None:
            problem = neox_order_problem(log.read_text() if log.is_file() else "", row.train_data_path, row.sample_order)
            if problem:
                raise CheckFailed(f"member {name}: {problem}")

        return guard

    def _start_check(self, name: str, yml: Path, expanded_dir: Path) -> _LiveStartCheck:
        from neox_progressive.train import expanded_loss, read_settings

        settings = read_settings([yml])
        loss = expanded_loss(expanded_dir, [yml], device=self.device)
        _log(f"{name}: the expanded checkpoint's held-out loss is {loss:.4f} (random init: about ln V)", self.quiet)
        # the builtin engine logs iterations 1..10 one by one; NeoX logs every log_interval
        first = settings.log_interval if self.engine.name == "neox" else 1
        return _LiveStartCheck(name, loss, settings.shape.padded_vocab_size or 0, quiet=self.quiet, first_iteration=first,
                               engine=self.engine.name)

    def _summary(self, name: str, result: TrainResult) -> dict[str, Any]:
        from neox_progressive.train import read_metrics

        out: dict[str, Any] = {"checkpoint": str(result.checkpoint)}
        if result.metrics and Path(result.metrics).is_file():
            out["metrics"] = str(result.metrics)
            valid = read_metrics(result.metrics, "valid")
            train = read_metrics(result.metrics, "train")
            if valid:
                out["start_valid_loss"] = valid[0]["loss"] if valid[0]["iteration"] == 0 else None
                out["final_valid_loss"] = valid[-1]["loss"]
            if train:
                out["final_train_loss"] = train[-1]["loss"]
                out["tokens"] = train[-1]["tokens"]
                out["flops"] = train[-1]["flops"]
        return out

    # ---- driving ------------------------------------------------------------------------------------
    def _legacy(self, path: Path) -> str | None:
        return raw_digest(path.name, self._config_text(path))

    def is_done(self, step: Step, inputs: dict[str, Any]) -> bool:
        legacy = {k: self._legacy(p) for k, p in step.configs.items()}
        return inputs_match(self.state.info(step.name).get("inputs"), inputs, legacy) and self.state.done(step.name)

    def run(self) -> dict[str, dict[str, Any]]:
        """Run every step not already done; returns {step name: info}."""
        self.prepare()
        for step in self.steps():
            inputs = step.inputs()
            if self.is_done(step, inputs):
                _log(f"[{self.mode}] {step.name}: done before, outputs verified; skipping", self.quiet)
                self.results[step.name] = self.state.info(step.name)
                continue
            _log(f"[{self.mode}] {step.describe}", self.quiet)
            t0 = time.time()
            info = step.action(inputs) or {}
            info = {**info, "inputs": inputs, "seconds": round(time.time() - t0, 2)}
            outputs = step.outputs or ([Path(info["checkpoint"])] if "checkpoint" in info else [])
            self.state.record(step.name, outputs, info)
            self.results[step.name] = info
        return self.results

    def dry_run(self) -> dict[str, Any]:
        """The `--dry-run` as data: every step and command, marking what is already done (judged on the stage
        configs the run would write, not on those on disk)."""
        from neox_progressive.family.stages import dump_stage

        self._planned = {self.stage_yaml(n): dump_stage(self.family, self.plan, n, self.configs_dir.resolve())
                         for n in self.names}
        steps = [{"step": s.name, "does": s.describe, "command": s.command or None, "done": self.is_done(s, s.inputs())}
                 for s in self.steps()]
        return {"mode": self.mode, "configs_dir": str(self.configs_dir), "stage_configs": len(self.names), "steps": steps}

    def describe(self) -> list[str]:
        """The `--dry-run` lines (`dry_run` as text)."""
        d = self.dry_run()
        lines = [f"[{self.mode}] write {d['stage_configs']} stage configs into {d['configs_dir']} and cut the data windows"]
        for s in d["steps"]:
            lines.append(f"[{self.mode}] {s['step']}: {s['does']}{'  (done, will be skipped)' if s['done'] else ''}")
            if s["command"]:
                lines.append(f"    $ {s['command']}")
        return lines


def same_first_member(family) -> bool:
    """Whether the first member's progressive and independent stages train the same model: their stage configs are
    equal but for where they save and how W&B names them (budget, batch, schedule, data window, seed). A first
    member trained from a Hugging Face model (`init: {hf: DIR, train: true}`) loads each mode's own import of DIR:
    the same bytes (the import is deterministic), so `load` does not count either."""
    from neox_progressive.family import plan_family
    from neox_progressive.family.stages import stage_config

    name = family.members[0].name
    names = ("save", "wandb_run_name", "wandb_group") + (("load",) if family.members[0].init_hf else ())
    cfgs = [{k: v for k, v in stage_config(family, plan_family(family, mode), name).items() if k not in names}
            for mode in MODES]
    return cfgs[0] == cfgs[1]


def family_runs(family, modes: list[str], engine: Engine, *, quiet: bool = False, device: str | None = None) -> list[FamilyRun]:
    """The runs of `modes` in order; with both modes, the independent run reuses the progressive first member."""
    runs: list[FamilyRun] = []
    for mode in modes:
        prog = next((r for r in runs if r.mode == "progressive"), None)
        runs.append(FamilyRun(family, mode, engine, quiet=quiet, device=device, reuse_first=prog))
    return runs


class _LiveStartCheck:
    """The stage-start check, fed with the training records as the engine logs them (`callback`);
    `finish` decides from the metrics file or the NeoX log when the callback saw too few (a resumed
    or very short stage)."""

    def __init__(self, member: str, expanded: float, vocab: int, quiet: bool, n_first: int = 5, first_iteration: int = 1,
                 engine: str = "neox"):
        self.member, self.expanded, self.vocab, self.quiet, self.n_first = member, expanded, vocab, quiet, n_first
        self.engine = engine
        self.first_iteration = first_iteration
        """The iteration of the first logged loss: 1 for the builtin engine, log_interval for NeoX."""
        self.losses: list[float] = []
        self.result = None

    def callback(self, record: dict) -> None:
        if record.get("kind") != "train" or self.result is not None:
            return
        if record.get("iteration") == self.first_iteration:
            self.losses = []
        elif not self.losses:
            return  # resumed past the first iterations: `finish` reads them from the metrics file
        self.losses.append(float(record["loss"]))
        if len(self.losses) >= self.n_first:
            self._decide()

    def _decide(self) -> None:
        from neox_progressive.train import check_stage_start

        self.result = check_stage_start(self.expanded, self.losses, self.vocab, member=self.member, engine=self.engine)
        _log(self.result.message, self.quiet)
        if not self.result.ok:
            raise CheckFailed(self.result.message)

    def finish(self, result: TrainResult) -> dict[str, Any]:
        if self.result is None:
            self.losses = self._first_losses(result)
            if not self.losses:
                raise CheckFailed(f"member {self.member}: no training losses were logged, so the stage-start check cannot "
                                  "tell whether training started from the expanded weights (set log_interval: 1)")
            self._decide()
        return {"verdict": self.result.verdict, "first_losses": self.losses, "expanded_loss": self.expanded,
                "threshold": self.result.threshold if math.isfinite(self.result.threshold) else None,
                "warning": self.result.warning}

    def _first_losses(self, result: TrainResult) -> list[float]:
        by_iter: dict[int, float] = {}
        if result.metrics is not None and Path(result.metrics).is_file():
            from neox_progressive.train import read_metrics

            for r in read_metrics(result.metrics, "train"):
                by_iter.setdefault(int(r["iteration"]), float(r["loss"]))
        elif result.log is not None and Path(result.log).is_file():
            from neox_progressive.train import parse_neox_losses

            for it, loss in parse_neox_losses(Path(result.log).read_text()):
                by_iter.setdefault(it, loss)  # the log is appended to: the stage's first try comes first
        return [by_iter[i] for i in sorted(by_iter)][: self.n_first]
