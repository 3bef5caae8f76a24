"""A family defined outside the project's packages, for the "families are found, not listed" test.

It is loaded with `--family tests.families.custom_family:family` and joins with no edit under
`neon/`. Its θ sits under `theta` in its files, beside a `model` entry holding other tensors of the
same keys and shapes (a raw copy, as training checkpoints keep), so a reader that guessed θ's place
instead of asking the family's format would merge or score the wrong tensors. It uses the core's
defaults for features (Inception) and the reference (`--ref`).

The model: 8×8 RGB images x = tanh(W z + b) from a standard normal z [B, 16] drawn per sample from
its seed; the loss is the mean squared error of reconstructing a training image from the same map
applied to noise drawn from the generator (a stand-in objective: it only needs gradients).
"""

import dataclasses

import torch

from neon.family import Model, read_checkpoint
from neon.io import checkpoint

SIDE, LATENT = 8, 16


@dataclasses.dataclass(frozen=True)
class CustomSampler:
    temperature: float = 1.0


class Generator(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.map = torch.nn.Linear(LATENT, 3 * SIDE * SIDE)

    def forward(self, z):
        return torch.tanh(self.map(z)).view(-1, 3, SIDE, SIDE)


class CustomFamily:
    name = "custom"
    Sampler = CustomSampler
    format = checkpoint.Format(weight_keys=(("theta",),))

    def tiny(self, seed: int) -> Model:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return Model(net=Generator(), image_size=SIDE, arch={"side": SIDE})

    def load(self, path, arch=None, device="cpu", codec=None) -> Model:
        model = self.tiny(0)
        model.net.load_state_dict(read_checkpoint(self, path).weights, strict=True)
        model.net.to(device).eval().requires_grad_(False)
        return model

    def sample(self, model, labels, seeds, sampler) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        z = torch.stack([torch.randn(LATENT, generator=g) for g in generators]) * sampler.temperature
        with torch.inference_mode():
            x = model.net(z.to(next(model.net.parameters()).device))
        return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)

    def loss(self, model, samples, labels, generator) -> torch.Tensor:
        z = torch.randn(len(samples), LATENT, generator=generator).to(samples.device)
        target = samples.float() / 127.5 - 1
        return (model.net(z) - target).square().mean()

    def container(self, model, state_dict) -> dict:
        raw = {k: v + 1.0 for k, v in state_dict.items()}  # same keys and shapes, other values
        return {"family": self.name, "theta": state_dict, "model": raw, "arch": model.arch}


family = CustomFamily()
