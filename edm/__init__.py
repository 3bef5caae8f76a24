"""The EDM family (Karras et al. 2022, NVlabs/edm @ 008a4e5): networks, sampler and losses under
upstream's names. See UPSTREAM.md for the file map."""

from edm.loss import AugmentPipe, EDMLoss, VPLoss
from edm.networks import (
    Conv2d,
    DhariwalUNet,
    EDMPrecond,
    FourierEmbedding,
    GroupNorm,
    Linear,
    PositionalEmbedding,
    SongUNet,
    UNetBlock,
    VEPrecond,
    VPPrecond,
)
from edm.sampler import StackedRandomGenerator, edm_sampler

__all__ = [
    "AugmentPipe",
    "Conv2d",
    "DhariwalUNet",
    "EDMLoss",
    "EDMPrecond",
    "FourierEmbedding",
    "GroupNorm",
    "Linear",
    "PositionalEmbedding",
    "SongUNet",
    "StackedRandomGenerator",
    "UNetBlock",
    "VEPrecond",
    "VPLoss",
    "VPPrecond",
    "edm_sampler",
]
