"""What an evaluation does (`EvalSettings`): the `eval` verb's flags and the family file's `eval:` block.

Torch-free, so that `eval --help` and the family file load without it. The flags of `eval` are
generated from these fields (cli_options.py): the field docstrings are their help.
"""

from __future__ import annotations

from dataclasses import dataclass, field

STEPS = ("ppl", "tasks", "kl", "specdec")
DATA, SPECDEC, TASKS = "held-out data", "speculative decoding", "lm-eval tasks"


@dataclass
class EvalSettings:
    data: str | None = field(default=None, metadata={"group": DATA})
    """NeoX mmap prefix of held-out data (valid_data_paths, without .bin/.idx)."""
    text: str | None = field(default=None, metadata={"group": DATA})
    """Or a .jsonl ('text' key) / text file, tokenized with the members' tokenizer."""
    seq_length: int | None = field(default=None, metadata={"group": DATA})
    """Tokens per window, and the truncation of KL documents (default: the smallest member seq_length)."""
    ppl_windows: int = field(default=64, metadata={"group": DATA})
    """Windows for perplexity."""
    kl_examples: int = field(default=64, metadata={"group": DATA})
    """Examples for KL (the paper: 10,000)."""
    kl_on: str = field(default="documents", metadata={"group": DATA, "choices": ("documents", "windows")})
    """What a KL example is: validation documents sampled with the seed, each truncated to the sequence length
    (App. F, our reading), or the first windows of the token stream."""
    batch_size: int = field(default=4, metadata={"group": DATA})
    """Sequences per forward pass (perplexity, KL, lm-eval)."""
    prompts: int = field(default=16, metadata={"group": SPECDEC})
    """Speculative decoding prompts, sampled with the seed from validation documents (the paper: 1,000)."""
    prompt_tokens: int = field(default=32, metadata={"group": SPECDEC})
    """Tokens of each prompt."""
    new_tokens: int = field(default=64, metadata={"group": SPECDEC})
    """Tokens generated per prompt."""
    draft_len: int = field(default=8, metadata={"group": SPECDEC})
    """Draft tokens per round (the paper: 8)."""
    modes: tuple[str, ...] = field(default=("greedy", "sampled"), metadata={"group": SPECDEC, "csv": True})
    """Decoding modes: greedy, sampled or both."""
    temperature: float = field(default=1.0, metadata={"group": SPECDEC})
    """Sampling temperature of the sampled mode."""
    seed: int = 0
    """Which documents KL and the prompts sample, and the sampled mode's random draws."""
    tasks: list[str] = field(default_factory=list, metadata={"group": TASKS, "csv": True})
    """lm-eval task names."""
    include_paths: list[str] = field(default_factory=list, metadata={"group": TASKS, "flag": "--include-path",
                                                                      "repeat": True})
    """Directory of local task YAMLs, repeatable."""
    limit: int | None = field(default=None, metadata={"group": TASKS})
    """Documents per task (default: all)."""
    num_fewshot: int | None = field(default=None, metadata={"group": TASKS})
    """Few-shot examples per task (default: the task's own)."""
    bootstrap_iters: int = field(default=100, metadata={"flag": None})
    """lm-eval's bootstrap iterations for the standard errors."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    dtype: str = field(default="fp32", metadata={"choices": ("fp32", "bf16", "fp16")})
    """Weights' dtype during evaluation."""
    vocab_chunk: int | None = field(default=None, metadata={"flag": None})
    """KL over the vocabulary in slices of this many entries (memory), else at once."""
    skip: tuple[str, ...] = field(default=(), metadata={"csv": True})
    """Steps to skip: ppl, tasks, kl, specdec."""
    quiet: bool = False
    """No progress bars."""

    def wants(self, step: str) -> bool:
        return step not in self.skip and (step != "tasks" or bool(self.tasks))
