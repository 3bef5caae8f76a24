"""The xAR networks and the KL-16 VAE, plus the checkpoint layouts they come in.

Mirrors the model files of `OliverRensu/xAR` @ 121e9c9 and `LTH14/mar:models/vae.py` @ fe470ac;
written anew (UPSTREAM.md).
"""

from .vae import LATENT_SCALE, AutoencoderKL, DiagonalGaussian, kl16, vae_state_dict
from .xar import NULL_CLASS, time_index, to_latent, to_tokens, xAR, xar_base, xar_huge, xar_large

__all__ = [
    "LATENT_SCALE",
    "NULL_CLASS",
    "AutoencoderKL",
    "DiagonalGaussian",
    "kl16",
    "time_index",
    "to_latent",
    "to_tokens",
    "vae_state_dict",
    "xAR",
    "xar_base",
    "xar_huge",
    "xar_large",
    "xar_state_dict",
]


def xar_state_dict(ckpt: dict) -> dict:
    """The xAR state dict inside a loaded checkpoint, as Neon's `calculate_fid.py` reads it:
    `ckpt['model_ema']` if present (Neon fine-tune snapshots), else `ckpt['state_dict']`, else the
    checkpoint itself (upstream's flat `xAR-B.pth` / `xAR-L.pth`). Load it with strict=True: it includes
    the `mask` and RoPE buffers."""
    for key in ("model_ema", "state_dict"):
        if key in ckpt:
            return ckpt[key]
    return ckpt
