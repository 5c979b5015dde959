"""Example lm-eval tasks that run offline: local YAML files over local JSONL data.

`write_example_tasks(dir)` writes three tasks built at run time from the docstrings of the Python
standard library (every machine has them; nothing is downloaded or copied from elsewhere):

- `stdlib_lastword` (loglikelihood, like LAMBADA): a docstring sentence without its last word;
  metrics perplexity and acc (the last word is the greedy continuation).
- `stdlib_choice` (multiple_choice, like HellaSwag): the first half of a sentence and four
  endings, one true; metrics acc and acc_norm.
- `stdlib_rolling` (loglikelihood_rolling, like WikiText): whole paragraphs; metrics
  word_perplexity, byte_perplexity, bits_per_byte.

Point lm-eval at the directory (`--include-path DIR`, `TaskManager(include_path=DIR)`, or in
0.4.1 `lm_eval.tasks.include_path(DIR)`). The same recipe works for real local data: a JSONL
file and a YAML whose `dataset_path: json` + `dataset_kwargs.data_files` name it.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import re
from pathlib import Path

import yaml

EXAMPLE_TASKS = ("stdlib_lastword", "stdlib_choice", "stdlib_rolling")
# Standard-library modules whose docstrings are the text (documented, stable, pure Python).
STDLIB_MODULES = ("argparse", "collections", "csv", "dataclasses", "datetime", "difflib", "email.message", "fractions",
                  "functools", "heapq", "json", "logging", "pathlib", "pickle", "random", "shutil", "statistics",
                  "string", "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest", "urllib.parse",
                  "uuid", "zipfile")


def stdlib_paragraphs(min_words: int = 8) -> list[str]:
    """Paragraphs of standard-library docstrings (modules, their public classes and functions), in a fixed order."""
    seen, out = set(), []
    for name in STDLIB_MODULES:
        mod = importlib.import_module(name)
        objs = [mod] + [getattr(mod, a) for a in sorted(getattr(mod, "__all__", None) or dir(mod)) if not a.startswith("_")]
        for obj in objs:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj)) else None
            for para in (doc or "").split("\n\n"):
                text = " ".join(para.split())
                if len(text.split()) >= min_words and text not in seen and not re.search(r">>>|\.\.\.|::|[{}|]", text):
                    seen.add(text)
                    out.append(text)
    return out


def _sentences(paragraphs: list[str]) -> list[str]:
    out = []
    for p in paragraphs:
        for s in re.split(r"(?<=[.!?])\s+", p):
            words = s.split()
            if 8 <= len(words) <= 40 and s.endswith(".") and re.fullmatch(r"[A-Za-z]+\.", words[-1]):
                out.append(s)
    return out


def _yaml(task: str, data: Path, output_type: str, metrics: list[tuple[str, str, bool]], **keys) -> dict:
    return {"task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
            "test_split": "test", "output_type": output_type, **keys,
            "metric_list": [{"metric": m, "aggregation": a, "higher_is_better": h} for m, a, h in metrics],
            "metadata": {"version": 1.0}}


def write_example_tasks(out_dir: str | Path, n_docs: int = 200, seed: int = 0) -> Path:
    """Write the example tasks (YAML + JSONL) into `out_dir`; returns it, ready as an lm-eval include path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paragraphs = stdlib_paragraphs()
    sentences = _sentences(paragraphs)
    rng.shuffle(sentences)

    lastword = [{"context": s.rsplit(" ", 1)[0], "target": " " + s.rsplit(" ", 1)[1][:-1]} for s in sentences[:n_docs]]
    choice = []
    pool = sentences[n_docs:] or sentences
    for i, s in enumerate(sentences[:n_docs]):
        words = s.split()
        cut = len(words) // 2
        endings = [" " + " ".join(words[cut:])]
        for k in range(1, 4):
            other = pool[(i * 3 + k) % len(pool)].split()
            endings.append(" " + " ".join(other[len(other) // 2:]))
        gold = rng.randrange(4)
        endings[0], endings[gold] = endings[gold], endings[0]
        choice.append({"context": " ".join(words[:cut]), "choices": endings, "gold": gold})
    rolling = [{"text": p} for p in paragraphs[:n_docs]]

    specs = {
        "stdlib_lastword": (lastword, _yaml("stdlib_lastword", out / "stdlib_lastword.jsonl", "loglikelihood",
                                            [("perplexity", "perplexity", False), ("acc", "mean", True)],
                                            doc_to_text="{{context}}", doc_to_target="{{target}}")),
        "stdlib_choice": (choice, _yaml("stdlib_choice", out / "stdlib_choice.jsonl", "multiple_choice",
                                        [("acc", "mean", True), ("acc_norm", "mean", True)],
                                        doc_to_text="{{context}}", doc_to_choice="choices", doc_to_target="gold")),
        "stdlib_rolling": (rolling, _yaml("stdlib_rolling", out / "stdlib_rolling.jsonl", "loglikelihood_rolling",
                                          [("word_perplexity", "weighted_perplexity", False),
                                           ("byte_perplexity", "weighted_perplexity", False),
                                           ("bits_per_byte", "bits_per_byte", False)],
                                          doc_to_text="", doc_to_target="{{text}}")),
    }
    for name, (rows, cfg) in specs.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (out / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out
