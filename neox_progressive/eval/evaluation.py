"""Evaluate a model family: per member perplexity and lm-eval tasks, per adjacent pair KL and speculative decoding.

Members are grouped by family (e.g. progressive, independent) and ordered small to large within
one. Only two models are in memory at a time: a member and the one before it. With two or more
families, the paper's Table 5 comparison is added: member i of every other family drafts for
member i + 1 of the first family (the reference, e.g. Independent 4B -> Progressive 8B).

Every metric uses examples cut once from the validation data (`examples.py`): perplexity NeoX's
windows in file order; KL validation documents (or windows, `kl_on`) and speculative decoding
prompts, both sampled with `seed`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable

import torch

from neox_progressive import __version__
from neox_progressive.errors import UserError
from neox_progressive.eval.examples import KL_UNITS, Documents, HeldOut, held_out
from neox_progressive.eval.kl import examples_kl
from neox_progressive.eval.member import TrainedMember, check_same_vocabulary
from neox_progressive.eval.perplexity import perplexity
from neox_progressive.eval.settings import EvalSettings
from neox_progressive.eval.specdec import speculative_generate, target_generate
from neox_progressive.progress import progress_bar


def group_families(members: list[TrainedMember]) -> dict[str, list[TrainedMember]]:
    fams: dict[str, list[TrainedMember]] = {}
    for m in members:
        fams.setdefault(m.family, []).append(m)
    for fam, ms in fams.items():
        names = [m.name for m in ms]
        if len(set(names)) != len(names):
            raise UserError(f"family {fam!r} lists a member twice ({names}); give each member once, small to large")
    return fams


def pairs_of(families: dict[str, list[TrainedMember]]) -> list[tuple[TrainedMember, TrainedMember, bool]]:
    """(draft/small, target/large, cross-family?) in evaluation order."""
    out = [(a, b, False) for ms in families.values() for a, b in zip(ms, ms[1:])]
    names = list(families)
    ref = families[names[0]]
    for other in names[1:]:
        out += [(families[other][i], ref[i + 1], True) for i in range(min(len(ref) - 1, len(families[other])))]
    return out


def load_held_out(members: list[TrainedMember], s: EvalSettings) -> HeldOut:
    """The perplexity windows, KL examples and prompts the settings ask for (`examples.held_out`)."""
    seq = s.seq_length or min(m.shape.seq_length for m in members)
    if s.kl_on not in KL_UNITS:
        raise UserError(f"kl_on {s.kl_on!r}: expected one of {', '.join(KL_UNITS)} (--kl-on)")
    counts = {"ppl": s.ppl_windows if s.wants("ppl") else 0, "kl": s.kl_examples if s.wants("kl") else 0,
              "prompts": s.prompts if s.wants("specdec") else 0}
    if not any(counts.values()):
        return HeldOut(seq_length=seq)
    if bool(s.data) == bool(s.text):
        raise UserError("give the held-out data with exactly one of --data PREFIX (NeoX .bin/.idx) or --text FILE "
                        "(.jsonl with a 'text' key, or plain text)")
    tok = members[0].tokenizer if (s.text or members[0].has_tokenizer()) else None
    eod = tok.eod if tok is not None else None
    docs = Documents.from_mmap(s.data) if s.data else Documents.from_text(s.text, tok.encode, eod)
    return held_out(docs, seq, ppl=counts["ppl"], kl=counts["kl"], kl_on=s.kl_on, prompts=counts["prompts"],
                    prompt_tokens=s.prompt_tokens, seed=s.seed, eod=eod)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def specdec_eval(draft, target, prompts: list[list[int]], s: EvalSettings, vocab: int, device) -> dict:
    """Per mode: acceptance, mean accepted length per round, wall time per prompt with and without the draft."""
    out = {}
    for mode in s.modes:
        temp = 0.0 if mode == "greedy" else s.temperature
        warm = torch.Generator(device).manual_seed(s.seed)
        speculative_generate(draft, target, prompts[0], 4, draft_len=s.draft_len, temperature=temp, generator=warm,
                             vocab_size=vocab)
        target_generate(target, prompts[0], 4, temperature=temp, generator=warm, vocab_size=vocab)
        g = torch.Generator(device).manual_seed(s.seed)
        spec = [speculative_generate(draft, target, p, s.new_tokens, draft_len=s.draft_len, temperature=temp,
                                     generator=g, vocab_size=vocab) for p in prompts]
        g = torch.Generator(device).manual_seed(s.seed)
        alone = [target_generate(target, p, s.new_tokens, temperature=temp, generator=g, vocab_size=vocab) for p in prompts]
        drafted, accepted, rounds = (sum(getattr(r, k) for r in spec) for k in ("drafted", "accepted", "rounds"))
        t_spec, t_alone = sum(r.seconds for r in spec), sum(r.seconds for r in alone)
        out[mode] = {"acceptance_rate": accepted / drafted if drafted else None,
                     "mean_accepted_length": 1 + accepted / rounds if rounds else None,
                     "drafted": drafted, "accepted": accepted, "rounds": rounds, "prompts": len(prompts),
                     "seconds_per_prompt": t_spec / len(prompts), "target_seconds_per_prompt": t_alone / len(prompts),
                     "speedup": t_alone / t_spec if t_spec else None, "temperature": temp, "draft_len": s.draft_len,
                     "dtype": s.dtype, "device": str(device),
                     "per_prompt": {"drafted": [r.drafted for r in spec], "accepted": [r.accepted for r in spec],
                                    "rounds": [r.rounds for r in spec]}}
        if mode == "greedy":
            out[mode]["same_as_target"] = all(a.tokens == b.tokens for a, b in zip(spec, alone))
    return out


def member_eval(m: TrainedMember, model, held: HeldOut, s: EvalSettings, task_set, device, raw: dict) -> dict:
    entry = m.describe()
    if s.wants("ppl"):
        with progress_bar(total=s.ppl_windows, desc=f"perplexity {m.label}", quiet=s.quiet) as bar:
            entry["perplexity"] = perplexity(model, held.windows[:s.ppl_windows], batch_size=s.batch_size,
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


def pair_eval(a: TrainedMember, b: TrainedMember, held: HeldOut, s: EvalSettings, device) -> dict:
    vocab = check_same_vocabulary(a, b)
    small, large = a.load(device, s.dtype), b.load(device, s.dtype)
    entry: dict = {"small": a.name, "large": b.name}
    if s.wants("kl"):
        n = len(held.kl_examples)
        with progress_bar(total=n, desc=f"KL {a.label} || {b.label}", quiet=s.quiet) as bar:
            res = examples_kl(small, large, held.kl_examples, batch_size=s.batch_size, vocab_size=vocab,
                              vocab_chunk=s.vocab_chunk, unit=s.kl_on, progress=bar.update)
        entry["kl"] = res.to_dict()
        entry["kl"]["per_example"]["source"] = held.kl_source
    if s.wants("specdec"):
        entry["specdec"] = specdec_eval(small, large, held.prompts, s, vocab, device)
        entry["specdec_prompt_source"] = held.prompt_source
    return entry


def evaluate_family(members: list[TrainedMember], s: EvalSettings, log: Callable[[str], None] = print,
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
    held = load_held_out(members, s)
    device = _device(s.device)
    raw = {} if raw is None else raw
    results: dict = {"neox_progressive_version": __version__, "created": dt.datetime.now().isoformat(timespec="seconds"),
                     "settings": {**dataclasses.asdict(s), "seq_length": held.seq_length, "device": str(device),
                                  "data": s.data or s.text, "documents": held.documents, "eod_id": held.eod},
                     "families": {}, "cross_pairs": []}
    for fam, ms in families.items():
        fam_out: dict = {"members": [], "pairs": []}
        results["families"][fam] = fam_out
        prev = None
        for m in ms:
            log(f"member {m.label}: {m.shape.num_layers} layers, hidden {m.shape.hidden_size}")
            fam_out["members"].append(member_eval(m, m.load(device, s.dtype), held, s, task_set, device, raw))
            if prev is not None and (s.wants("kl") or s.wants("specdec")):
                fam_out["pairs"].append(pair_eval(prev, m, held, s, device))
            if prev is not None:
                prev.unload()
            prev = m
        if prev is not None:
            prev.unload()
    for a, b, cross in pairs:
        if cross and (s.wants("kl") or s.wants("specdec")):
            log(f"cross-family pair {a.label} -> {b.label}")
            entry = pair_eval(a, b, held, s, device)
            results["cross_pairs"].append({**entry, "draft": a.label, "target": b.label})
            a.unload()
            b.unload()
    return results
