"""The IMM family (Inductive Moment Matching, Zhou et al. 2025; lumalabs/imm @ c9473e9 as shipped in
SinaAlemohammad/Neon @ 76496c3): the preconditioned networks, the pushforward sampler, the training
loss and the SD-VAE latent space under upstream's names. See UPSTREAM.md for the file map."""

from imm.loss import IMMLoss
from imm.networks import DiT, DiT_XL_2, IMMPrecond, SongUNet, TimestepEmbedder
from imm.sampler import generators, initial_latents, pushforward_generator_fn, time_steps
from imm.vae import (
    IM256_RAW_MEAN,
    IM256_RAW_STD,
    SD_VAE_CONFIG,
    StabilityVAEEncoder,
    build_autoencoder,
    load_autoencoder,
)

__all__ = [
    "DiT",
    "DiT_XL_2",
    "IM256_RAW_MEAN",
    "IM256_RAW_STD",
    "IMMLoss",
    "IMMPrecond",
    "SD_VAE_CONFIG",
    "SongUNet",
    "StabilityVAEEncoder",
    "TimestepEmbedder",
    "build_autoencoder",
    "generators",
    "initial_latents",
    "load_autoencoder",
    "pushforward_generator_fn",
    "time_steps",
]
