"""lm-evaluation-harness across its 0.4.x API changes, offline.

GPT-NeoX pins lm_eval 0.4.1 (`tasks.initialize_tasks()` + `tasks.include_path(dir)`, a global
task registry); 0.4.2 and later use `TaskManager(include_path=...)`. Both run through
`evaluator.simple_evaluate(model=<LM instance>, tasks=[...])`.

Offline: local YAML task files over local JSONL data always work (`include_paths`). A standard
task loads its dataset through HF `datasets`; when that dataset is not in the local cache the
run stops before any model work with a message naming the dataset, how to fetch it on a
machine with network, and where to put it (HF_DATASETS_CACHE, then HF_DATASETS_OFFLINE=1).

lm_eval 0.4.1 loads its `exact_match` metric from the HF Hub at import time (api/metrics.py);
offline that import fails. `import_lm_eval` then serves that one metric locally (`ExactMatch`,
written from the metric's documented behaviour) and imports again.
"""

from __future__ import annotations

import difflib
import os
import re
import string
import sys
from pathlib import Path
from typing import Any

from neox_progressive.errors import UserError

_INCLUDED: set[str] = set()
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


def import_lm_eval():
    """`import lm_eval`, serving lm_eval 0.4.1's Hub-loaded exact_match metric locally when offline."""
    try:
        import lm_eval
        import lm_eval.api.model
        import lm_eval.evaluator
        import lm_eval.tasks  # noqa: F401
    except ImportError:
        raise UserError("evaluation with lm-eval needs the lm-eval package: pip install 'lm-eval>=0.4.1,<0.5'") from None
    except (FileNotFoundError, ConnectionError, OSError) as exc:
        if "exact_match" not in str(exc):
            raise
        import evaluate

        original = evaluate.load

        def load(path, *args, **kwargs):
            return ExactMatch() if path == "exact_match" else original(path, *args, **kwargs)

        evaluate.load = load
        for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
            del sys.modules[name]
        import lm_eval
        import lm_eval.api.model
        import lm_eval.evaluator
        import lm_eval.tasks  # noqa: F401
    return lm_eval


def _new_api(lm_eval) -> bool:
    return hasattr(lm_eval.tasks, "TaskManager")


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
                if p not in _INCLUDED:
                    tasks.include_path(p)
                    _INCLUDED.add(p)
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
                cache = os.environ.get("HF_DATASETS_CACHE") or "~/.cache/huggingface/datasets"
                raise UserError(
                    f"lm-eval task {name!r} could not load {ds} on this machine ({type(exc).__name__}: {first}); "
                    f"download it where there is network (`lm_eval --tasks {name} --limit 1` or "
                    f"datasets.load_dataset('{ds.split()[0]}') there), copy the HF datasets cache to {cache} here and run with "
                    "HF_DATASETS_OFFLINE=1, or define the task as a local YAML over a JSONL file (--include-path)") from None

    @property
    def version(self) -> str:
        try:
            from importlib.metadata import version
            return version("lm_eval")
        except Exception:  # noqa: BLE001
            return "0.4.x"

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
