"""One family member to evaluate: a NeoX checkpoint plus the YAML config(s) it was trained with.

Loads through `CheckpointReader` (any TP degree, pipeline or sequential format) into the
reference model `Transformer`. Members that are compared token by token (KL, speculative
decoding) must share one tokenizer: `check_same_vocabulary` refuses pairs that do not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from neox_progressive.config import ModelShape, merge_neox_configs
from neox_progressive.errors import UserError
from neox_progressive.io.reader import CheckpointReader
from neox_progressive.model import Transformer
from neox_progressive.tokenizer import Tokenizer, config_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainedMember:
    """A trained family member: a NeoX checkpoint plus the YAML config(s) it was trained with."""

    name: str
    checkpoint: Path
    configs: list[Path]
    family: str = "family"
    """Which family the member belongs to (e.g. progressive, independent)."""
    _model: Transformer | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, spec: str) -> TrainedMember:
        """`[FAMILY/]NAME=CHECKPOINT:CONFIG.yml[,CONFIG2.yml]`."""
        name, sep, rest = spec.partition("=")
        ckpt, sep2, cfgs = rest.rpartition(":")
        if not sep or not sep2 or not name or not ckpt or not cfgs:
            raise UserError(f"--member {spec!r}: expected [FAMILY/]NAME=CHECKPOINT_DIR:CONFIG.yml[,CONFIG2.yml], "
                            "e.g. progressive/1B=runs/fam/progressive/1B/checkpoints:configs/1B.yml")
        family, _, name = name.rpartition("/")
        return cls(name=name, checkpoint=Path(ckpt), configs=[Path(c) for c in cfgs.split(",") if c],
                   family=family or "family")

    @property
    def label(self) -> str:
        return f"{self.family}/{self.name}"

    @cached_property
    def config(self) -> dict[str, Any]:
        for c in self.configs:
            if not c.is_file():
                raise UserError(f"member {self.label}: config file {str(c)!r} does not exist")
        return merge_neox_configs(self.configs)

    @cached_property
    def reader(self) -> CheckpointReader:
        if not self.checkpoint.exists():
            raise UserError(f"member {self.label}: checkpoint {str(self.checkpoint)!r} does not exist; pass the NeoX "
                            "save dir (with `latest`) or a global_stepN dir")
        shape = ModelShape.from_neox(self.config, base_dir=self.configs[0].parent)
        return CheckpointReader(self.checkpoint, shape)

    @property
    def shape(self) -> ModelShape:
        return self.reader.shape

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return config_tokenizer(self.config, base_dir=self.configs[0].parent)

    def has_tokenizer(self) -> bool:
        try:
            self.tokenizer  # noqa: B018
            return True
        except UserError:
            return False

    @property
    def vocab_size(self) -> int:
        """The real (unpadded) vocabulary if the tokenizer is here, else the padded one."""
        return self.shape.vocab_size or self.shape.padded_vocab_size

    def load(self, device: str | torch.device = "cpu", dtype: str = "fp32") -> Transformer:
        if self._model is None:
            sd = {k: v.to(device=device, dtype=DTYPES[dtype]) for k, v in self.reader.state_dict().items()}
            self._model = Transformer.from_state_dict(self.shape, sd).to(device)
        return self._model

    def unload(self) -> None:
        self._model = None

    def describe(self) -> dict[str, Any]:
        s = self.shape
        return {"name": self.name, "family": self.family, "checkpoint": str(self.checkpoint),
                "configs": [str(c) for c in self.configs], "iteration": self.reader.iteration,
                "params": s.param_count(), "hidden_size": s.hidden_size, "num_layers": s.num_layers,
                "num_heads": s.num_heads, "num_kv_heads": s.num_kv_heads, "ffn_size": s.ffn_size,
                "padded_vocab_size": s.padded_vocab_size, "seq_length": s.seq_length}


def check_same_vocabulary(a: TrainedMember, b: TrainedMember) -> int:
    """The vocabulary size two members are compared over; UserError if their tokenizers differ."""
    if a.has_tokenizer() and b.has_tokenizer():
        ta, tb = a.tokenizer, b.tokenizer
        if ta.identity() != tb.identity():
            raise UserError(
                f"members {a.label} and {b.label} use different tokenizers ({ta.kind} {ta.path}, {ta.vocab_size} tokens vs "
                f"{tb.kind} {tb.path}, {tb.vocab_size} tokens); KL and speculative decoding compare next-token "
                "distributions, so both members need the same tokenizer")
        return ta.vocab_size
    keys = ("tokenizer_type", "vocab_file")
    va, vb = ({k: str(m.config.get(k)) for k in keys} for m in (a, b))
    if Path(va["vocab_file"]).name != Path(vb["vocab_file"]).name or va["tokenizer_type"].lower() != vb["tokenizer_type"].lower():
        raise UserError(f"members {a.label} and {b.label} name different tokenizers ({va} vs {vb}); KL and "
                        "speculative decoding need both members on the same tokenizer")
    if a.shape.padded_vocab_size != b.shape.padded_vocab_size:
        raise UserError(
            f"members {a.label} and {b.label} have {a.shape.padded_vocab_size} and {b.shape.padded_vocab_size} vocabulary "
            "rows and their tokenizer file is not here to tell the real vocabulary; put the tokenizer file where "
            "vocab_file points so that only the real tokens are compared")
    return a.shape.padded_vocab_size
