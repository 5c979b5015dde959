"""A DeepSpeed PipelineModule shaped like GPT-NeoX's models (Llama shape and classic), for checkpoint tests on CPU.

Written from NEOX_FACTS.md (not from our `arch.py`), so it is an independent reading of the
layout: layer specs at NeoX's indices (0 embedding, 1 a function, 2..L+1 transformer layers,
L+2 a function, L+3 final norm, L+4 head), NeoX's parameter names, fused QKV rows per head
interleaved (MHA) or blocked [Q|K|V] (GQA), `mlp.linear1` = [up; gate], RMSNorm `scale` with eps
inside the rsqrt, rotate-half RoPE. Classic transformer (NEOX_FACTS section 11): torch LayerNorm
(`weight`, `bias`), plain `mlp.linear1` with GeLU, x + attn(ln1(x)) + mlp(ln2(x)) for gpt_j_residual,
learned `position_embeddings` beside the word embeddings. TP = PP = DP = 1 with `PipeModelDataParallelTopology`, so
DeepSpeed names the files `layer_XX-model_00-model_states.pt` like NeoX does.

    pipe = build_pipe(shape); engine = ds_engine(pipe)
    ds_load(engine, ckpt_dir)        # load_module_only, strict keys, as NeoX's finetune does
    logits = pipe_logits(pipe, tokens)
    ds_save(engine, out_dir, tag, client_state)
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from neox_progressive.config import ModelShape

_DIST = False


def init_dist() -> None:
    global _DIST
    if _DIST:
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    _DIST = True


class Norm(nn.Module):
    def __init__(self, h, eps):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(h))
        self.eps = eps

    def forward(self, x):
        return self.scale * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def make_norm(s: ModelShape) -> nn.Module:
    return nn.LayerNorm(s.hidden_size, eps=s.layernorm_eps) if s.norm == "layernorm" else Norm(s.hidden_size, s.rms_norm_eps)


class Embedding(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        self.word_embeddings = nn.Embedding(s.padded_vocab_size, s.hidden_size)
        if s.pos_emb == "learned":
            self.position_embeddings = nn.Embedding(s.max_position_embeddings, s.hidden_size)

    def forward(self, tokens):
        x = self.word_embeddings(tokens)
        if hasattr(self, "position_embeddings"):
            x = x + self.position_embeddings(torch.arange(tokens.shape[1]))
        return x


class Attention(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        self.s = s
        d = s.head_dim
        self.query_key_value = nn.Linear(s.hidden_size, (s.num_heads + 2 * s.num_kv_heads) * d, bias=s.attn_bias)
        self.dense = nn.Linear(s.hidden_size, s.hidden_size, bias=s.attn_bias)

    def forward(self, x):
        s, (b, t, _) = self.s, x.shape
        d, n, kv = s.head_dim, s.num_heads, s.num_kv_heads
        mixed = self.query_key_value(x)
        if kv == n:  # MHA: view(heads, 3*d), rows per head q, k, v
            q, k, v = mixed.view(b, t, n, 3 * d).split(d, dim=-1)
        else:        # GQA: [Q | K | V]
            q, k, v = mixed.split([n * d, kv * d, kv * d], dim=-1)
            q, k, v = q.reshape(b, t, n, d), k.reshape(b, t, kv, d), v.reshape(b, t, kv, d)
        rd = s.rotary_dims
        inv = 1.0 / (s.rotary_emb_base ** (torch.arange(0, rd, 2).float() / rd))
        ang = torch.arange(t).float()[:, None] * inv[None]
        cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]

        def rope(z):
            r, rest = z[..., :rd], z[..., rd:]
            rot = torch.cat([-r[..., rd // 2:], r[..., :rd // 2]], -1)
            return torch.cat([r * cos + rot * sin, rest], -1)

        if s.pos_emb == "rotary":
            q, k = rope(q), rope(k)
        k = k.repeat_interleave(n // kv, dim=2)
        v = v.repeat_interleave(n // kv, dim=2)
        att = torch.einsum("bind,bjnd->bnij", q, k) / d**0.5
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        y = torch.einsum("bnij,bjnd->bind", att, v).reshape(b, t, n * d)
        return self.dense(y)


class MLP(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        self.gated = s.activation == "swiglu"
        self.tanh = s.gelu_approx == "tanh"
        self.linear1 = nn.Linear(s.hidden_size, (2 if self.gated else 1) * s.ffn_size, bias=s.mlp_bias)
        self.linear2 = nn.Linear(s.ffn_size, s.hidden_size, bias=s.mlp_bias)

    def forward(self, x):
        if not self.gated:
            y = self.linear1(x)
            if self.tanh:  # NeoX's bias_gelu (activations.py constants)
                return self.linear2(y * 0.5 * (1.0 + torch.tanh(0.79788456 * y * (1 + 0.044715 * y * y))))
            return self.linear2(y * 0.5 * (1.0 + torch.erf(y * 0.70710678)))
        up, gate = self.linear1(x).chunk(2, dim=-1)
        return self.linear2(F.silu(gate) * up)


class Layer(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        self.parallel = s.parallel_residual
        self.input_layernorm = make_norm(s)
        self.attention = Attention(s)
        self.post_attention_layernorm = make_norm(s)
        self.mlp = MLP(s)

    def forward(self, x):
        if self.parallel:
            return x + self.attention(self.input_layernorm(x)) + self.mlp(self.post_attention_layernorm(x))
        x = x + self.attention(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class FinalNorm(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        self.norm = make_norm(s)

    def forward(self, x):
        return self.norm(x)


class Head(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        self.final_linear = nn.Linear(s.hidden_size, s.padded_vocab_size, bias=False)

    def forward(self, x):
        return self.final_linear(x)


def _identity(x):
    return x


def build_pipe(shape: ModelShape, seed: int = 0):
    """A PipelineModule at NeoX's layer indices with NeoX's parameter names (TP=PP=1)."""
    init_dist()
    from deepspeed.pipe import LayerSpec, PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    torch.manual_seed(seed)
    specs = [LayerSpec(Embedding, shape), _identity]
    specs += [LayerSpec(Layer, shape) for _ in range(shape.num_layers)]
    specs += [_identity, LayerSpec(FinalNorm, shape), LayerSpec(Head, shape)]
    topo = PipeModelDataParallelTopology(num_pp=1, num_mp=1, num_dp=1)
    pipe = PipelineModule(layers=specs, topology=topo, loss_fn=None, partition_method="uniform")
    with torch.no_grad():  # random, but not tiny, so that layout mistakes show in the logits
        for p in pipe.parameters():
            p.normal_(0, 0.3)
    return pipe


def ds_engine(pipe):
    import deepspeed

    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
           "optimizer": {"type": "SGD", "params": {"lr": 0.0}}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=pipe, config=cfg, model_parameters=list(pipe.parameters()))
    return engine


def ds_load(engine, ckpt_dir) -> None:
    """What NeoX does with `finetune: true`: module only, strict keys, no optimizer or scheduler."""
    path, _ = engine.load_checkpoint(str(ckpt_dir), load_module_only=True, load_optimizer_states=False,
                                     load_lr_scheduler_states=False, load_module_strict=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed loaded nothing from {ckpt_dir}")


def ds_save(engine, out_dir, tag: str, client_state: dict | None = None) -> None:
    engine.save_checkpoint(str(out_dir), tag=tag, client_state=client_state or {})


@torch.no_grad()
def pipe_logits(pipe, tokens: torch.Tensor) -> torch.Tensor:
    x = tokens
    for fn in pipe.forward_funcs:
        x = fn(x)
    return x
