"""The family file: one YAML that describes a model family (members, budgets, LR, data, NeoX keys).

Format (every block is documented in configs/neox/README.md; unknown keys are errors):

    name: paper_2x_chinchilla
    mode: progressive                # default for plan/generate-configs: progressive | independent
    output_dir: /checkpoints/family  # checkpoints go to <output_dir>/<mode>/<member>/...
    model: {vocab_size: 50257, seq_length: 1024, mlp_multiple_of: 64, ...}   # shared shape keys
    members:                         # increasing size
      - {name: 1B, hidden_size: 2048, ffn_size: 7168, num_layers: 18, num_heads: 16, global_batch: 960}
    budget: {tokens_per_param: 40, params: computed, keep: batch, fixed_data: false}   # + fixed_data_order
    training: {num_gpus: 64, micro_batch: 5, precision: bfloat16, lr: {rule: fixed, max: 3.0e-4}}   # size_scaled: by
    data: {train: /data/train_text_document, valid: /data/valid_text_document}
    expansion: {method: aki, ...}    # passed on to the expansion step
    eval: {tasks: [...], ...}        # passed on to the eval step
    wandb: {enabled: false, project: ..., group: ...}
    shared: {tokenizer_type: ..., ...}   # NeoX keys merged into every stage YAML

Relative paths (output_dir, data prefixes, path-valued NeoX keys of `shared`) resolve against the
family file's directory. `ffn_size` is the real FFN width F (SwiGLU: HF Llama `intermediate_size`; GeLU:
linear1's rows); the NeoX `intermediate_size` (3F for SwiGLU, F for GeLU) is derived by `ModelShape.to_neox()`.
The architecture is shared by all members (`model:` norm, activation, gelu_approx, parallel_residual,
pos_emb; default: the Llama shape); configs/neox/pythia_family.yml is NeoX's classic transformer.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from neox_progressive.config import ModelShape, pad_vocab
from neox_progressive.errors import UserError

MODES = ("progressive", "independent")
LR_RULES = ("fixed", "per_member", "size_scaled")
LR_SCALE_BY = ("params", "stage")
BUDGET_KEEP = ("batch", "updates")
FIXED_DATA_ORDERS = ("epochs", "shuffled")
# NeoX keys of `shared` that hold paths (resolved against the family file's directory).
PATH_KEYS = ("vocab_file", "merge_file", "log_dir", "tensorboard_dir", "hostfile")


@dataclass(frozen=True)
class ModelDefaults:
    """Shape keys every member shares (see config.ModelShape for their meaning)."""

    vocab_size: int
    """The tokenizer's size before padding (GPT-2: 50257)."""
    seq_length: int
    make_vocab_size_divisible_by: int = 128
    mlp_multiple_of: int = 1
    max_position_embeddings: int | None = None
    rotary_pct: float = 1.0
    rotary_emb_base: int = 10000
    rms_norm_eps: float = 1.0e-5
    attn_bias: bool = False
    mlp_bias: bool = False
    model_parallel_size: int = 1
    pipe_parallel_size: int = 1
    norm: str = "rmsnorm"
    """rmsnorm (Llama shape) or layernorm (NeoX's classic transformer, weight and bias)."""
    layernorm_eps: float = 1.0e-5
    activation: str = "swiglu"
    """swiglu or gelu (plain linear1 -> GeLU -> linear2)."""
    gelu_approx: str = "erf"
    """erf, or tanh (NeoX `bias_gelu_fusion: true`, as the Pythia configs)."""
    parallel_residual: bool = False
    """NeoX `gpt_j_residual`: x + attn(ln1(x)) + mlp(ln2(x))."""
    pos_emb: str = "rotary"
    """rotary or learned."""

    def architecture(self) -> dict:
        """The ModelShape architecture fields; the epsilon of the norm not in use stays at ModelShape's default."""
        defaults = {f.name: f.default for f in fields(ModelShape)}
        rms = self.norm == "rmsnorm"
        return dict(norm=self.norm, activation=self.activation, parallel_residual=self.parallel_residual,
                    pos_emb=self.pos_emb, gelu_approx=self.gelu_approx if self.activation == "gelu" else defaults["gelu_approx"],
                    rms_norm_eps=self.rms_norm_eps if rms else defaults["rms_norm_eps"],
                    layernorm_eps=defaults["layernorm_eps"] if rms else self.layernorm_eps)


@dataclass(frozen=True)
class MemberSpec:
    """One member as the family file describes it (shape, batch, budget), smallest first."""

    name: str
    hidden_size: int
    ffn_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    global_batch: int
    model: ModelDefaults
    nominal_params: float | None = None
    scratch_tokens: int | None = None
    max_lr: float | None = None
    micro_batch: int | None = None
    num_gpus: int | None = None
    model_parallel_size: int | None = None
    pipe_parallel_size: int | None = None
    init_hf: str | None = None
    """`init: {hf: DIR}` (first member only): start from this Hugging Face model (import-hf), not from scratch."""
    init_train: bool = False
    """`init: {train: true}`: train the imported model for the member's budget (default: take it as it is)."""

    def shape(self) -> ModelShape:
        """The member's NeoX shape (padded vocab from `model.vocab_size`)."""
        m = self.model
        tp = self.model_parallel_size or m.model_parallel_size
        pp = self.pipe_parallel_size if self.pipe_parallel_size is not None else m.pipe_parallel_size
        return ModelShape(
            hidden_size=self.hidden_size, num_layers=self.num_layers, num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads, ffn_size=self.ffn_size,
            padded_vocab_size=pad_vocab(m.vocab_size, m.make_vocab_size_divisible_by, tp), vocab_size=m.vocab_size,
            make_vocab_size_divisible_by=m.make_vocab_size_divisible_by, mlp_multiple_of=m.mlp_multiple_of,
            seq_length=m.seq_length, max_position_embeddings=m.max_position_embeddings or m.seq_length,
            rotary_pct=m.rotary_pct, rotary_emb_base=m.rotary_emb_base,
            attn_bias=m.attn_bias, mlp_bias=m.mlp_bias, tp=tp, pp=pp, **m.architecture(),
        )


@dataclass(frozen=True)
class Budget:
    tokens_per_param: float | None = None
    """Scratch tokens = this x parameters (Chinchilla 20, 2x Chinchilla 40); else members give scratch_tokens."""
    params: str = "computed"
    """computed: from the shapes (embedding and untied head included); nominal: each member's nominal_params."""
    fixed_data: bool = False
    """Paper Section 4.3 "+Fixed Data": unique tokens capped at the largest member's scratch budget."""
    keep: str = "batch"
    """How a progressive member trains fewer tokens than from scratch (our reading; App. A gives every size 40700
    updates at its batch, which fits the scratch budgets only): `batch` keeps the member's global batch and trains
    fewer iterations; `updates` keeps the member's scratch iteration count and shrinks its global batch."""
    fixed_data_order: str = "epochs"
    """With `fixed_data`, the order in which a member whose window wraps reads its tokens: `epochs` (the paper's
    Fig. 3: the rest of the first epoch, then the second epoch; each part shuffled within itself) or `shuffled`
    (NeoX's default: all of the member's samples shuffled together, so the repeated tokens spread through the stage)."""


@dataclass(frozen=True)
class LRSpec:
    rule: str = "fixed"
    """fixed (`max` for all) | per_member (each member's max_lr) | size_scaled (paper 4.4: from `smallest` for the
    first member to `largest` for the last, linear in `by`)."""
    by: str = "params"
    """size_scaled only, our reading of "linearly decreasing ... in accordance with the increase in model size":
    `params` (linear in the members' parameter counts) or `stage` (linear in the member's index)."""
    max: float | None = None
    smallest: float | None = None
    largest: float | None = None
    min_ratio: float | None = 0.1
    min: float | None = None
    warmup: float = 0.01
    decay_style: str = "cosine"


@dataclass(frozen=True)
class Training:
    num_gpus: int
    micro_batch: int
    lr: LRSpec
    precision: str = "bfloat16"
    zero_stage: int = 1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1.0e-8
    weight_decay: float = 0.1
    gradient_clipping: float = 1.0
    checkpoint_interval: int = 1000
    eval_interval: int = 1000
    eval_iters: int = 10
    log_interval: int = 10
    seed: int = 1234
    init_method: str = "small_init"
    output_layer_init_method: str = "wang_init"


@dataclass(frozen=True)
class FamilyData:
    """The family file's `data:` block: the datasets every member's windows are cut from."""

    train: str
    """NeoX mmap prefix of the whole training token stream; member windows are cut from it."""
    valid: str
    test: str | None = None
    prepare: dict = field(default_factory=dict)
    """Optional source for `prepare-data --family` (carried through, see the runner)."""


@dataclass(frozen=True)
class WandbSpec:
    enabled: bool = False
    project: str | None = None
    group: str | None = None
    team: str | None = None
    host: str | None = None
    neox_exact_group: bool = False
    """Write `wandb_group_exact: true`, so that NeoX patched with patches/0004-wandb-group-exact keeps the group
    name as configured (upstream NeoX appends a random suffix per launch, splitting a family into groups)."""


@dataclass(frozen=True)
class Family:
    name: str
    path: Path
    mode: str
    output_dir: Path
    model: ModelDefaults
    members: list[MemberSpec]
    budget: Budget
    training: Training
    data: FamilyData
    wandb: WandbSpec
    expansion: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    shared: dict = field(default_factory=dict)

    def member(self, name: str) -> MemberSpec:
        for m in self.members:
            if m.name == name:
                return m
        from neox_progressive.family.fields import did_you_mean
        names = [m.name for m in self.members]
        raise UserError(f"family {self.name!r} has no member {name!r}{did_you_mean(name, names)}; members: {names}")

    def stage_yaml(self, out_dir: str | Path, member: str) -> Path:
        """Where `generate_configs(family, out_dir, mode)` writes the member's stage YAML."""
        return Path(out_dir) / f"stage_{self.member(member).name}.yml"
