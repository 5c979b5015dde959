"""Reference forward pass of the models GPT-NeoX trains, in plain PyTorch.

Matches megatron/model/{transformer,norms,positional_embeddings,word_embeddings}.py for the two
architectures this plugin handles, and so transformers' LlamaForCausalLM (Llama shape) and
GPTNeoXForCausalLM (classic transformer, Pythia) on the same weights (tests/test_hf*.py):

    x = E[tokens] (+ P[positions] with learned positions)
    sequential residual (Llama; gpt_j_residual: false):
        x = x + Wo . attn(rope(Wq n1(x)), rope(Wk n1(x)), Wv n1(x))
        x = x + mlp(n2(x))
    parallel residual (gpt_j_residual: true, GPT-J / Pythia):
        x = x + Wo . attn(...n1(x)...) + mlp(n2(x))      (two norms of the same x)
    logits = H . norm(x)

- RMSNorm: scale * x * rsqrt(mean(x^2) + eps); LayerNorm: (x - mean) / sqrt(var + eps) * w + b;
  both computed in fp32 (eps inside the root).
- MLP: SwiGLU Wdown . (silu(Wgate x) * Wup x), or GeLU Wdown . gelu(Wup x + b) + b with the erf
  form or its tanh approximation (NeoX `bias_gelu_fusion`).
- RoPE: rotate-half convention on the first `rotary_dims` of each head (`rotary_pct`), the rest
  of the head passes through; inv_freq = 1 / base^(2i/dim); query head j uses KV head j // (heads / kv_heads).
- Parameter names are the logical names of `arch.py`, so a logical state dict loads as is.

Used by tests, evaluation, the expansion checks and the builtin training engine.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from neox_progressive.config import ModelShape


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x).to(dtype)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        y = F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


def make_norm(shape: ModelShape) -> nn.Module:
    norm = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}[shape.norm]
    return norm(shape.hidden_size, shape.norm_eps)


class Rotary(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        self.dims = shape.rotary_dims
        inv_freq = 1.0 / (shape.rotary_emb_base ** (torch.arange(0, self.dims, 2).float() / self.dims))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x, positions):
        # x: (B, nh, T, d); positions: (T,)
        freqs = torch.outer(positions.float(), self.inv_freq)          # (T, dims/2)
        emb = torch.cat([freqs, freqs], dim=-1)                          # (T, dims)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        rot, keep = x[..., :self.dims], x[..., self.dims:]
        half = self.dims // 2
        rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)  # rotate_half
        return torch.cat([rot * cos + rotated * sin, keep], dim=-1)


class Attention(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        h, d = shape.hidden_size, shape.head_dim
        self.nh, self.nkv, self.d = shape.num_heads, shape.num_kv_heads, d
        self.q = nn.Linear(h, self.nh * d, bias=shape.attn_bias)
        self.k = nn.Linear(h, self.nkv * d, bias=shape.attn_bias)
        self.v = nn.Linear(h, self.nkv * d, bias=shape.attn_bias)
        self.o = nn.Linear(self.nh * d, h, bias=shape.attn_bias)
        self.rotary = Rotary(shape) if shape.pos_emb == "rotary" else None

    def forward(self, x, positions, cache=None):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.nh, self.d).transpose(1, 2)       # (B, nh, T, d)
        k = self.k(x).view(B, T, self.nkv, self.d).transpose(1, 2)      # (B, nkv, T, d)
        v = self.v(x).view(B, T, self.nkv, self.d).transpose(1, 2)      # (B, nkv, T, d)
        if self.rotary is not None:
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        if cache is not None:                                            # incremental decoding
            k, v = cache.update(k, v)                                    # (B, nkv, S, d)
        group = self.nh // self.nkv
        k = k.repeat_interleave(group, dim=1)                            # (B, nh, S, d)
        v = v.repeat_interleave(group, dim=1)
        S = k.shape[2]
        # causal: query at absolute position p sees keys 0..p
        mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1 / math.sqrt(self.d))
        y = y.transpose(1, 2).reshape(B, T, self.nh * self.d)            # (B, T, nh*d)
        return self.o(y)


class MLP(nn.Module):
    """SwiGLU (gate, up, down) for the Llama shape."""

    def __init__(self, shape: ModelShape):
        super().__init__()
        h, f = shape.hidden_size, shape.ffn_size
        self.gate = nn.Linear(h, f, bias=shape.mlp_bias)
        self.up = nn.Linear(h, f, bias=shape.mlp_bias)
        self.down = nn.Linear(f, h, bias=shape.mlp_bias)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class GeluMLP(nn.Module):
    """NeoX's plain MLP: linear1 (up), GeLU, linear2 (down)."""

    def __init__(self, shape: ModelShape):
        super().__init__()
        h, f = shape.hidden_size, shape.ffn_size
        self.up = nn.Linear(h, f, bias=shape.mlp_bias)
        self.down = nn.Linear(f, h, bias=shape.mlp_bias)
        self.approximate = "tanh" if shape.gelu_approx == "tanh" else "none"

    def forward(self, x):
        return self.down(F.gelu(self.up(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        self.parallel = shape.parallel_residual
        self.attn_norm = make_norm(shape)
        self.attn = Attention(shape)
        self.mlp_norm = make_norm(shape)
        self.mlp = MLP(shape) if shape.gated else GeluMLP(shape)

    def forward(self, x, positions, cache=None):
        if self.parallel:  # both sublayers read their own norm of the same residual stream
            return x + self.attn(self.attn_norm(x), positions, cache) + self.mlp(self.mlp_norm(x))
        x = x + self.attn(self.attn_norm(x), positions, cache)
        return x + self.mlp(self.mlp_norm(x))


class KVCache:
    """Keys and values of one layer for incremental decoding; `crop` rewinds it."""

    def __init__(self):
        self.k = self.v = None

    def update(self, k, v):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def crop(self, length: int):
        if self.k is not None:
            self.k, self.v = self.k[:, :, :length], self.v[:, :, :length]

    def __len__(self):
        return 0 if self.k is None else self.k.shape[2]


class Transformer(nn.Module):
    """The whole decoder. `forward(tokens) -> logits (B, T, padded_vocab)`."""

    def __init__(self, shape: ModelShape):
        super().__init__()
        if shape.padded_vocab_size is None:
            raise ValueError("shape.padded_vocab_size must be known to build the model")
        self.shape = shape
        self.embed = nn.Embedding(shape.padded_vocab_size, shape.hidden_size)
        if shape.pos_emb == "learned":
            self.pos_embed = nn.Embedding(shape.max_position_embeddings, shape.hidden_size)
        self.layers = nn.ModuleList(Block(shape) for _ in range(shape.num_layers))
        self.final_norm = make_norm(shape)
        self.head = nn.Linear(shape.hidden_size, shape.padded_vocab_size, bias=False)

    def new_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]

    def hidden(self, tokens: torch.Tensor, cache: list[KVCache] | None = None) -> torch.Tensor:
        """Hidden states after the final norm (B, T, h): the forward pass without the head."""
        # tokens: (B, T); with a cache, positions continue after what it holds
        start = len(cache[0]) if cache else 0
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        x = self.embed(tokens)                                           # (B, T, h)
        if self.shape.pos_emb == "learned":
            if start + tokens.shape[1] > self.shape.max_position_embeddings:
                raise ValueError(f"position {start + tokens.shape[1] - 1} is beyond the learned position table "
                                 f"({self.shape.max_position_embeddings} rows)")
            x = x + self.pos_embed(positions)                            # (B, T, h)
        for i, block in enumerate(self.layers):
            x = block(x, positions, cache[i] if cache else None)
        return self.final_norm(x)                                        # (B, T, h)

    def forward(self, tokens: torch.Tensor, cache: list[KVCache] | None = None) -> torch.Tensor:
        return self.head(self.hidden(tokens, cache))                     # (B, T, V)

    @classmethod
    def from_state_dict(cls, shape: ModelShape, sd: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> Transformer:
        """Build on the meta device and take the logical tensors as they are (strict)."""
        with torch.device("meta"):
            model = cls(shape)
        model.load_state_dict(sd, strict=True, assign=True)
        if shape.pos_emb == "rotary":
            for block in model.layers:  # buffers were on meta
                block.attn.rotary = Rotary(shape).to(sd["embed.weight"].device)
        if dtype is not None:
            model = model.to(dtype)
        return model.eval()


def init_weights(model: Transformer, seed: int = 0, std: float = 0.02) -> Transformer:
    """A small random init (normal(0, std), norms at 1, scaled residual writers) for tests and scratch training."""
    g = torch.Generator().manual_seed(seed)
    out_std = std / math.sqrt(2 * model.shape.num_layers)
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                s = out_std if name.endswith(("attn.o.weight", "mlp.down.weight")) else std
                p.copy_(torch.randn(p.shape, generator=g) * s)
    return model
