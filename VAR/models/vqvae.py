"""VAR's tokenizer: the VQ-VAE (`VQVAE`) with its convolutional `Encoder` and `Decoder`.

Mirrors `FoundationVision/VAR:models/vqvae.py` and `models/basic_vae.py` @ 78b95394 (MIT License,
Copyright (c) 2024 FoundationVision), which adapt the f16 autoencoder of CompVis/latent-diffusion. The
code is written anew; class names, constructor kwargs, submodule names (hence state-dict keys and their
order) and numerics follow upstream.

Layout (fixed, as upstream): channel multipliers (1, 1, 2, 2, 4), two residual blocks per level (three
in the decoder), self-attention at the lowest resolution and in the middle, GroupNorm(32, eps 1e-6),
SiLU. The downsampling factor is 16, so an image of side 16·pn_S maps to a latent of side pn_S. Images
are float32 in [-1, 1]. The VQ-VAE's training forward is not ported (Neon keeps it frozen); the
attention block uses `scaled_dot_product_attention` (same softmax(qᵀk/√C)·v as upstream's two bmm's,
within float32 rounding).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .quant import VectorQuantizer2


def Normalize(in_channels, num_groups=32):
    return nn.GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


class Upsample2x(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, in_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample2x(nn.Module):
    """A stride-2 3x3 conv after zero-padding one column right and one row below (asymmetric, as upstream)."""

    def __init__(self, in_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, pad=(0, 1, 0, 1), mode="constant", value=0))


class ResnetBlock(nn.Module):
    def __init__(self, *, in_channels, out_channels=None, dropout):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions, with a residual connection."""

    def __init__(self, in_channels):
        super().__init__()
        self.C = in_channels
        self.norm = Normalize(in_channels)
        self.qkv = nn.Conv2d(in_channels, 3 * in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = (
            t.transpose(1, 2).unsqueeze(1) for t in self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)
        )
        h = F.scaled_dot_product_attention(q, k, v)  # [B, 1, HW, C], scale 1/√C
        return x + self.proj_out(h.squeeze(1).transpose(1, 2).reshape(B, C, H, W))


class _Level(nn.Module):
    """The residual blocks (and attention blocks) of one resolution; submodules block, attn, down/upsample."""

    def __init__(self, channels_in, channels_out, num_blocks, dropout, with_attn):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()
        for _ in range(num_blocks):
            self.block.append(
                ResnetBlock(in_channels=channels_in, out_channels=channels_out, dropout=dropout)
            )
            channels_in = channels_out
            if with_attn:
                self.attn.append(AttnBlock(channels_out))

    def forward(self, h):
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _Middle(nn.Module):
    def __init__(self, channels, dropout, using_mid_sa):
        super().__init__()
        self.block_1 = ResnetBlock(in_channels=channels, out_channels=channels, dropout=dropout)
        self.attn_1 = AttnBlock(channels) if using_mid_sa else nn.Identity()
        self.block_2 = ResnetBlock(in_channels=channels, out_channels=channels, dropout=dropout)

    def forward(self, h):
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Image [B, in_channels, H, W] -> latent [B, z_channels (x2 if double_z), H/f, W/f],
    f = 2^(len(ch_mult)-1)."""

    def __init__(
        self,
        *,
        ch=128,
        ch_mult=(1, 2, 4, 8),
        num_res_blocks=2,
        dropout=0.0,
        in_channels=3,
        z_channels,
        double_z=False,
        using_sa=True,
        using_mid_sa=True,
    ):
        super().__init__()
        self.ch, self.num_resolutions, self.num_res_blocks = ch, len(ch_mult), num_res_blocks
        self.downsample_ratio = 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level, mult in enumerate(ch_mult):
            lowest = i_level == self.num_resolutions - 1
            level = _Level(block_in, ch * mult, num_res_blocks, dropout, with_attn=lowest and using_sa)
            block_in = ch * mult
            if not lowest:
                level.downsample = Downsample2x(block_in)
            self.down.append(level)
        self.mid = _Middle(block_in, dropout, using_mid_sa)
        self.norm_out = Normalize(block_in)
        z_out = 2 * z_channels if double_z else z_channels
        self.conv_out = nn.Conv2d(block_in, z_out, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, z_channels, h, w] -> image [B, in_channels, h·f, w·f] (unclamped)."""

    def __init__(
        self,
        *,
        ch=128,
        ch_mult=(1, 2, 4, 8),
        num_res_blocks=2,
        dropout=0.0,
        in_channels=3,
        z_channels,
        using_sa=True,
        using_mid_sa=True,
    ):
        super().__init__()
        self.ch, self.num_resolutions, self.num_res_blocks = ch, len(ch_mult), num_res_blocks
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _Middle(block_in, dropout, using_mid_sa)
        # Built from the lowest resolution up, but indexed by level so that up.0 is the full resolution.
        levels = []
        for i_level in reversed(range(self.num_resolutions)):
            level = _Level(
                block_in,
                ch * ch_mult[i_level],
                num_res_blocks + 1,
                dropout,
                with_attn=i_level == self.num_resolutions - 1 and using_sa,
            )
            block_in = ch * ch_mult[i_level]
            if i_level != 0:
                level.upsample = Upsample2x(block_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQVAE(nn.Module):
    """Encoder, multi-scale quantiser (`quantize`), decoder, and the 3x3 convs `quant_conv` (after the
    encoder) and `post_quant_conv` (before the decoder). With `test_mode` (the default, and what VAR
    uses) the module is put in eval mode and its parameters are frozen."""

    def __init__(
        self,
        vocab_size=4096,
        z_channels=32,
        ch=128,
        dropout=0.0,
        beta=0.25,
        using_znorm=False,
        quant_conv_ks=3,
        quant_resi=0.5,
        share_quant_resi=4,
        default_qresi_counts=0,
        v_patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        test_mode=True,
    ):
        super().__init__()
        self.test_mode = test_mode
        self.V = self.vocab_size = vocab_size
        self.Cvae = z_channels
        ddconfig = dict(
            dropout=dropout,
            ch=ch,
            z_channels=z_channels,
            in_channels=3,
            ch_mult=(1, 1, 2, 2, 4),
            num_res_blocks=2,
            using_sa=True,
            using_mid_sa=True,
        )
        self.encoder = Encoder(double_z=False, **ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.downsample = 2 ** (len(ddconfig["ch_mult"]) - 1)
        self.quantize = VectorQuantizer2(
            vocab_size=vocab_size,
            Cvae=z_channels,
            using_znorm=using_znorm,
            beta=beta,
            default_qresi_counts=default_qresi_counts,
            v_patch_nums=v_patch_nums,
            quant_resi=quant_resi,
            share_quant_resi=share_quant_resi,
        )
        self.quant_conv = nn.Conv2d(
            z_channels, z_channels, quant_conv_ks, stride=1, padding=quant_conv_ks // 2
        )
        self.post_quant_conv = nn.Conv2d(
            z_channels, z_channels, quant_conv_ks, stride=1, padding=quant_conv_ks // 2
        )
        if test_mode:
            self.eval()
            self.requires_grad_(False)

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """f_hat [B, Cvae, pn_S, pn_S] -> image float32 [B, 3, 16·pn_S, 16·pn_S] clamped to [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1)

    def img_to_idxBl(self, inp_img_no_grad: torch.Tensor, v_patch_nums=None) -> list[torch.Tensor]:
        """Image float32 [B, 3, H, W] in [-1, 1] -> token maps, int64 [B, pn_k²] per scale k."""
        f = self.quant_conv(self.encoder(inp_img_no_grad))
        return self.quantize.f_to_idxBl_or_fhat(f, to_fhat=False, v_patch_nums=v_patch_nums)

    def idxBl_to_img(self, ms_idx_Bl: list[torch.Tensor], same_shape: bool, last_one=False):
        """Token maps (int64 [B, pn_k²] per scale) -> image [B, 3, H, W] in [-1, 1] after the last scale
        (`last_one`), or one image per scale. `same_shape` picks `embed_to_fhat(all_to_max_scale=...)`."""
        B = ms_idx_Bl[0].shape[0]
        ms_h_BChw = []
        for idx_Bl in ms_idx_Bl:
            pn = round(idx_Bl.shape[1] ** 0.5)
            ms_h_BChw.append(self.quantize.embedding(idx_Bl).transpose(1, 2).view(B, self.Cvae, pn, pn))
        return self.embed_to_img(ms_h_BChw=ms_h_BChw, all_to_max_scale=same_shape, last_one=last_one)

    def embed_to_img(self, ms_h_BChw: list[torch.Tensor], all_to_max_scale: bool, last_one=False):
        f_hats = self.quantize.embed_to_fhat(ms_h_BChw, all_to_max_scale=all_to_max_scale, last_one=last_one)
        return self.fhat_to_img(f_hats) if last_one else [self.fhat_to_img(f_hat) for f_hat in f_hats]

    def img_to_reconstructed_img(self, x: torch.Tensor, v_patch_nums=None, last_one=False):
        """Encode, quantise and decode: the reconstruction after the last scale, or after each scale."""
        f_hats = self.quantize.f_to_idxBl_or_fhat(
            self.quant_conv(self.encoder(x)), to_fhat=True, v_patch_nums=v_patch_nums
        )
        return self.fhat_to_img(f_hats[-1]) if last_one else [self.fhat_to_img(f_hat) for f_hat in f_hats]

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """As nn.Module's, except that `quantize.ema_vocab_hit_SV` of another number of scales is replaced by
        ours: the released VQ-VAE serves both patch-number sets, and upstream tolerates this the same way."""
        key = "quantize.ema_vocab_hit_SV"
        if key in state_dict and state_dict[key].shape[0] != self.quantize.ema_vocab_hit_SV.shape[0]:
            state_dict = {**state_dict, key: self.quantize.ema_vocab_hit_SV}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
