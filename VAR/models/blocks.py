"""The transformer blocks of VAR: adaptive-LayerNorm self-attention blocks and the adaptive norm before
the head.

Mirrors `FoundationVision/VAR:models/basic_var.py` (and `DropPath` of `models/helpers.py`) @ 78b95394
(MIT License, Copyright (c) 2024 FoundationVision). The code is written anew; submodule and parameter
names (hence state-dict keys and their order) and numerics follow upstream.

Attention always goes through `torch.nn.functional.scaled_dot_product_attention` (upstream's CPU and
float32 path); upstream's optional flash-attn, xformers and fused-MLP kernels compute the same functions
and are not used. Shapes: B batch, L tokens, C width, H heads, c = C/H, D condition width (= C).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's whole branch with probability `drop_prob` and scale the
    kept ones by 1/(1 - drop_prob). One `bernoulli_` draw [B, 1, ..] from torch's global generator per
    call."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1 - self.drop_prob
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * keep.div_(keep_prob)

    def extra_repr(self):
        return f"drop_prob={self.drop_prob:g}"


class FFN(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2 (-> dropout)."""

    def __init__(self, in_features, hidden_features=None, out_features=None, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features or in_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features or in_features, out_features or in_features)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x):
        return self.drop(self.fc2(self.act(self.fc1(x))))


class SelfAttention(nn.Module):
    """Multi-head self-attention [B, L, C] -> [B, L, C] with an optional key/value cache.

    The qkv projection's bias is (q_bias, 0, v_bias). With `attn_l2_norm`, q and k are L2-normalised per
    head, q is multiplied by exp(min(scale_mul_1H11, log 100)) (a learned per-head temperature) and the
    softmax scale is 1; otherwise the scale is 0.25/√c.
    """

    def __init__(
        self, block_idx, embed_dim=768, num_heads=12, attn_drop=0.0, proj_drop=0.0, attn_l2_norm=False
    ):
        super().__init__()
        assert embed_dim % num_heads == 0
        self.block_idx, self.num_heads, self.head_dim = block_idx, num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.attn_drop = attn_drop
        self.caching, self.cached_k, self.cached_v = False, None, None

    def kv_caching(self, enable: bool):
        """Switch the cache on or off; either way it starts empty."""
        self.caching, self.cached_k, self.cached_v = enable, None, None

    def forward(self, x, attn_bias):
        """x [B, L, C]; attn_bias [1, 1, L, L] additive (0 / -inf), or None (no mask: sampling with the cache,
        where the new tokens may see every cached one)."""
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, c]
        if self.attn_l2_norm:
            q = F.normalize(q, dim=-1).mul(self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp())
            k = F.normalize(k, dim=-1)
        if self.caching:
            if self.cached_k is not None:
                k = torch.cat((self.cached_k, k), dim=2)
                v = torch.cat((self.cached_v, v), dim=2)
            self.cached_k, self.cached_v = k, v
        dropout_p = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_bias, dropout_p=dropout_p, scale=self.scale
        )
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, L, C)))

    def extra_repr(self):
        return f"attn_l2_norm={self.attn_l2_norm}"


class AdaLNSelfAttn(nn.Module):
    """x += γ1·Attn(LN(x)(1 + s1) + b1);  x += γ2·FFN(LN(x)(1 + s2) + b2), each branch under DropPath.

    (γ1, γ2, s1, s2, b1, b2) come from the condition: `ada_lin(cond_BD)` per block, or with `shared_aln`
    `ada_gss + cond_BD` where cond_BD [B, 1, 6, C] is the output of VAR's `shared_ada_lin`. LN has no
    affine parameters.
    """

    def __init__(
        self,
        block_idx,
        embed_dim,
        cond_dim,
        shared_aln: bool,
        num_heads,
        mlp_ratio=4.0,
        drop=0.0,
        attn_drop=0.0,
        drop_path=0.0,
        attn_l2_norm=False,
        norm_eps=1e-6,
    ):
        super().__init__()
        self.block_idx, self.C, self.D = block_idx, embed_dim, cond_dim
        # Identity (not a DropPath with p = 0) keeps block 0 from touching the RNG, as upstream.
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.attn = SelfAttention(
            block_idx=block_idx,
            embed_dim=embed_dim,
            num_heads=num_heads,
            attn_drop=attn_drop,
            proj_drop=drop,
            attn_l2_norm=attn_l2_norm,
        )
        self.ffn = FFN(in_features=embed_dim, hidden_features=round(embed_dim * mlp_ratio), drop=drop)
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.shared_aln = shared_aln
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * embed_dim))

    def forward(self, x, cond_BD, attn_bias):
        """x [B, L, C]; cond_BD [B, D] (or [B, 1, 6, C] when shared_aln); attn_bias as in SelfAttention."""
        if self.shared_aln:
            gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + cond_BD).unbind(
                2
            )  # each [B, 1, C]
        else:
            gamma1, gamma2, scale1, scale2, shift1, shift2 = (
                self.ada_lin(cond_BD).view(-1, 1, 6, self.C).unbind(2)
            )
        h = self.attn(self.ln_wo_grad(x).mul(scale1.add(1)).add_(shift1), attn_bias=attn_bias)
        x = x + self.drop_path(h.mul(gamma1))
        h = self.ffn(self.ln_wo_grad(x).mul(scale2.add(1)).add_(shift2))
        return x + self.drop_path(h.mul(gamma2))

    def extra_repr(self):
        return f"shared_aln={self.shared_aln}"


class AdaLNBeforeHead(nn.Module):
    """LN(x)(1 + s) + b with (s, b) = ada_lin(cond_BD); always its own `ada_lin`, even with shared_aln."""

    def __init__(self, C, D, norm_eps=1e-6):
        super().__init__()
        self.C, self.D = C, D
        self.ln_wo_grad = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * C))

    def forward(self, x_BLC, cond_BD):
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x_BLC).mul(scale.add(1)).add_(shift)
