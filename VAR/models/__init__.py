"""The VAR networks and `build_vae_var`, which builds the tokenizer and transformer of an official model.

Mirrors `FoundationVision/VAR:models/__init__.py` @ 78b95394 (MIT License, Copyright (c) 2024
FoundationVision); written anew with upstream's function name, arguments and defaults.
"""

import torch

from .quant import VectorQuantizer2
from .var import VAR
from .vqvae import VQVAE

__all__ = ["VAR", "VQVAE", "VectorQuantizer2", "build_vae_var"]


def build_vae_var(
    device,
    patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    V=4096,
    Cvae=32,
    ch=160,
    share_quant_resi=4,
    num_classes=1000,
    depth=16,
    shared_aln=False,
    attn_l2_norm=True,
    flash_if_available=True,
    fused_if_available=True,
    init_adaln=0.5,
    init_adaln_gamma=1e-5,
    init_head=0.02,
    init_std=-1,
) -> tuple[VQVAE, VAR]:
    """Build (vae, var) directly on `device` (a torch device or its name; 'meta' allocates nothing).

    A depth-d model has width 64·d, d heads of 64 channels and drop-path rate 0.1·d/24; label dropout 0.1,
    LayerNorm eps 1e-6, MLP ratio 4. The VQ-VAE is frozen (test mode) and its weights are whatever torch's
    default init gives; the VAR gets upstream's `init_weights`. Both are meant to be loaded from checkpoints.
    Unlike upstream, no torch class is patched to skip its default initialisation.
    """
    with torch.device(device):
        vae = VQVAE(
            vocab_size=V,
            z_channels=Cvae,
            ch=ch,
            test_mode=True,
            share_quant_resi=share_quant_resi,
            v_patch_nums=patch_nums,
        )
        var = VAR(
            vae_local=vae,
            num_classes=num_classes,
            depth=depth,
            embed_dim=64 * depth,
            num_heads=depth,
            drop_rate=0.0,
            attn_drop_rate=0.0,
            drop_path_rate=0.1 * depth / 24,
            norm_eps=1e-6,
            shared_aln=shared_aln,
            cond_drop_rate=0.1,
            attn_l2_norm=attn_l2_norm,
            patch_nums=patch_nums,
            flash_if_available=flash_if_available,
            fused_if_available=fused_if_available,
        )
        var.init_weights(
            init_adaln=init_adaln, init_adaln_gamma=init_adaln_gamma, init_head=init_head, init_std=init_std
        )
    return vae, var
