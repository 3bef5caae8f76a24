"""xAR, next-cell prediction with per-cell flow matching on the KL-16 latent (Ren et al. 2025).

State-dict compatible with `OliverRensu/xAR:models/xar.py` and `models/rope.py` @ 121e9c9 (byte-identical
in SinaAlemohammad/Neon `xAR/models/`). The code is written anew; the class name, constructor kwargs,
parameter and buffer names (hence state-dict keys and their order) and the numerics follow upstream.

Geometry (fixed by upstream): the 16×16×16 latent is 256 tokens of 16 channels, in 4 cells, each an
8×8 quadrant, cells in the order top-left, top-right, bottom-left, bottom-right, tokens in raster
order inside a cell: token index = 64·cell + 8·(row mod 8) + (col mod 8) (`to_tokens` / `to_latent`).
Every cell of every sample has its own AdaLN condition, class embedding + embedding of the integer
time index trunc(1000·t); conditions are laid out cell-major, row c·B + b. Attention is block-causal
over cells (bidirectional inside a cell) and uses 2-D RoPE on the 16×16 grid.

Two ways to run the network:
* `velocity` / `prefix_velocity`: a whole prefix of cells at once under the block-causal mask (training);
* `cell_velocity`: one sampling step with a key/value cache of the clean cells generated so far.

Differences from upstream, none changing the numbers of a call upstream supports: attention is always
`scaled_dot_product_attention` (upstream imports flash-attn but never calls it); which path runs is chosen
by the method, not by `self.training`; label dropout and time draws live in `xAR.loss`; there is no
`.cuda()` anywhere; unsupported geometries raise a ValueError instead of failing later.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

NULL_CLASS = 1000  # class_emb row of the unconditional branch; upstream always builds 1001 rows
CELL = 64  # tokens per cell
CELLS = 4
GRID = 16  # the latent is GRID × GRID tokens
CHANNELS = 16  # latent channels (KL-16, patch size 1)


def to_tokens(latent: torch.Tensor) -> torch.Tensor:
    """[B, C, 16, 16] latent -> [B, 256, C] tokens in cell-major order."""
    B, C = latent.shape[:2]
    h = latent.reshape(B, C, 2, GRID // 2, 2, GRID // 2)  # b, c, cell row, row, cell col, col
    return h.permute(0, 2, 4, 3, 5, 1).reshape(B, GRID * GRID, C)


def to_latent(tokens: torch.Tensor) -> torch.Tensor:
    """[B, 256, C] tokens in cell-major order -> [B, C, 16, 16] latent (inverse of `to_tokens`)."""
    B, _, C = tokens.shape
    h = tokens.reshape(B, 2, 2, GRID // 2, GRID // 2, C)  # b, cell row, cell col, row, col, c
    return h.permute(0, 5, 1, 3, 2, 4).reshape(B, C, GRID, GRID)


def time_index(t: torch.Tensor) -> torch.Tensor:
    """int64 trunc(t·1000), the product taken in t's own dtype (float32 and float64 can differ by one)."""
    return (t * 1000).long()


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps), computed in float32 and cast back; times `weight` if it has one."""

    def __init__(self, dim: int, eps: float = 1e-6, weight: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None

    def forward(self, x):
        h = x.float()
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        return h if self.weight is None else h * self.weight


class TimestepEmbedder(nn.Module):
    """int64 time index [N] -> [N, D]: 256-dim sinusoidal [cos | sin] with frequencies
    exp(-ln(1e4)·k/128), in float32, then Linear -> SiLU -> Linear (keys `mlp.0`, `mlp.2`)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, index):
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(
            -math.log(10000) * torch.arange(half, dtype=torch.float32, device=index.device) / half
        )
        angle = index.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1))


class Rope2D(nn.Module):
    """2-D rotary embedding of one head (EVA-02's "fast" variant), tables in cell-major token order.

    The first head_dim/2 channels rotate with the token's row, the last head_dim/2 with its column
    (positions 0..15). Inverse frequencies 1/10000^(2i/(head_dim/2)) each drive one adjacent channel
    pair, rotated as (x0, x1) -> (x0·cos − x1·sin, x1·cos + x0·sin). Buffers (in the state dict):
    `freqs` [head_dim/4], `freqs_cos` and `freqs_sin` [256, head_dim].
    """

    def __init__(self, head_dim: int):
        super().__init__()
        half = head_dim // 2
        freqs = 1.0 / (10000 ** (torch.arange(0, half, 2).float() / half))
        self.register_buffer("freqs", freqs)
        pos = torch.arange(GRID) / GRID * GRID  # float positions 0..15
        angle = (pos[:, None] * freqs[None]).repeat_interleave(2, dim=-1)  # [16, half]
        grid = torch.cat(
            [
                angle[:, None, :].expand(GRID, GRID, half),  # row part
                angle[None, :, :].expand(GRID, GRID, half),
            ],
            dim=-1,
        )  # column part
        grid = grid.reshape(2, GRID // 2, 2, GRID // 2, head_dim).permute(0, 2, 1, 3, 4).reshape(-1, head_dim)
        self.register_buffer("freqs_cos", grid.cos())
        self.register_buffer("freqs_sin", grid.sin())

    def forward(self, x, rows: slice):
        """x [B, H, N, head_dim] at absolute token positions `rows` (N of them)."""
        x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
        rotated = torch.stack((-x1, x0), dim=-1).flatten(-2)
        return x * self.freqs_cos[rows] + rotated * self.freqs_sin[rows]


class SwiGLU(nn.Module):
    """fc2(GELU(fc1_g x) · fc1_x x), dropout after the product and after fc2 (timm's `SwiGLU` as xAR
    builds it, with `act_layer=nn.GELU`: the exact erf GELU, not SiLU)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1_g = nn.Linear(dim, hidden)
        self.fc1_x = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1_g(x)) * self.fc1_x(x))))


class Attention(nn.Module):
    """Multi-head self-attention with RoPE, an additive mask and an optional key/value cache.

    `cache`: None (no cache: training and prefix recomputation), 'extend' (keys/values are cache + x;
    afterwards the cache keeps all of them but the last cell's) or 'read' (cache + x, cache unchanged).
    """

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rope = Rope2D(self.head_dim)
        self.cache_k = self.cache_v = None

    def clear_cache(self):
        self.cache_k = self.cache_v = None

    def forward(self, x, mask, rows: slice, cache=None):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.rope(q, rows), self.rope(k, rows)
        if cache is not None:
            if self.cache_k is not None:
                k, v = torch.cat([self.cache_k, k], dim=2), torch.cat([self.cache_v, v], dim=2)
            if cache == "extend":
                self.cache_k, self.cache_v = k[:, :, :-CELL], v[:, :, :-CELL]
        if mask is not None:
            mask = mask.to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_drop if self.training else 0.0
        )
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, D)))


class Block(nn.Module):
    """x += γ1·Attn(RMSNorm(x)(1 + s1) + b1);  x += γ2·MLP(RMSNorm(x)(1 + s2) + b2).

    (γ1, γ2, s1, s2, b1, b2) = chunks of ada_lin(cond), one set per (cell, sample), shared by the cell's
    64 tokens. The norms have no weight; no drop-path, no LayerScale.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.dim = dim
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads, attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio * 2 / 3), drop=proj_drop)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, cond, mask, rows: slice, cache=None):
        """x [B, 64·n, D] (n whole cells); cond [n·B, D] cell-major."""
        B, N, D = x.shape
        n = N // CELL
        mod = self.ada_lin(cond).view(n, B, 6, 1, D).transpose(0, 1)  # [B, n, 6, 1, D]
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod.unbind(2)  # each [B, n, 1, D]

        def per_cell(h):
            return h.view(B, n, CELL, D)

        h = (per_cell(self.norm1(x)) * (scale1 + 1) + shift1).view(B, N, D)
        x = x + (per_cell(self.attn(h, mask, rows, cache)) * gamma1).view(B, N, D)
        h = (per_cell(self.norm2(x)) * (scale2 + 1) + shift2).view(B, N, D)
        return x + (per_cell(self.mlp(h)) * gamma2).view(B, N, D)


class xAR(nn.Module):
    """The xAR transformer: an encoder and a decoder stack of AdaLN blocks over the 256 latent tokens.

    Only the geometry of the official models is supported (img_size/vae_stride/patch_size = 16,
    vae_embed_dim·patch_size² = 16, clusters = 4) and the encoder and decoder must have the same width.
    `norm_layer` and `diffusion_batch_mul` are accepted for upstream compatibility and unused.
    Persistent buffers (in the state dict): `mask` float32 [1, 1, 256, 256] (0 = visible, -inf = hidden;
    never extrapolate it) and the RoPE tables of every block.
    """

    def __init__(
        self,
        img_size=256,
        vae_stride=16,
        patch_size=1,
        encoder_embed_dim=1024,
        encoder_depth=16,
        encoder_num_heads=16,
        decoder_embed_dim=1024,
        decoder_depth=16,
        decoder_num_heads=16,
        mlp_ratio=4.0,
        norm_layer=None,
        vae_embed_dim=16,
        label_drop_prob=0.1,
        class_num=1000,
        attn_dropout=0.0,
        proj_dropout=0.0,
        diffusion_batch_mul=4,
        clusters=4,
    ):
        super().__init__()
        if (
            img_size // vae_stride // patch_size != GRID
            or vae_embed_dim * patch_size**2 != CHANNELS
            or clusters != CELLS
        ):
            raise ValueError(
                "xAR supports only a 16x16 grid of 16-channel tokens in 4 cells "
                f"(got img_size={img_size}, vae_stride={vae_stride}, patch_size={patch_size}, "
                f"vae_embed_dim={vae_embed_dim}, clusters={clusters})"
            )
        if encoder_embed_dim != decoder_embed_dim:
            raise ValueError("xAR needs encoder_embed_dim == decoder_embed_dim (both use one condition)")
        for dim, heads in ((encoder_embed_dim, encoder_num_heads), (decoder_embed_dim, decoder_num_heads)):
            if dim % heads or (dim // heads) % 4:
                raise ValueError(f"width {dim} with {heads} heads: the head width must be a multiple of 4")
        self.img_size, self.vae_stride, self.patch_size = img_size, vae_stride, patch_size
        self.vae_embed_dim, self.clusters, self.seq_len = vae_embed_dim, clusters, GRID * GRID
        self.num_classes, self.label_drop_prob = class_num, label_drop_prob
        self.diffusion_batch_mul = diffusion_batch_mul
        dim = encoder_embed_dim

        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, dim))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, dim))
        cell = torch.arange(self.seq_len) // CELL
        visible = cell[:, None] >= cell[None, :]
        self.register_buffer("mask", torch.zeros(visible.shape).masked_fill(~visible, -torch.inf)[None, None])

        self.class_emb = nn.Embedding(NULL_CLASS + 1, dim)
        self.time_embed = TimestepEmbedder(dim)
        self.z_proj = nn.Linear(CHANNELS, dim)
        self.z_proj_ln = RMSNorm(dim, weight=True)
        self.encoder_blocks = nn.ModuleList(
            [
                Block(dim, encoder_num_heads, mlp_ratio, attn_drop=attn_dropout, proj_drop=proj_dropout)
                for _ in range(encoder_depth)
            ]
        )
        self.encoder_norm = RMSNorm(dim, weight=True)
        self.decoder_embed = nn.Linear(dim, decoder_embed_dim)
        self.decoder_blocks = nn.ModuleList(
            [
                Block(
                    decoder_embed_dim,
                    decoder_num_heads,
                    mlp_ratio,
                    attn_drop=attn_dropout,
                    proj_drop=proj_dropout,
                )
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = RMSNorm(decoder_embed_dim, weight=True)
        self.pred = nn.Linear(decoder_embed_dim, CHANNELS)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        """Upstream's from-scratch init: N(0, 0.02) embeddings, Xavier-uniform linear weights, zero biases."""
        for p in (self.class_emb.weight, self.encoder_pos_embed_learned, self.decoder_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def _blocks(self):
        return [*self.encoder_blocks, *self.decoder_blocks]

    def clear_cache(self):
        """Empty every attention layer's key/value cache (sampling starts and ends with this)."""
        for block in self._blocks():
            block.attn.clear_cache()

    def condition(self, labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """labels int64 [B] (1000 = null), index int64 [n·B] cell-major -> [n·B, D] AdaLN condition."""
        n = index.shape[0] // labels.shape[0]
        return self.class_emb(labels).repeat(n, 1) + self.time_embed(index)

    def _trunk(self, x, cond, rows: slice, mask, cache):
        h = self.z_proj_ln(self.z_proj(x) + self.encoder_pos_embed_learned[:, rows])
        for block in self.encoder_blocks:
            h = block(h, cond, mask, rows, cache)
        h = self.decoder_embed(self.encoder_norm(h)) + self.decoder_pos_embed_learned[:, rows]
        for block in self.decoder_blocks:
            h = block(h, cond, mask, rows, cache)
        return self.pred(self.decoder_norm(h))

    def prefix_velocity(self, x: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Velocity of the first n cells, computed together under the block-causal mask, no cache.

        x float [B, 64·n, 16] tokens of cells 0..n-1; labels int64 [B]; index int64 [n·B] cell-major
        time indices. Returns [B, 64·n, 16].
        """
        N = x.shape[1]
        return self._trunk(x, self.condition(labels, index), slice(0, N), self.mask[:, :, :N, :N], None)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The network of upstream's training forward: v̂(x_t, t, y) for all 256 tokens at once.

        x_t float32 [B, 256, 16] noisy tokens (cell-major); t float32 [4B] flow times, t[c·B + b] for cell c
        of sample b; labels int64 [B] after dropout (1000 = null). Returns float32 [B, 256, 16] (the target
        is noise − x0). The same in train and eval mode apart from dropout.
        """
        return self.prefix_velocity(x_t, labels, time_index(t.float()))

    def cell_velocity(
        self, x: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, cell: int, extend: bool
    ) -> torch.Tensor:
        """One sampling call for cell `cell`, attending to the key/value cache.

        x float [B', N, 16]: the tokens ending at the end of `cell` (N = 64, or 128 with the previous
        cell's clean tokens in front at a cell's first step); labels int64 [B']; index int64 [N/64·B']
        cell-major. extend=True (a cell's first step): block-causal mask over cache + x, then the cache
        keeps everything but x's last 64 tokens. extend=False: cache + x without a mask, cache unchanged.
        Returns [B', 64, 16], the velocity of the last 64 tokens.
        """
        end, N = CELL * (cell + 1), x.shape[1]
        rows = slice(end - N, end)
        mask = self.mask[:, :, rows, :end] if extend else None
        out = self._trunk(x, self.condition(labels, index), rows, mask, "extend" if extend else "read")
        return out[:, -CELL:]


def _build(width: int, depth: int, heads: int, kwargs: dict) -> xAR:
    kwargs = {"mlp_ratio": 4.0, **kwargs}
    return xAR(
        encoder_embed_dim=width,
        encoder_depth=depth,
        encoder_num_heads=heads,
        decoder_embed_dim=width,
        decoder_depth=depth,
        decoder_num_heads=heads,
        **kwargs,
    )


def xar_base(**kwargs) -> xAR:
    """8 + 8 blocks of width 768, 12 heads (172.6M parameters)."""
    return _build(768, 8, 12, kwargs)


def xar_large(**kwargs) -> xAR:
    """16 + 16 blocks of width 1024, 16 heads (608.4M parameters)."""
    return _build(1024, 16, 16, kwargs)


def xar_huge(**kwargs) -> xAR:
    """20 + 20 blocks of width 1280, 16 heads (1186.0M parameters)."""
    return _build(1280, 20, 16, kwargs)
