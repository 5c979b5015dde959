"""lm-eval model `neox-progressive`: a NeoX checkpoint + its config, run by the reference model.

    lm = NeoXProgressiveLM(checkpoint="runs/1B/checkpoints", config="configs/1B.yml")
    lm_eval.simple_evaluate(model=lm, tasks=[...])
    # or by name, once this module is imported:
    #   --model neox-progressive --model_args checkpoint=DIR,config=a.yml:b.yml,batch_size=8,device=cuda

Implements the three methods of lm-eval's `LM` contract as it stands in 0.4.1 (what NeoX pins)
and later 0.4.x, the way lm-eval's HFLM does for causal models, so both give the same numbers on
the same weights:

- `loglikelihood`: trailing context spaces move to the continuation; context and whole string
  are encoded and the continuation is the tail of the whole; an empty context is replaced by the
  end-of-text token. Inputs longer than `max_length` are truncated from the left. Requests are
  sorted by length (longest first) and scored in batches, right-padded; the softmax runs over the
  whole padded vocabulary (as NeoX's own eval adapter does).
- `loglikelihood_rolling`: lm-eval's rolling windows of `max_length` tokens, end-of-text prefix.
- `generate_until`: greedy (or sampled, if a task asks) decoding with a KV cache, batched over
  requests whose contexts have the same length; stops at any `until` string or end-of-text.

The end-of-text id is `<|endoftext|>` or, for Llama-style tokenizers, `</s>` (see tokenizer.py).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from pathlib import Path

import torch

from neox_progressive.errors import UserError
from neox_progressive.eval.harness import import_lm_eval
from neox_progressive.eval.member import TrainedMember
from neox_progressive.eval.scoring import target_logprobs
from neox_progressive.model import Transformer
from neox_progressive.progress import progress_bar
from neox_progressive.tokenizer import Tokenizer

lm_eval = import_lm_eval()
from lm_eval.api.model import LM  # noqa: E402

MODEL_NAME = "neox-progressive"
DEFAULT_BATCH_SIZE = 8


def _device(name: str | None) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class NeoXProgressiveLM(LM):
    """An lm-eval `LM` over a NeoX checkpoint (or an already built reference model + tokenizer).

    Args:
        checkpoint: NeoX save dir (with `latest`) or a global_stepN dir.
        config: the member's NeoX YAML file(s): a list, or one string with paths joined by os.pathsep (":").
        model, tokenizer: instead of checkpoint/config, a built `Transformer` and `Tokenizer`.
        batch_size: requests scored per forward pass ("auto" means the default, 8).
        device: "cpu", "cuda", "cuda:1" or "auto".
        dtype: "fp32", "bf16" or "fp16" for the weights.
        max_length: context window in tokens (default: the config's max_position_embeddings).
        max_gen_toks: default generation budget of generate_until.
        progress: show this model's progress bars.
    """

    def __init__(self, checkpoint: str | None = None, config: str | list[str] | None = None, *,
                 model: Transformer | None = None, tokenizer: Tokenizer | None = None,
                 batch_size: int | str | None = DEFAULT_BATCH_SIZE, device: str | None = "auto", dtype: str = "fp32",
                 max_length: int | None = None, max_gen_toks: int = 256, seed: int = 1234, progress: bool = True,
                 **_ignored):
        super().__init__()
        self._device = _device(device)
        if model is None:
            if not checkpoint or not config:
                raise UserError(f"the {MODEL_NAME} lm-eval model needs checkpoint=DIR and config=FILE.yml[:FILE2.yml]")
            configs = config if isinstance(config, (list, tuple)) else str(config).split(":")
            member = TrainedMember(name=Path(checkpoint).name, checkpoint=Path(checkpoint), configs=[Path(c) for c in configs])
            tokenizer = member.tokenizer
            model = member.load(self._device, dtype)
        if tokenizer is None:
            raise UserError(f"the {MODEL_NAME} lm-eval model needs the member's tokenizer (config: tokenizer_type, vocab_file)")
        if tokenizer.eod is None:
            raise UserError(f"tokenizer {tokenizer.path} has no end-of-text token (<|endoftext|> or </s>); lm-eval needs "
                            "one as the context of empty-context requests and as a stop token")
        self.model = model.to(self._device).eval()
        self.tok = tokenizer
        self._batch_size = DEFAULT_BATCH_SIZE if batch_size in (None, "auto") else int(str(batch_size).split(":")[0])
        self._max_length = int(max_length or model.shape.max_position_embeddings)
        self._max_gen_toks = int(max_gen_toks)
        self._generator = torch.Generator(device=self._device).manual_seed(int(seed))
        self._progress = str(progress).lower() not in ("false", "0", "no")

    # ---- lm-eval plumbing --------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eod

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(self.tok.path)

    def tok_encode(self, text: str, **_) -> list[int]:
        return self.tok.encode(text)

    def tok_decode(self, ids, **_) -> str:
        return self.tok.decode(list(ids))

    # ---- scoring -----------------------------------------------------------------------------------
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx):]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for context, continuation in (r.args for r in requests):
            if context == "":
                pairs.append(([self.eot_token_id], self.tok_encode(continuation)))
            else:
                pairs.append(self._encode_pair(context, continuation))
        return self._score(pairs, disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils
        windows, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            rolling = utils.get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.eot_token_id,
                                                      max_seq_len=self.max_length, context_len=1)
            for w in map(utils.make_disjoint_window, rolling):
                windows.append(w)
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._score(windows, disable_tqdm)):
            totals[i] += logp
        return totals

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is the greedy one) per (context ids, continuation ids)."""
        inputs = []
        for ctx, cont in pairs:
            if not cont:
                raise UserError("an lm-eval request has an empty continuation after tokenization; the task's target is empty")
            inp = (ctx + cont)[-(self.max_length + 1):]          # the last token is only a target
            inputs.append(inp)
        order = sorted(range(len(pairs)), key=lambda i: -len(inputs[i]))
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        quiet = disable_tqdm or not self._progress
        for s in progress_bar(range(0, len(order), self.batch_size), quiet=quiet, desc="loglikelihood", unit="batch"):
            idx = order[s:s + self.batch_size]
            width = len(inputs[idx[0]]) - 1
            x = torch.zeros(len(idx), width, dtype=torch.long)
            y = torch.zeros(len(idx), width, dtype=torch.long)
            for row, i in enumerate(idx):
                seq = inputs[i]
                x[row, :len(seq) - 1] = torch.tensor(seq[:-1])
                y[row, :len(seq) - 1] = torch.tensor(seq[1:])
            logp, greedy = target_logprobs(self.model, x.to(self.device), y.to(self.device))
            for row, i in enumerate(idx):
                n_in, n_cont = len(inputs[i]) - 1, len(pairs[i][1])
                span = slice(n_in - n_cont, n_in)
                out[i] = (float(logp[row, span].double().sum()), bool(greedy[row, span].all()))
        return out  # type: ignore[return-value]

    # ---- generation --------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[tuple, list[int]] = defaultdict(list)
        prepared = []
        for i, (context, gen_kwargs) in enumerate(r.args for r in requests):
            kwargs = copy.deepcopy(gen_kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self._max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0) if kwargs.pop("do_sample", False) else 0.0
            ids = self.tok_encode(context)[-max(self.max_length - max_new, 1):] or [self.eot_token_id]
            prepared.append((ids, until, max_new))
            groups[(len(ids), max_new, temperature, tuple(until))].append(i)
        results: list[str] = [""] * len(prepared)
        bar = progress_bar(total=len(prepared), quiet=disable_tqdm or not self._progress, desc="generate_until", unit="request")
        for (_, max_new, temperature, until), members in sorted(groups.items(), key=lambda kv: -kv[0][0]):
            for s in range(0, len(members), self.batch_size):
                idx = members[s:s + self.batch_size]
                texts = self._generate([prepared[i][0] for i in idx], list(until), max_new, temperature)
                for i, text in zip(idx, texts):
                    results[i] = text
                bar.update(len(idx))
        bar.close()
        return results

    @torch.no_grad()
    def _generate(self, contexts: list[list[int]], until: list[str], max_new: int, temperature: float) -> list[str]:
        """Decode a batch of equal-length contexts together; each row stops at an `until` string or end-of-text."""
        cache = self.model.new_cache()
        x = torch.tensor(contexts, dtype=torch.long, device=self.device)
        new: list[list[int]] = [[] for _ in contexts]
        done = [False] * len(contexts)
        logits = self.model(x, cache)[:, -1].float()
        for _ in range(max_new):
            if temperature > 0:
                nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=self._generator)[:, 0]
            else:
                nxt = logits.argmax(-1)
            for row, tok in enumerate(nxt.tolist()):
                if done[row]:
                    continue
                if tok == self.eot_token_id:
                    done[row] = True
                    continue
                new[row].append(tok)
                if until and any(u in self.tok_decode(new[row]) for u in until):
                    done[row] = True
            if all(done):
                break
            logits = self.model(nxt[:, None], cache)[:, -1].float()
        texts = []
        for ids in new:
            text = self.tok_decode(ids)
            for u in until:
                text = text.split(u)[0]
            texts.append(text)
        return texts


def register() -> None:
    """Make `neox-progressive` a model name lm-eval knows (idempotent; both registry APIs)."""
    from lm_eval.api import registry
    try:
        existing = registry.get_model(MODEL_NAME)
    except Exception:  # noqa: BLE001 - unknown name: ValueError (0.4.1) or KeyError (later)
        existing = None
    if existing is None:
        registry.register_model(MODEL_NAME)(NeoXProgressiveLM)


register()
