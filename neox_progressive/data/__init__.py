"""Training data in GPT-NeoX's formats: the mmap indexed dataset, per-member token windows,
tokenizers, and a real-text corpus that needs no download.

Public API (stable, used by the family runner and the builtin engine):
- `MMapDataset(prefix)`: read a NeoX `.bin`/`.idx` dataset; `write_dataset(prefix, docs, ...)`,
  `DatasetBuilder`: write one.
- `cut_windows(src_prefix, windows, out_prefix)`: a member's token window(s) as its own dataset;
  `cut_member_windows(src_prefix, plan_members)` for every member of a family plan;
  `neox_window_tokens(train_iters, global_batch, seq_length)`: how long a window must be for NeoX.
- `stdlib_corpus(n_chars)`: Python standard-library docstrings as documents.
- `train_sentencepiece(texts, vocab_size, out)` (reading a tokenizer: neox_progressive.tokenizer).
"""

from neox_progressive.data.corpus import read_documents, stdlib_corpus
from neox_progressive.data.mmap_dataset import DatasetBuilder, MMapDataset, best_fitting_dtype, dataset_exists, write_dataset
from neox_progressive.data.tokenizer import train_sentencepiece
from neox_progressive.data.windows import cut_member_windows, cut_windows, neox_window_tokens

__all__ = [
    "DatasetBuilder", "MMapDataset", "best_fitting_dtype", "cut_member_windows",
    "cut_windows", "dataset_exists", "neox_window_tokens", "read_documents", "stdlib_corpus",
    "train_sentencepiece", "write_dataset",
]
