"""The diffusers training objective for a UNet or DiT: the loss of
`huggingface/diffusers` 0.x `examples/unconditional_image_generation/train_unconditional.py` (and, for
`v_prediction`, of `examples/text_to_image/train_text_to_image.py`), Apache-2.0; written here.

x0 is the image in [-1, 1] (a UNet) or, for a DiT, a sample of the VAE's posterior times the VAE's
scaling factor (the latent DiT was trained on). Noise ε ~ N(0, I) and timesteps t ~ U{0, …,
num_train_timesteps − 1} are drawn; x_t = `DDPMScheduler.add_noise(x0, ε, t)` with the scheduler
config of the pipeline (the examples train with a DDPMScheduler of that config whatever the
pipeline samples with); the target is ε, x0 or v = `get_velocity(x0, ε, t)` as its prediction_type
says. `sample` is weighted by the SNR α̅_t / (1 − α̅_t), as train_unconditional.py weights it. The
loss is the mean squared error over every element.

A DiT is class-conditional with a null class for guidance: as in its training, each label is
replaced by the null label with probability 0.1, by diffusers' own `LabelEmbedding` in training
mode (DiT's class_dropout_prob; from torch's global RNG, which the fine-tune loop reseeds per
step). Its learned-σ channels get no loss (DiT's variational bound term is not part of this
objective; the family's samplers discard them).

Draw order, every draw on the CPU from the one `generator`, then moved to the net's device: the VAE
posterior's noise (DiT), ε, t.
"""

import torch
import torch.nn.functional as F


def _cpu_randn(shape, generator, device):
    return torch.randn(shape, generator=generator).to(device)


def encode(vae, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A sample of the VAE posterior of `images` ([-1, 1]) times the scaling factor (no gradients)."""
    with torch.no_grad():
        posterior = vae.encode(images.to(vae.dtype)).latent_dist
        eps = _cpu_randn(posterior.mean.shape, generator, posterior.mean.device).to(posterior.mean.dtype)
        return (posterior.mean + posterior.std * eps) * vae.config.scaling_factor


def diffusion_loss(predict, noise_scheduler, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The denoising loss (a scalar) of `predict(x_t, t)` on clean samples x0 [B, C, H, W].

    Args:
        predict: (x_t, t [B] int64) -> the model output with x0's channels (ε, x0 or v).
        noise_scheduler: a `DDPMScheduler` (its betas, num_train_timesteps and prediction_type).
        generator: CPU generator; draws ε, then t.
    """
    noise = _cpu_randn(x0.shape, generator, x0.device).to(x0.dtype)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator)
    t = t.to(x0.device)
    noisy = noise_scheduler.add_noise(x0, noise, t)
    output = predict(noisy, t).float()
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return F.mse_loss(output, noise.float())
    if kind == "v_prediction":
        return F.mse_loss(output, noise_scheduler.get_velocity(x0, noise, t).float())
    if kind == "sample":
        alpha = noise_scheduler.alphas_cumprod.to(x0.device)[t].float().view(-1, 1, 1, 1)
        return (alpha / (1 - alpha) * F.mse_loss(output, x0.float(), reduction="none")).mean()
    raise ValueError(f"unknown prediction_type {kind!r}")
