"""VAR (Tian et al. 2024, FoundationVision/VAR) for Neon: the VQ-VAE tokenizer, the next-scale transformer,
their builder and the teacher-forced training loss. UPSTREAM.md maps upstream files to ours."""

from .models import VAR, VQVAE, VectorQuantizer2, build_vae_var

__all__ = ["VAR", "VQVAE", "VectorQuantizer2", "build_vae_var"]
