"""lm-evaluation-harness across its 0.4.x API changes, offline.

GPT-NeoX pins lm_eval 0.4.1 (`tasks.initialize_tasks()` + `tasks.include_path(dir)`, a global
task registry); 0.4.2 and later use `TaskManager(include_path=...)`. Both run through
`evaluator.simple_evaluate(model=<LM instance>, tasks=[...])`.

Offline: local YAML task files over local JSONL data always work (`include_paths`). A standard
task loads its dataset through HF `datasets`; when that dataset is not in the local cache the
run stops before any model work with a message naming the dataset, how to fetch it on a
machine with network, and where to put it (HF_DATASETS_CACHE, then HF_DATASETS_OFFLINE=1).

lm_eval 0.4.1 loads its `exact_match` metric from the HF Hub at import time (api/metrics.py);
offline that import fails, and leaves lm_eval half-imported: its registry module stays loaded with
the aggregations registered, so a second plain `import lm_eval` fails on "aggregation named 'mean'
conflicts". `import_lm_eval` clears such a half-import (its own or anyone's before it), serves that
one metric locally while lm_eval imports (`ExactMatch`, written from the metric's documented
behaviour) and imports again. Import lm_eval through it, not with a bare `import lm_eval`.

lm_eval 0.4.1's task registry is global and keeps the first registration of a name; `TaskSet`
re-registers the tasks of each include path it is given, so the latest directory wins.
"""

from __future__ import annotations

import difflib
import os
import re
import string
import sys
import traceback
from pathlib import Path
from typing import Any

import yaml

from neox_progressive.errors import UserError

_INITIALIZED = False


class ExactMatch:
    """Stand-in for the HF `evaluate` exact_match metric: the share of predictions equal to their reference
    after the optional normalisations (regexes removed, case, punctuation, digits)."""

    def compute(self, predictions, references, regexes_to_ignore=None, ignore_case=False, ignore_punctuation=False,
                ignore_numbers=False, **_):
        def norm(texts):
            out = []
            for t in texts:
                for rx in regexes_to_ignore or []:
                    t = re.sub(rx, "", t)
                if ignore_case:
                    t = t.lower()
                if ignore_punctuation:
                    t = t.translate(str.maketrans("", "", string.punctuation))
                if ignore_numbers:
                    t = t.translate(str.maketrans("", "", string.digits))
                out.append(t)
            return out

        p, r = norm(predictions), norm(references)
        return {"exact_match": sum(a == b for a, b in zip(p, r)) / max(len(p), 1)}


def _forget_half_import() -> None:
    """Drop the submodules a failed `import lm_eval` left behind (its package is gone, they are not)."""
    if "lm_eval" not in sys.modules:
        for name in [m for m in sys.modules if m.startswith("lm_eval.")]:
            del sys.modules[name]


def _hub_metric_failed(exc: BaseException) -> bool:
    """The import failed inside `evaluate.load` (lm_eval 0.4.1's metric from the Hub), not for another reason."""
    frames = traceback.extract_tb(exc.__traceback__)
    return any(Path(f.filename).name == "loading.py" and Path(f.filename).parent.name == "evaluate" for f in frames)


def _import() -> None:
    import lm_eval  # noqa: F401
    import lm_eval.api.model
    import lm_eval.evaluator
    import lm_eval.tasks  # noqa: F401


def _installed_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("lm_eval")
    except Exception:  # noqa: BLE001 - not installed
        return None


def import_lm_eval():
    """`import lm_eval`, serving lm_eval 0.4.1's Hub-loaded exact_match metric locally when offline."""
    _forget_half_import()
    try:
        _import()
    except ImportError as exc:
        _forget_half_import()
        have = _installed_version()
        if have is None:
            raise UserError("evaluation with lm-eval needs the lm-eval package: pip install 'lm-eval>=0.4.1,<0.5'") from None
        raise UserError(f"lm-eval {have} is installed but cannot be imported ({exc}); install a matching set, e.g. "
                        "pip install -c constraints/neox.txt -e '.[eval]' for GPT-NeoX's pins") from None
    except Exception as exc:  # noqa: BLE001 - evaluate raises FileNotFoundError, ConnectionError, ... offline
        _forget_half_import()
        if not _hub_metric_failed(exc):
            raise
        import evaluate

        original = evaluate.load

        def load(path, *args, **kwargs):
            return ExactMatch() if path == "exact_match" else original(path, *args, **kwargs)

        evaluate.load = load
        try:
            _import()
        finally:
            evaluate.load = original
            _forget_half_import()
    import lm_eval
    return lm_eval


class _IgnoreTags(yaml.SafeLoader):
    """Reads lm-eval task YAML (`!function ...` tags become None): only the task names are wanted."""


_IgnoreTags.add_multi_constructor("!", lambda loader, suffix, node: None)


def _forget_tasks_defined_in(directory: str) -> None:
    """lm_eval 0.4.1 keeps one global task registry and will not register a task name twice (the second
    registration is logged and dropped), so a second directory with the same task names (another run's
    temporary copy of the example tasks, say) would be served from the first, possibly deleted, one.
    Forget the names this directory defines; including it then registers them afresh."""
    from lm_eval.api.registry import ALL_TASKS, TASK_REGISTRY

    for path in sorted(Path(directory).rglob("*.yaml")):
        try:
            config = yaml.load(path.read_text(), Loader=_IgnoreTags)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # lm-eval will log it when it reads the file
        name = config.get("task") if isinstance(config, dict) else None
        if isinstance(name, str) and name in TASK_REGISTRY:
            del TASK_REGISTRY[name]
            ALL_TASKS.discard(name)


def _new_api(lm_eval) -> bool:
    return hasattr(lm_eval.tasks, "TaskManager")


def hf_cache() -> str:
    """$HF_HOME as huggingface_hub and datasets resolve it (default: $XDG_CACHE_HOME/huggingface)."""
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.expanduser(os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface"))


def datasets_cache() -> str:
    """Where `datasets` looks for prepared datasets: its own setting, else $HF_DATASETS_CACHE, else $HF_HOME/datasets."""
    try:
        from datasets import config

        return str(config.HF_DATASETS_CACHE)
    except Exception:  # noqa: BLE001 - datasets missing or broken: say what it would read
        return os.path.expanduser(os.environ.get("HF_DATASETS_CACHE") or os.path.join(hf_cache(), "datasets"))


class TaskSet:
    """The tasks lm-eval can see: its own plus those in `include_paths` (directories of YAML files)."""

    def __init__(self, include_paths: list[str | Path] | None = None):
        global _INITIALIZED
        self.lm_eval = import_lm_eval()
        self.include_paths = [str(Path(p).resolve()) for p in include_paths or []]
        for p in self.include_paths:
            if not Path(p).is_dir():
                raise UserError(f"task directory {p!r} (--include-path) does not exist")
        tasks = self.lm_eval.tasks
        if _new_api(self.lm_eval):
            self.manager = tasks.TaskManager(include_path=self.include_paths or None)
            self.names = set(self.manager.all_tasks)
        else:
            self.manager = None
            if not _INITIALIZED:
                tasks.initialize_tasks("ERROR")
                _INITIALIZED = True
            for p in self.include_paths:
                _forget_tasks_defined_in(p)
                tasks.include_path(p)
            self.names = set(tasks.ALL_TASKS)

    def dataset_of(self, name: str) -> str:
        """`dataset_path[/dataset_name]` of a task, best effort (for error messages)."""
        cfg: dict[str, Any] = {}
        try:
            if self.manager is not None:
                entry = self.manager.task_index.get(name)
                cfg = dict(getattr(entry, "cfg", None) or {})
            else:
                from lm_eval.api.registry import TASK_REGISTRY
                cfg = TASK_REGISTRY[name].CONFIG.to_dict()
        except Exception:  # noqa: BLE001 - only used to word a message
            pass
        path, sub = cfg.get("dataset_path"), cfg.get("dataset_name")
        return f"{path}" + (f" (config {sub!r})" if sub else "") if path else "its dataset"

    def _load(self, names: list[str]):
        if self.manager is not None:
            return self.lm_eval.tasks.get_task_dict(names, self.manager)
        return self.lm_eval.tasks.get_task_dict(names)

    def check(self, names: list[str]) -> None:
        """Unknown names and datasets that are not available offline become UserErrors, before any model work."""
        for name in names:
            if name not in self.names:
                close = difflib.get_close_matches(name, sorted(self.names), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise UserError(f"lm-eval task {name!r} is not known to lm-eval {self.version} or the --include-path "
                                f"directories ({', '.join(self.include_paths) or 'none'}){hint}")
        for name in names:
            try:
                self._load([name])
            except Exception as exc:  # noqa: BLE001 - datasets raises many types for a missing dataset
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                ds = self.dataset_of(name)
                raise UserError(
                    f"lm-eval task {name!r} could not load {ds} on this machine ({type(exc).__name__}: {first}); "
                    f"download it where there is network (`lm_eval --tasks {name} --limit 1` or "
                    f"datasets.load_dataset('{ds.split()[0]}') there), copy that machine's HF cache ($HF_HOME: its "
                    f"datasets/ and hub/ folders) into {hf_cache()} here (the cache `datasets` reads: {datasets_cache()}) "
                    "and run with HF_DATASETS_OFFLINE=1, or define the task as a local YAML over a JSONL file "
                    "(--include-path)") from None

    @property
    def version(self) -> str:
        return _installed_version() or "0.4.x"

    def evaluate(self, lm, names: list[str], *, limit: int | None = None, num_fewshot: int | None = None,
                 bootstrap_iters: int = 100) -> dict[str, Any]:
        """Run the tasks on an LM instance; returns lm-eval's results dict (["results"][task][metric])."""
        kwargs = dict(model=lm, tasks=list(names), limit=limit, num_fewshot=num_fewshot,
                      bootstrap_iters=bootstrap_iters, log_samples=False)
        if self.manager is not None:
            kwargs["task_manager"] = self.manager
        return self.lm_eval.evaluator.simple_evaluate(**kwargs)


def flat_metrics(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's results (filter suffix ',none' dropped, stderr kept as *_stderr)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        row = {}
        for key, value in metrics.items():
            if key == "alias" or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            row[metric if filt in ("", "none") else f"{metric}[{filt}]"] = float(value)
        out[task] = row
    return out
