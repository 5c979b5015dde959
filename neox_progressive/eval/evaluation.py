"""Evaluate a model family: per member perplexity and lm-eval tasks, per adjacent pair KL and speculative decoding.

Members are grouped by family (e.g. progressive, independent) and ordered small to large within
one. Only two models are in memory at a time: a member and the one before it. With two or more
families, the paper's Table 5 comparison is added: member i of every other family drafts for
member i + 1 of the first family (the reference, e.g. Independent 4B -> Progressive 8B).

All metrics use the same token windows, cut once from the validation data (`perplexity.py`):
NeoX samples of seq_length + 1 tokens in file order; speculative decoding prompts are the first
`prompt_tokens` of the first windows.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from neox_progressive import __version__
from neox_progressive.errors import UserError
from neox_progressive.eval.kl import pair_kl
from neox_progressive.eval.member import Member, check_same_vocabulary
from neox_progressive.eval.perplexity import mmap_documents, perplexity, text_documents, token_windows
from neox_progressive.eval.specdec import speculative_generate, target_generate

STEPS = ("ppl", "tasks", "kl", "specdec")


@dataclass
class EvalSettings:
    data: str | None = None
    """NeoX mmap prefix of held-out data (valid_data_paths)."""
    text: str | None = None
    """Or a .jsonl / text file, tokenized with the members' tokenizer."""
    seq_length: int | None = None
    """Window length (default: the smallest member seq_length)."""
    ppl_windows: int = 64
    kl_windows: int = 64
    batch_size: int = 4
    prompts: int = 16
    prompt_tokens: int = 32
    new_tokens: int = 64
    draft_len: int = 8
    modes: tuple[str, ...] = ("greedy", "sampled")
    temperature: float = 1.0
    seed: int = 0
    tasks: list[str] = field(default_factory=list)
    include_paths: list[str] = field(default_factory=list)
    limit: int | None = None
    num_fewshot: int | None = None
    bootstrap_iters: int = 100
    device: str = "auto"
    dtype: str = "fp32"
    vocab_chunk: int | None = None
    skip: tuple[str, ...] = ()
    quiet: bool = False

    def wants(self, step: str) -> bool:
        return step not in self.skip and (step != "tasks" or bool(self.tasks))


def group_families(members: list[Member]) -> dict[str, list[Member]]:
    fams: dict[str, list[Member]] = {}
    for m in members:
        fams.setdefault(m.family, []).append(m)
    for fam, ms in fams.items():
        names = [m.name for m in ms]
        if len(set(names)) != len(names):
            raise UserError(f"family {fam!r} lists a member twice ({names}); give each member once, small to large")
    return fams


def pairs_of(families: dict[str, list[Member]]) -> list[tuple[Member, Member, bool]]:
    """(draft/small, target/large, cross-family?) in evaluation order."""
    out = [(a, b, False) for ms in families.values() for a, b in zip(ms, ms[1:])]
    names = list(families)
    ref = families[names[0]]
    for other in names[1:]:
        out += [(families[other][i], ref[i + 1], True) for i in range(min(len(ref) - 1, len(families[other])))]
    return out


def load_windows(members: list[Member], s: EvalSettings) -> tuple[list[np.ndarray], int]:
    seq = s.seq_length or min(m.shape.seq_length for m in members)
    need = max(s.ppl_windows if s.wants("ppl") else 0, s.kl_windows if s.wants("kl") else 0,
               s.prompts if s.wants("specdec") else 0)
    if need == 0:
        return [], seq
    if bool(s.data) == bool(s.text):
        raise UserError("give the held-out data with exactly one of --data PREFIX (NeoX .bin/.idx) or --text FILE "
                        "(.jsonl with a 'text' key, or plain text)")
    if s.data:
        docs = mmap_documents(s.data)
    else:
        tok = members[0].tokenizer
        docs = text_documents(s.text, tok.encode, tok.eot_id)
    windows = list(token_windows(docs, seq + 1, need))
    if len(windows) < need:
        src = s.data or s.text
        raise UserError(f"{src} holds {len(windows)} windows of {seq + 1} tokens but {need} are needed; use more "
                        "data, a smaller --seq-length, or fewer --ppl-windows/--kl-windows/--prompts")
    return windows, seq


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _batches(windows: list[np.ndarray], n: int, batch: int, device) -> list[torch.Tensor]:
    w = windows[:n]
    return [torch.as_tensor(np.stack(w[i:i + batch])[:, :-1], device=device) for i in range(0, len(w), batch)]


def specdec_eval(draft, target, prompts: list[list[int]], s: EvalSettings, vocab: int, device) -> dict:
    out = {}
    for mode in s.modes:
        temp = 0.0 if mode == "greedy" else s.temperature
        speculative_generate(draft, target, prompts[0], 4, draft_len=s.draft_len, temperature=temp,
                             generator=torch.Generator(device).manual_seed(s.seed), vocab_size=vocab)  # warm-up
        g = torch.Generator(device).manual_seed(s.seed)
        spec = [speculative_generate(draft, target, p, s.new_tokens, draft_len=s.draft_len, temperature=temp,
                                     generator=g, vocab_size=vocab) for p in prompts]
        g = torch.Generator(device).manual_seed(s.seed)
        alone = [target_generate(target, p, s.new_tokens, temperature=temp, generator=g, vocab_size=vocab) for p in prompts]
        drafted, accepted = sum(r.drafted for r in spec), sum(r.accepted for r in spec)
        t_spec, t_alone = sum(r.seconds for r in spec), sum(r.seconds for r in alone)
        out[mode] = {"acceptance_rate": accepted / drafted if drafted else None, "drafted": drafted, "accepted": accepted,
                     "rounds": sum(r.rounds for r in spec), "seconds_per_prompt": t_spec / len(prompts),
                     "target_seconds_per_prompt": t_alone / len(prompts), "speedup": t_alone / t_spec if t_spec else None,
                     "temperature": temp}
        if mode == "greedy":
            out[mode]["same_as_target"] = all(a.tokens == b.tokens for a, b in zip(spec, alone))
    return out


def member_eval(m: Member, model, windows, s: EvalSettings, task_set, device, raw: dict) -> dict:
    entry = m.describe()
    if s.wants("ppl"):
        with tqdm(total=s.ppl_windows, desc=f"perplexity {m.label}", disable=s.quiet, file=sys.stderr) as bar:
            entry["perplexity"] = perplexity(model, windows[:s.ppl_windows], batch_size=s.batch_size,
                                             progress=bar.update).to_dict()
    if s.wants("tasks"):
        from neox_progressive.eval.harness import flat_metrics
        from neox_progressive.eval.lm import NeoXProgressiveLM

        lm = NeoXProgressiveLM(model=model, tokenizer=m.tokenizer, batch_size=s.batch_size, device=str(device),
                               progress=not s.quiet)
        raw[m.label] = task_set.evaluate(lm, s.tasks, limit=s.limit, num_fewshot=s.num_fewshot,
                                         bootstrap_iters=s.bootstrap_iters)
        entry["tasks"] = flat_metrics(raw[m.label])
    return entry


def pair_eval(a: Member, b: Member, windows, s: EvalSettings, device) -> dict:
    vocab = check_same_vocabulary(a, b)
    small, large = a.load(device, s.dtype), b.load(device, s.dtype)
    entry: dict = {"small": a.name, "large": b.name}
    if s.wants("kl"):
        with tqdm(total=s.kl_windows, desc=f"KL {a.label} || {b.label}", disable=s.quiet, file=sys.stderr) as bar:
            entry["kl"] = pair_kl(small, large, _batches(windows, s.kl_windows, s.batch_size, device), vocab_size=vocab,
                                  vocab_chunk=s.vocab_chunk, progress=bar.update).to_dict()
    if s.wants("specdec"):
        prompts = [w[:s.prompt_tokens].tolist() for w in windows[:s.prompts]]
        entry["specdec"] = specdec_eval(small, large, prompts, s, vocab, device)
    return entry


def evaluate_family(members: list[Member], s: EvalSettings, log: Callable[[str], None] = print,
                    raw: dict | None = None) -> dict:
    """Run every step on the members; returns the report's data (see report.py). lm-eval's raw results go to `raw`."""
    families = group_families(members)
    pairs = pairs_of(families)
    if pairs and (s.wants("kl") or s.wants("specdec")):
        for a, b, _ in pairs:
            check_same_vocabulary(a, b)
    task_set = None
    if s.wants("tasks"):
        from neox_progressive.eval.harness import TaskSet

        task_set = TaskSet(s.include_paths)
        task_set.check(s.tasks)  # unknown tasks and missing datasets stop us before any model work
    windows, seq = load_windows(members, s)
    device = _device(s.device)
    raw = {} if raw is None else raw
    results: dict = {"neox_progressive_version": __version__, "created": dt.datetime.now().isoformat(timespec="seconds"),
                     "settings": {**dataclasses.asdict(s), "seq_length": seq, "device": str(device),
                                  "data": s.data or s.text}, "families": {}, "cross_pairs": []}
    for fam, ms in families.items():
        fam_out: dict = {"members": [], "pairs": []}
        results["families"][fam] = fam_out
        prev = None
        for m in ms:
            log(f"member {m.label}: {m.shape.num_layers} layers, hidden {m.shape.hidden_size}")
            fam_out["members"].append(member_eval(m, m.load(device, s.dtype), windows, s, task_set, device, raw))
            if prev is not None and (s.wants("kl") or s.wants("specdec")):
                fam_out["pairs"].append(pair_eval(prev, m, windows, s, device))
            if prev is not None:
                prev.unload()
            prev = m
        if prev is not None:
            prev.unload()
    for a, b, cross in pairs:
        if cross and (s.wants("kl") or s.wants("specdec")):
            log(f"cross-family pair {a.label} -> {b.label}")
            entry = pair_eval(a, b, windows, s, device)
            results["cross_pairs"].append({**entry, "draft": a.label, "target": b.label})
            a.unload()
            b.unload()
    return results
