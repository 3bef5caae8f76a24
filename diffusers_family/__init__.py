"""The diffusers family: Neon on diffusers UNet (DDPM/DDIM) and DiT pipelines, read from a pipeline
folder or a hub id. See UPSTREAM.md for what each module is compatible with."""

from diffusers_family.family import DiffusersFamily, DiffusersSampler, family

__all__ = ["DiffusersFamily", "DiffusersSampler", "family"]
