"""Evaluation of a model family (paper Sections 4-5, App. F).

- `kl.examples_kl(small, large, examples)`: App. F KL over examples of any lengths, both directions (headline
  KL(p_small || p_large), our reading), top-1 agreement, per-example values; `kl.pair_kl` over ready batches.
- `examples.held_out(...)`: the perplexity windows, KL documents and speculative-decoding prompts of an evaluation.
- `findings.comparisons(results)`: which of the paper's consistency findings (Tables 4, 5) a report reproduces.
- `specdec.speculative_generate(draft, target, prompt, n)`: Leviathan et al. 2023, greedy and sampled.
- `perplexity.perplexity(model, windows)`: NeoX's validation loss / perplexity on held-out windows.
- `lm.NeoXProgressiveLM`: the lm-eval model `neox-progressive` (lm-eval 0.4.1 and later 0.4.x).
- `harness.TaskSet`: lm-eval tasks offline (local YAML + JSONL; clear errors for missing datasets).
- `tasks.write_example_tasks(dir)`: offline example tasks built from stdlib docstrings.
- `evaluation.evaluate_family(members, settings)` + `report.write_report(results, dir)`: the `eval` verb.
- `neox_hook.kl_to_previous`: the function NeoX's `eval_hook` (patches/0003) calls during training.

Modules that need lm-eval (`lm`, `harness`) import it only when used.
"""
