"""Sampling a diffusers UNet or DiT: the denoising loop over a diffusers scheduler, as pure functions.

Compatible with the loops of `huggingface/diffusers` 0.x `pipelines/ddpm/pipeline_ddpm.py`
(`DDPMPipeline`), `pipelines/ddim/pipeline_ddim.py` (`DDIMPipeline`) and `pipelines/dit/pipeline_dit.py`
(`DiTPipeline`, Apache-2.0): the same initial noise, timesteps, model calls, guidance, scheduler
steps and uint8 conversion, so with the per-sample CPU generators those pipelines accept as a list,
the images agree to one uint8 level (tests/families/test_diffusers_family.py). The scheduler objects
are diffusers' own; the loop is written here (see UPSTREAM.md for where it differs by design).

Randomness: every draw of sample i comes from `generators[i]`, a CPU `torch.Generator`; the initial
noise is drawn here on the CPU and moved to the net's device, and the generators are handed to the
scheduler's `step`, whose draws (diffusers' `randn_tensor`) are made on the CPU row by row too.
"""

import inspect

import torch

from neon.errors import NeonError


def normal(generators: list[torch.Generator], shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Standard normal [B, *shape]: row i drawn on the CPU from generators[i] (as `randn_tensor` draws
    for a list of generators), then moved to `device`."""
    rows = [torch.randn((1, *shape), generator=g, dtype=dtype) for g in generators]
    return torch.cat(rows).to(device)


def step_kwargs(scheduler, eta: float, generators: list[torch.Generator]) -> dict:
    """What `scheduler.step` takes besides (output, t, x): the generators where it draws noise, and
    `eta` where it has one (DDIM). A nonzero eta for a scheduler without one is an error."""
    params = inspect.signature(scheduler.step).parameters
    kwargs = {"generator": generators} if "generator" in params else {}
    if "eta" in params:
        kwargs["eta"] = eta
    elif eta:
        raise NeonError(f"sampler.eta={eta}: the {type(scheduler).__name__} has no eta (DDIM's)")
    return kwargs


def denoise(
    predict, scheduler, x: torch.Tensor, num_steps: int, eta: float, generators: list[torch.Generator]
) -> torch.Tensor:
    """Run `scheduler` from the noise `x` [B, C, H, W] (unit variance) over `num_steps` steps.

    Args:
        predict: (x_in, t) -> the model output the scheduler expects (ε, x0 or v, as its
            prediction_type says), for the scaled input x_in and the 0-dim timestep t.
        scheduler: a fresh diffusers scheduler (multistep schedulers keep state between steps).
        x: the initial noise; scaled by `init_noise_sigma` (1 for DDPM, DDIM and DPM-Solver).
        eta, generators: see `step_kwargs`.

    Returns:
        The final sample, [B, C, H, W] in the net's dtype (pixels in [-1, 1], or latents).
    """
    scheduler.set_timesteps(num_steps)
    kwargs = step_kwargs(scheduler, eta, generators)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        output = predict(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(output, t, x, **kwargs).prev_sample
    return x


def batch_timesteps(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The 0-dim timestep t as a [B] tensor on x's device, as the pipelines hand it to the net."""
    return torch.as_tensor(t)[None].to(x.device).expand(x.shape[0])


def unet_predictor(net, class_labels: torch.Tensor | None):
    """`predict` for a `UNet2DModel`: its output as it is (a learned-range variance head stays, for the
    scheduler to use); class labels go to the UNet's class embedding when it has one."""

    def predict(x, t):
        extra = {} if class_labels is None else {"class_labels": class_labels}
        return net(x, batch_timesteps(t, x), **extra).sample

    return predict


def dit_predictor(net, class_labels: torch.Tensor, null_label: int, cfg: float | None, latent_channels: int):
    """`predict` for a DiT transformer (DiTPipeline's step).

    With guidance (cfg not None and not 1) the net sees the batch twice, with the class labels and
    with the null label, and ε = ε_uncond + cfg·(ε_cond − ε_uncond) (classifier-free guidance; the
    guided half of the output is the ε channels alone). A learned-σ head (out_channels = 2 ×
    latent_channels) is dropped: the scheduler gets ε.
    """
    guided = cfg is not None and cfg != 1

    def predict(x, t):
        if guided:
            null = torch.full_like(class_labels, null_label)
            both = torch.cat([x, x])
            out = net(
                both, timestep=batch_timesteps(t, both), class_labels=torch.cat([class_labels, null])
            ).sample
            cond, uncond = out[:, :latent_channels].chunk(2)
            return uncond + cfg * (cond - uncond)
        return net(x, timestep=batch_timesteps(t, x), class_labels=class_labels).sample[:, :latent_channels]

    return predict


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] of DiT latents: the VAE decoder of latents / scaling_factor."""
    return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] of pixels nominally in [-1, 1], rounded as the pipelines' `numpy_to_pil`."""
    return ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
