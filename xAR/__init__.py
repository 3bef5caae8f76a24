"""xAR (Ren et al. 2025, OliverRensu/xAR) for Neon: the next-cell flow-matching transformer, MAR's KL-16
VAE, the cell-by-cell SDE sampler and the flow-matching training loss. UPSTREAM.md maps upstream files
to ours."""

from .models import AutoencoderKL, kl16, xAR, xar_base, xar_huge, xar_large

__all__ = ["AutoencoderKL", "kl16", "xAR", "xar_base", "xar_huge", "xar_large"]
