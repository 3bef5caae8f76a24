"""IMM networks: the preconditioner `IMMPrecond`, which turns a backbone F into the one-step map
f_{s,t}(x_t) of Inductive Moment Matching (Zhou et al. 2025), the `DiT` backbone with its `DiT_XL_2`
preset, and the `SongUNet` variant with a second time embedding.

Compatible with `lumalabs/imm:training/preconds.py`, `training/dit.py` and `training/unets.py`
@ c9473e9, as shipped (with the same numerics) in `SinaAlemohammad/Neon:imm/training/` @ 76496c3;
code licensed CC BY-NC-SA 4.0 by Luma AI / NVIDIA / Meta. Written anew: class names, constructor
keyword arguments and defaults, submodule names (so state-dict keys and their order) and the formulas
follow upstream, so the `ema` state dict of an official IMM pickle loads strictly into a network
built from the pickle's config. The timm pieces the DiT uses (PatchEmbed, Attention, Mlp) are
written here with timm's parameter names; attention calls
`torch.nn.functional.scaled_dot_product_attention`.

Conventions (flow matching, noise_schedule='fm'): x_t = α_t·x + σ_t·ε with α_t = 1 - t, σ_t = t,
ε ~ N(0, σ_d²), t in [eps, T]; η_t = σ_t/α_t ("nt"); λ_t = log-SNR = 2·log(α_t/σ_t).
"""

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from edm import networks as edm_networks

# --------------------------------------------------------------------------------------------------
# DiT pieces.


def _modulate(x, shift, scale):
    """adaLN: x [N, T, D] scaled by (1 + scale) and shifted, scale/shift [N, D]. One fused
    multiply-add (upstream's x·(1 + scale) + shift is two passes over x and one more temporary)."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


def sincos_2d(dim, grid_size):
    """The fixed positional table of DiT/MAE, float64 [grid_size², dim]. Token n = (row i, col j),
    n = i·grid_size + j, gets [sin(j·ω), cos(j·ω), sin(i·ω), cos(i·ω)] with ω_k = 10000^(-4k/dim),
    k < dim/4 (the column comes first)."""
    assert dim % 4 == 0
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(*[torch.arange(grid_size, dtype=torch.float64)] * 2, indexing="ij")

    def encode(pos):
        angle = pos.reshape(-1, 1) * omega
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1)


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches to tokens: [N, C, H, W] -> [N, (H/p)·(W/p), D], row-major over the
    patch grid (timm's PatchEmbed with no norm; parameter `proj` is a Conv2d)."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim, bias=True):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x):
        assert tuple(x.shape[-2:]) == self.img_size, f"input {tuple(x.shape[-2:])} != {self.img_size}"
        # contiguous(): with a transposed view every later residual sum would inherit its strides and
        # each LayerNorm would copy its input back to row-major (same values, wasted copies).
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class Attention(nn.Module):
    """Multi-head self-attention on [N, T, D] (timm's parameter names: qkv, proj; q_norm/k_norm are
    LayerNorms over the head dimension when qk_norm, as in timm 1.0.8, which upstream pins)."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_norm=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        assert dim % num_heads == 0
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        n, tokens, dim = x.shape
        # qkv features are laid out as [(q, k, v), head, head_dim].
        q, k, v = self.qkv(x).reshape(n, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(n, tokens, dim)))


class Mlp(nn.Module):
    """fc1 -> tanh-GELU -> dropout -> fc2 -> dropout, on the last axis."""

    def __init__(self, in_features, hidden_features, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = drop

    def forward(self, x):
        hidden = self.fc1(x)
        if torch.is_grad_enabled():
            hidden = F.gelu(hidden, approximate="tanh")
        else:  # nothing records the graph: overwrite fc1's output, the largest tensor of the block
            hidden = torch.ops.aten.gelu_(hidden, approximate="tanh")
        return F.dropout(self.fc2(F.dropout(hidden, self.drop, self.training)), self.drop, self.training)


class TimestepEmbedder(nn.Module):
    """Scalar time labels [N] -> [N, hidden_size]: a frequency embedding of width
    `frequency_embedding_size` computed in float64 ('positional': [cos(τ·f), sin(τ·f)] with
    f_k = 10000^(-k/half); 'fourier': [cos(2πτ·f), sin(2πτ·f)] with the buffer f ~ N(0, scale²)),
    cast to the labels' dtype, then Linear-SiLU-Linear (`mlp.0`, `mlp.2`) unless use_mlp=False."""

    def __init__(
        self, hidden_size, frequency_embedding_size=256, embedding_type="positional", use_mlp=True, scale=1
    ):
        super().__init__()
        assert embedding_type in ("positional", "fourier")
        self.hidden_size = hidden_size
        self.frequency_embedding_size = frequency_embedding_size
        self.embedding_type = embedding_type
        self.use_mlp = use_mlp
        if use_mlp:
            self.mlp = nn.Sequential(
                nn.Linear(frequency_embedding_size, hidden_size),
                nn.SiLU(),
                nn.Linear(hidden_size, hidden_size),
            )
        if embedding_type == "fourier":
            self.register_buffer("freqs", torch.randn(frequency_embedding_size // 2) * scale)

    def frequencies(self, t):
        half = self.frequency_embedding_size // 2
        if self.embedding_type == "fourier":
            angle = torch.outer(t.to(torch.float64), 2 * math.pi * self.freqs.to(torch.float64))
        else:
            freqs = torch.exp(
                -math.log(10000) / half * torch.arange(half, dtype=torch.float64, device=t.device)
            )
            angle = torch.outer(t.to(torch.float64), freqs)
        emb = torch.cat([angle.cos(), angle.sin()], dim=1)
        if self.frequency_embedding_size % 2:
            emb = F.pad(emb, (0, 1))
        return emb

    def forward(self, t):
        emb = self.frequencies(t).to(t.dtype)
        return self.mlp(emb) if self.use_mlp else emb


class LabelEmbedder(nn.Module):
    """Class indices [N] -> [N, hidden_size] (`embedding_table`). With dropout_prob > 0 one more row
    is added and, in training, indices are replaced by it with that probability (drawn from torch's
    global generator)."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels, train):
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero conditioning: the condition c [N, temb_size] gives
    shift/scale/gate for the attention and MLP branches. x [N, T, D] -> [N, T, D]."""

    def __init__(self, hidden_size, num_heads, temb_size, mlp_ratio=4.0, dropout=0, qk_norm=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), drop=dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(temb_size, 6 * hidden_size))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        # Gated residuals as one fused multiply-add each: x + gate·branch.
        x = torch.addcmul(x, gate1[:, None], self.attn(_modulate(self.norm1(x), shift1, scale1)))
        return torch.addcmul(x, gate2[:, None], self.mlp(_modulate(self.norm2(x), shift2, scale2)))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a Linear to p·p·C values per token: [N, T, D] -> [N, T, p²C]."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion transformer (Peebles & Xie 2023) with IMM's second time embedding.

    forward(x [N, in_channels, R, R], noise_labels_t [N] or [1], noise_labels_s [N] or [1] or None,
    class_labels [N, num_classes] one-hot or None) -> [N, in_channels, R, R]. The condition is
    c = t_embedder(τ_t) + s_embedder(τ_s) + y_embedder(y); an all-zero label row (or None) selects the
    null class y = num_classes. Labels are one-hot, so the table has num_classes + 1 rows (+1 more
    with class_dropout_prob > 0). `num_classes` defaults to 1000 whatever label_dim is, as upstream.
    """

    def __init__(
        self,
        img_resolution,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.0,
        num_classes=1000,
        s_embed=True,
        qk_norm=False,
        skip=False,  # accepted and unused, as upstream (it never reaches the blocks)
        # TimestepEmbedder kwargs: frequency_embedding_size, embedding_type, use_mlp, scale
        embedding_kwargs=None,
        temb_mult=1,
        dropout=0,
        **kwargs,  # img_channels, out_channels, label_dim, ... from IMMPrecond: ignored
    ):
        super().__init__()
        embedding_kwargs = dict(embedding_kwargs or {})
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.skip = skip
        self.s_embed = s_embed
        temb_size = hidden_size * temb_mult

        # Construction order fixes the state-dict order (pos_embed, s_embedder, x_embedder, ...).
        if s_embed:
            self.s_embedder = TimestepEmbedder(temb_size, **embedding_kwargs)
        self.x_embedder = PatchEmbed(img_resolution, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(temb_size, **embedding_kwargs)
        self.y_embedder = LabelEmbedder(num_classes + 1, temb_size, class_dropout_prob)
        # A parameter (not a buffer): the checkpoints carry it, and it is loaded, not recomputed.
        self.pos_embed = nn.Parameter(
            torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False
        )
        self.blocks = nn.ModuleList(
            [
                DiTBlock(
                    hidden_size, num_heads, temb_size, mlp_ratio=mlp_ratio, dropout=dropout, qk_norm=qk_norm
                )
                for _ in range(depth)
            ]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self):
        """DiT's initialisation: Xavier-uniform Linear weights and zero biases, the sin-cos table in
        pos_embed, the patch projection initialised like a Linear, N(0, 0.02²) label table and time-MLP
        weights, and zeros in every adaLN modulation and in the final Linear (adaLN-Zero)."""
        if self.pos_embed.is_meta:
            return
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        grid = self.x_embedder.grid_size[0]
        self.pos_embed.copy_(sincos_2d(self.pos_embed.shape[-1], grid).float()[None])
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for embedder in (self.t_embedder, self.s_embedder if self.s_embed else None):
            if embedder is not None and embedder.use_mlp:
                nn.init.normal_(embedder.mlp[0].weight, std=0.02)
                nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def class_index(self, class_labels, batch, device):
        """One-hot rows [N, num_classes] -> indices [N]; all-zero rows (or None) -> num_classes."""
        if class_labels is None:
            return torch.full([batch], self.num_classes, dtype=torch.long, device=device)
        null = 1 - class_labels.sum(dim=1, keepdim=True)
        return torch.cat([class_labels, null], dim=1).argmax(dim=1)

    def unpatchify(self, x):
        """[N, h·w, p·p·C] -> [N, C, h·p, w·p]; each token's values are laid out as (p, p, C)."""
        n, tokens, _ = x.shape
        p, c = self.patch_size, self.out_channels
        h = w = math.isqrt(tokens)
        assert h * w == tokens
        x = x.reshape(n, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(n, c, h * p, w * p)

    def forward(self, x, noise_labels_t, noise_labels_s=None, class_labels=None, **kwargs):
        n = x.shape[0]
        y = self.class_index(class_labels, n, x.device)
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(noise_labels_t.expand(n) if noise_labels_t.shape[0] == 1 else noise_labels_t)
        if self.s_embed and noise_labels_s is not None:
            c = c + self.s_embedder(
                noise_labels_s.expand(n) if noise_labels_s.shape[0] == 1 else noise_labels_s
            )
        c = c + self.y_embedder(y, self.training)
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.unpatchify(self.final_layer(tokens, c))


def _preset(name, patch_size, hidden_size, depth, num_heads):
    """A subclass of DiT with a fixed architecture (upstream's preset classes have these names)."""
    arch = dict(patch_size=patch_size, hidden_size=hidden_size, depth=depth, num_heads=num_heads)

    def __init__(self, **kwargs):
        DiT.__init__(self, **arch, **kwargs)

    doc = f"DiT with patch {patch_size}, width {hidden_size}, depth {depth} and {num_heads} heads."
    return type(name, (DiT,), dict(__init__=__init__, __doc__=doc, __module__=__name__))


DiT_XL_2 = _preset("DiT_XL_2", 2, 1152, 28, 16)
DiT_XL_4 = _preset("DiT_XL_4", 4, 1152, 28, 16)
DiT_XL_8 = _preset("DiT_XL_8", 8, 1152, 28, 16)
DiT_L_2 = _preset("DiT_L_2", 2, 1024, 24, 16)
DiT_L_4 = _preset("DiT_L_4", 4, 1024, 24, 16)
DiT_L_8 = _preset("DiT_L_8", 8, 1024, 24, 16)
DiT_B_2 = _preset("DiT_B_2", 2, 768, 12, 12)
DiT_B_4 = _preset("DiT_B_4", 4, 768, 12, 12)
DiT_B_8 = _preset("DiT_B_8", 8, 768, 12, 12)
DiT_S_2 = _preset("DiT_S_2", 2, 384, 12, 6)
DiT_S_4 = _preset("DiT_S_4", 4, 384, 12, 6)
DiT_S_8 = _preset("DiT_S_8", 8, 384, 12, 6)

# --------------------------------------------------------------------------------------------------
# SongUNet (the CIFAR-10 configuration of IMM; not used by Neon).


class PositionalEmbedding(edm_networks.PositionalEmbedding):
    """EDM's positional embedding, but computed in float64 whatever the input dtype (IMM's variant):
    x [N] -> float64 [N, num_channels] = [cos(x·f), sin(x·f)], f_j = max_positions^(-j/(half - endpoint))."""

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float64, device=x.device) / (
            half - (1 if self.endpoint else 0)
        )
        angle = torch.outer(x.to(torch.float64), (1 / self.max_positions) ** freqs)
        return torch.cat([angle.cos(), angle.sin()], dim=1)


class SongUNet(edm_networks.SongUNet):
    """EDM's DDPM++/NCSN++ U-Net with IMM's second time embedding (`map_noise_s`, `map_layer0_s`,
    `map_layer1_s`, added to the first one's output before the final SiLU).

    forward(x [N, in_channels, R, R], noise_labels_t [N], noise_labels_s [N] or None,
    class_labels [N, label_dim] or None, augment_labels=None) -> [N, out_channels, R, R]. The
    positional embeddings (and the mapping layers after them) run in float64, as upstream's do.
    Fourier embeddings use `embedding_kwargs['scale']` (default 0.02); learnable ones are not ported.
    """

    def __init__(
        self,
        img_resolution,
        in_channels,
        out_channels,
        label_dim=0,
        augment_dim=0,
        model_channels=128,
        channel_mult=(1, 2, 2, 2),
        channel_mult_emb=4,
        num_blocks=4,
        attn_resolutions=(16,),
        dropout=0.10,
        label_dropout=0,
        embedding_type="positional",
        channel_mult_noise=1,
        encoder_type="standard",
        decoder_type="standard",
        resample_filter=(1, 1),
        s_embed=True,
        share_tsemb=True,
        embedding_kwargs=None,
        **kwargs,
    ):
        embedding_kwargs = dict(embedding_kwargs or {})
        if embedding_kwargs.pop("learnable", False):
            raise NotImplementedError("learnable Fourier embeddings are not ported")
        super().__init__(
            img_resolution,
            in_channels,
            out_channels,
            label_dim=label_dim,
            augment_dim=augment_dim,
            model_channels=model_channels,
            channel_mult=channel_mult,
            channel_mult_emb=channel_mult_emb,
            num_blocks=num_blocks,
            attn_resolutions=attn_resolutions,
            dropout=dropout,
            label_dropout=label_dropout,
            embedding_type=embedding_type,
            channel_mult_noise=channel_mult_noise,
            encoder_type=encoder_type,
            decoder_type=decoder_type,
            resample_filter=resample_filter,
        )
        self.s_embed = s_embed
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")

        def noise_embedding():
            if embedding_type == "positional":
                return PositionalEmbedding(noise_channels, endpoint=True)
            return edm_networks.FourierEmbedding(noise_channels, scale=embedding_kwargs.get("scale", 0.02))

        self.map_noise = noise_embedding()
        if s_embed:
            self.map_noise_s = noise_embedding()
            self.map_layer0_s = edm_networks.Linear(noise_channels, emb_channels, **init)
            self.map_layer1_s = edm_networks.Linear(emb_channels, emb_channels, **init)
        # Upstream's state-dict order: the s-branch sits between map_layer1 and the encoder.
        order = [
            "map_noise",
            "map_label",
            "map_augment",
            "map_layer0",
            "map_layer1",
            "map_noise_s",
            "map_layer0_s",
            "map_layer1_s",
            "enc",
            "dec",
        ]
        self._modules = {name: self._modules[name] for name in order if name in self._modules}

    def _embed(self, embedding, noise_labels):
        emb = embedding(noise_labels)
        return emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # [cos, sin] -> [sin, cos]

    def forward(self, x, noise_labels_t, noise_labels_s=None, class_labels=None, augment_labels=None):
        emb = self._embed(self.map_noise, noise_labels_t)
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.s_embed and noise_labels_s is not None:
            emb_s = self._embed(self.map_noise_s, noise_labels_s)
            emb = emb + self.map_layer1_s(F.silu(self.map_layer0_s(emb_s)))
        emb = F.silu(emb)

        skips, aux = [], x
        for name, block in self.enc.items():
            if name.endswith("_aux_down"):
                aux = block(aux)
            elif name.endswith("_aux_skip"):
                x = skips[-1] = x + block(aux)
            elif name.endswith("_aux_residual"):
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, edm_networks.UNetBlock) else block(x)
                skips.append(x)

        out = pre = None
        for name, block in self.dec.items():
            if name.endswith("_aux_up"):
                out = block(out)
            elif name.endswith("_aux_norm"):
                pre = block(x)
            elif name.endswith("_aux_conv"):
                pre = block(F.silu(pre))
                out = pre if out is None else out + pre
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return out


# --------------------------------------------------------------------------------------------------
# The preconditioner.

BACKBONES = {
    "DiT": DiT,
    "SongUNet": SongUNet,
    **{
        f.__name__: f
        for f in (
            DiT_XL_2,
            DiT_XL_4,
            DiT_XL_8,
            DiT_L_2,
            DiT_L_4,
            DiT_L_8,
            DiT_B_2,
            DiT_B_4,
            DiT_B_8,
            DiT_S_2,
            DiT_S_4,
            DiT_S_8,
        )
    },
}

_AUTOCAST = {None: None, "fp16": torch.float16, "bf16": torch.bfloat16}


class IMMPrecond(nn.Module):
    """f_{s,t}(x) = a map from time t to time s ≤ t, built from a backbone F (state-dict prefix `model.`).

    The backbone sees c_in·x with c_in = 1/(σ_d·√(α_t² + σ_t²)), τ_t = time_scale·t and
    τ_s = time_scale·(t - s) ('stride') or time_scale·s ('identity'); it runs in float32, or under
    autocast in `mixed_precision` ('fp16'/'bf16') on CUDA unless force_fp32. Its output is cast to
    t's dtype and mapped by `f_type`:
        'euler_fm'   (fm only): f = x - (t - s)·σ_d·F
        'simple_edm': f = c_skip·x + c_out·F, c_skip = (α_tα_s + σ_tσ_s)/(α_t² + σ_t²),
                      c_out = -(α_sσ_t - α_tσ_s)·σ_d/√(α_t² + σ_t²)
        'identity'  : DDIM from (x_t, x̂_0 = F) to s.
    The paper row: model_type='DiT_XL_2', noise_schedule='fm', f_type='euler_fm', temb_type='stride',
    time_scale=1000, sigma_data=0.5, eps=0, T=0.994 (with s_embed=True for the backbone).
    """

    def __init__(
        self,
        img_resolution,  # Latent/image resolution R.
        img_channels,  # Channels C.
        label_dim=0,  # Number of classes, 0 = unconditional.
        mixed_precision=None,  # None (float32), 'fp16' or 'bf16' autocast for the backbone.
        noise_schedule="fm",  # 'fm' (α = 1 - t, σ = t) or 'vp_cosine' (α = cos(πt/2), σ = sin(πt/2)).
        model_type="SongUNet",  # Backbone: a key of BACKBONES.
        sigma_data=0.5,  # σ_d, the data (and noise) standard deviation.
        f_type="euler_fm",  # 'euler_fm', 'simple_edm' or 'identity'.
        T=0.994,  # Largest time.
        eps=0.0,  # Smallest time.
        temb_type="identity",  # Second time label: 'identity' (s) or 'stride' (t - s).
        time_scale=1000.0,  # Time labels are time_scale·t.
        **model_kwargs,  # Backbone kwargs (s_embed, patch_size, hidden_size, num_classes, ...).
    ):
        super().__init__()
        if mixed_precision not in _AUTOCAST:
            raise ValueError(f"Unknown mixed_precision: {mixed_precision}")
        assert noise_schedule in ("fm", "vp_cosine") and f_type in ("euler_fm", "simple_edm", "identity")
        assert temb_type in ("identity", "stride")
        if f_type == "euler_fm":
            assert noise_schedule == "fm", "f_type 'euler_fm' needs noise_schedule 'fm'"
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_mixed_precision = mixed_precision is not None
        self.mixed_precision = _AUTOCAST[mixed_precision] or torch.float32
        self.noise_schedule = noise_schedule
        self.T = T
        self.eps = eps
        self.sigma_data = sigma_data
        self.f_type = f_type
        self.time_scale = time_scale
        self.temb_type = temb_type
        # η at the ends of the time range, as Python floats (computed on the CPU, so that building
        # under a `torch.device('meta')` context works).
        self.nt_low, self.nt_high = (
            self.get_log_nt(torch.tensor(v, dtype=torch.float64, device="cpu")).exp().item() for v in (eps, T)
        )
        self.model = BACKBONES[model_type](
            img_resolution=img_resolution,
            img_channels=img_channels,
            in_channels=img_channels,
            out_channels=img_channels,
            label_dim=label_dim,
            **model_kwargs,
        )

    # Schedule. Tensors in, tensors of the same dtype out (log-SNR is evaluated in float64).

    def get_alpha_sigma(self, t):
        """(α_t, σ_t)."""
        if self.noise_schedule == "fm":
            return 1 - t, t
        return torch.cos(t * (math.pi / 2)), torch.sin(t * (math.pi / 2))

    def get_logsnr(self, t):
        """λ_t = 2·log(α_t/σ_t), computed in float64."""
        t64 = t.to(torch.float64)
        if self.noise_schedule == "fm":
            logsnr = 2 * (torch.log(1 - t64) - torch.log(t64))
        else:
            logsnr = -2 * torch.log(torch.tan(t64 * (math.pi / 2)))
        return logsnr.to(t.dtype)

    def get_logsnr_prime(self, t):
        """dλ/dt."""
        if self.noise_schedule == "fm":
            return -2 / ((1 - t) * t)
        return -math.pi / (torch.sin(t * (math.pi / 2)) * torch.cos(t * (math.pi / 2)))

    def get_log_nt(self, t):
        """log η_t = -λ_t/2."""
        return -0.5 * self.get_logsnr(t)

    def nt_to_t(self, nt):
        """t from η_t (computed in float64; NaN, i.e. η = ∞, maps to 1)."""
        nt64 = nt.to(torch.float64)
        t = nt64 / (1 + nt64) if self.noise_schedule == "fm" else torch.arctan(nt64) / (math.pi / 2)
        return torch.nan_to_num(t, nan=1.0).to(nt.dtype)

    def add_noise(self, y, t, noise=None):
        """(α_t·y + σ_t·noise, noise); noise ~ N(0, σ_d²) is drawn (randn_like) when not given."""
        if noise is None:
            noise = torch.randn_like(y) * self.sigma_data
        alpha, sigma = self.get_alpha_sigma(t)
        return alpha * y + sigma * noise, noise

    def ddim(self, yt, y, t, s, noise=None):
        """x_s from x_t and the clean estimate y (DDIM); with `noise`, simply α_s·y + σ_s·noise."""
        alpha_s, sigma_s = self.get_alpha_sigma(s)
        if noise is not None:
            return alpha_s * y + sigma_s * noise
        alpha_t, sigma_t = self.get_alpha_sigma(t)
        return (alpha_s - alpha_t * sigma_s / sigma_t) * y + (sigma_s / sigma_t) * yt

    def get_init_noise(self, shape, device):
        """σ_d·N(0, I) from torch's global generator (upstream's draw; see imm.sampler.initial_latents
        for per-sample generators)."""
        return torch.randn(shape, device=device) * self.sigma_data

    def get_kernel_weight(self, t, s, a=1, b=0):
        """(w, w_out) of the IMM loss: the kernel's inverse bandwidth w (for euler_fm 1/(σ_d·|t - s|))
        and the time weighting w_out = α_t^a/(α_t² + σ_t²) · ½·(-dλ/dt) · sigmoid(b - λ_t)."""
        alpha_t, sigma_t = self.get_alpha_sigma(t)
        alpha_s, sigma_s = self.get_alpha_sigma(s)
        if self.f_type == "euler_fm":
            w = 1 / (t - s).abs() / self.sigma_data
        elif self.f_type == "simple_edm":
            w = (
                (alpha_t**2 + sigma_t**2).sqrt()
                / (alpha_s * sigma_t - alpha_t * sigma_s).abs()
                / self.sigma_data
            )
        else:
            w = (sigma_t / (alpha_s * sigma_t - sigma_s * alpha_t)).abs()
        snr_weight = alpha_t**a / (alpha_t**2 + sigma_t**2)
        wout = snr_weight * 0.5 * -self.get_logsnr_prime(t) * torch.sigmoid(b - self.get_logsnr(t))
        return w, wout

    # The network.

    def _labels(self, class_labels, batch, device):
        if self.label_dim == 0:
            return None
        if class_labels is None:
            return torch.zeros([batch, self.label_dim], device=device)
        return class_labels.to(torch.float32).reshape(-1, self.label_dim)

    def backbone(self, x, t, s, class_labels, force_fp32=False, **model_kwargs):
        """The raw output F of the backbone for x [N, C, R, R], t, s broadcastable to [N, 1, 1, 1] (any
        float dtype; used in float32), labels float32 [N, label_dim] or None."""
        x = x.to(torch.float32)
        t = t.to(torch.float32).reshape(-1, 1, 1, 1)
        s = s.to(torch.float32).reshape(-1, 1, 1, 1)
        alpha, sigma = self.get_alpha_sigma(t)
        c_in = (alpha**2 + sigma**2).rsqrt() / self.sigma_data
        c_noise_t = t * self.time_scale
        c_noise_s = (s if self.temb_type == "identity" else t - s) * self.time_scale
        autocast = self.use_mixed_precision and not force_fp32 and x.device.type == "cuda"
        with torch.autocast("cuda", dtype=self.mixed_precision) if autocast else contextlib.nullcontext():
            return self.model(
                c_in * x, c_noise_t.flatten(), c_noise_s.flatten(), class_labels=class_labels, **model_kwargs
            )

    def map(self, x, F_x, t, s):
        """f_{s,t}(x) from the backbone output F_x (all in the dtype they come in; t, s are 0-dim or
        [N, 1, 1, 1], or [N], which is reshaped)."""
        t, s = (v.reshape(-1, 1, 1, 1) if v.ndim == 1 else v for v in (t, s))
        if self.f_type == "euler_fm":
            return x - (t - s) * self.sigma_data * F_x
        alpha_t, sigma_t = self.get_alpha_sigma(t)
        alpha_s, sigma_s = self.get_alpha_sigma(s)
        if self.f_type == "simple_edm":
            norm2 = alpha_t**2 + sigma_t**2
            c_skip = (alpha_t * alpha_s + sigma_t * sigma_s) / norm2
            c_out = -(alpha_s * sigma_t - alpha_t * sigma_s) * norm2.rsqrt() * self.sigma_data
            return c_skip * x + c_out * F_x
        return self.ddim(x, F_x, t, s)

    def forward(self, x, t, s, class_labels=None, force_fp32=False, **model_kwargs):
        """f_{s,t}(x): x [N, C, R, R], t and s tensors broadcastable to [N, 1, 1, 1] with s ≤ t,
        class_labels one-hot [N, label_dim] (an all-zero row = unconditional; None = all unconditional).
        Returns [N, C, R, R] in t's dtype promoted with x's (float64 t gives a float64 map)."""
        t, s = torch.as_tensor(t, device=x.device), torch.as_tensor(s, device=x.device)
        labels = self._labels(class_labels, x.shape[0], x.device)
        F_x = self.backbone(x, t, s, labels, force_fp32, **model_kwargs).to(t.dtype)
        return self.map(x, F_x, t, s)

    def cfg_forward(self, x, t, s, class_labels=None, force_fp32=False, cfg_scale=None, **model_kwargs):
        """f_{s,t}(x) with classifier-free guidance: one backbone call on [x; x] with labels
        [zeros; class_labels] (unconditional half first), F = F_u + cfg_scale·(F_c - F_u), then the map.
        cfg_scale=None is a plain conditional `forward`. Pass cfg_scale by keyword."""
        t, s = torch.as_tensor(t, device=x.device), torch.as_tensor(s, device=x.device)
        if cfg_scale is None:
            return self.forward(x, t, s, class_labels, force_fp32, **model_kwargs)
        if self.label_dim == 0:
            raise ValueError("classifier-free guidance needs a conditional network")
        labels = self._labels(class_labels, x.shape[0], x.device).expand(x.shape[0], -1)
        # Per-sample times are repeated for the two halves; scalar times broadcast.
        t2, s2 = (v.flatten().repeat(2) if v.numel() > 1 else v for v in (t, s))
        F_x = self.backbone(
            torch.cat([x, x]),
            t2,
            s2,
            torch.cat([torch.zeros_like(labels), labels]),
            force_fp32,
            **model_kwargs,
        ).to(t.dtype)
        F_uncond, F_cond = F_x.chunk(2)
        return self.map(x, F_uncond + cfg_scale * (F_cond - F_uncond), t, s)
