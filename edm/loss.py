"""EDM training losses and EDM's non-leaking geometric augmentation.

`EDMLoss` (Karras et al. 2022, Eq. 2 with the Table 1 choices: ln σ ~ N(P_mean, P_std²), weight
λ(σ) = (σ² + σ_d²)/(σ·σ_d)²) and `VPLoss` mirror `NVlabs/edm:training/loss.py`; `AugmentPipe` mirrors
`NVlabs/edm:training/augment.py` (both @ 008a4e5, code licensed CC BY-NC-SA 4.0 by NVIDIA). Written
anew with upstream's class names, arguments, formulas and order of random draws, so a loss call after
`torch.manual_seed(s)` reproduces upstream's numbers for the same s.

Additions: every random draw can come from an explicit `generator`, and the losses accept `sigma`,
`noise` and `augment_labels` to run without drawing at all. The augmentation pipe implements the
transformations EDM's train.py enables (x/y flips, isotropic and anisotropic scaling, fractional
rotation and translation); the integer rotation/translation and colour transforms of the StyleGAN2-ADA
heritage are not ported and raise if enabled.
"""


import numpy as np
import torch
import torch.nn.functional as F


def _randn(shape, like, generator):
    return torch.randn(shape, dtype=like.dtype, device=like.device, generator=generator)


def _denoising_loss(net, images, labels, sigma, weight, augment_pipe, noise, augment_labels, generator):
    """weight · (D(y + σn; σ) - y)², with y, augment_labels = augment_pipe(images) when a pipe is given."""
    if augment_pipe is not None:
        if augment_labels is not None:
            raise ValueError('pass either augment_pipe or augment_labels, not both')
        y, augment_labels = augment_pipe(images, generator=generator)
    else:
        y = images
    if noise is None:
        noise = _randn(y.shape, y, generator)  # the same stream as torch.randn_like(y)
    D_yn = net(y + noise * sigma, sigma, labels, augment_labels=augment_labels)
    return weight * ((D_yn - y) ** 2)


class EDMLoss:
    """EDM's denoising score-matching loss.

    __call__(net, images [B, C, H, W] float32 in [-1, 1], labels [B, label_dim] or None,
    augment_pipe=None) -> the per-element loss [B, C, H, W], NOT reduced (EDM's training loop sums it
    and divides by the batch size). Random draws, in upstream's order: ln σ ~ N(P_mean, P_std²) as
    `randn([B, 1, 1, 1])`, then the pipe's draws, then the noise `randn_like(y)`; all from
    `generator` (None = torch's global generator, as upstream). Keyword-only `sigma` ([B, 1, 1, 1]),
    `noise` ([B, C, H, W], unit variance) and `augment_labels` ([B, augment_dim], without a pipe)
    replace the corresponding draws.
    """

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, images, labels=None, augment_pipe=None, *, sigma=None, noise=None,
                 augment_labels=None, generator=None):
        if sigma is None:
            rnd_normal = torch.randn([images.shape[0], 1, 1, 1], device=images.device, generator=generator)
            sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        return _denoising_loss(net, images, labels, sigma, weight, augment_pipe, noise, augment_labels, generator)


class VPLoss:
    """The VP-SDE loss (Song et al. 2021): t ~ U(ε_t, 1), σ = σ_VP(t), weight 1/σ². Same call
    contract as `EDMLoss`; its first draw is `rand([B, 1, 1, 1])` instead of `randn`."""

    def __init__(self, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5):
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t

    def __call__(self, net, images, labels, augment_pipe=None, *, sigma=None, noise=None,
                 augment_labels=None, generator=None):
        if sigma is None:
            rnd_uniform = torch.rand([images.shape[0], 1, 1, 1], device=images.device, generator=generator)
            sigma = self.sigma(1 + rnd_uniform * (self.epsilon_t - 1))
        weight = 1 / sigma ** 2
        return _denoising_loss(net, images, labels, sigma, weight, augment_pipe, noise, augment_labels, generator)

    def sigma(self, t):
        """σ(t) = √(exp(β_d t²/2 + β_min t) - 1)."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()


# Low-pass filter of the Symlet-6 wavelet, used to upsample 2x before the geometric warp and to
# downsample afterwards (values as in PyWavelets / upstream).
_SYM6 = np.asarray([
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
], dtype=np.float32)


def _matrix(*rows, device=None):
    """A float32 matrix [R, C] from rows of numbers, or a batch [..., R, C] when some entries are
    tensors (numbers are broadcast to the tensors' shape)."""
    entries = [e for row in rows for e in row]
    ref = next((e for e in entries if isinstance(e, torch.Tensor)), None)
    if ref is None:
        return torch.as_tensor(np.asarray(rows), dtype=torch.float32, device=device)
    entries = [e if isinstance(e, torch.Tensor) else torch.full(ref.shape, e, dtype=torch.float32, device=ref.device)
               for e in entries]
    return torch.stack(entries, dim=-1).reshape(ref.shape + (len(rows), -1))


def _translate(tx, ty, **kwargs):
    return _matrix([1, 0, tx], [0, 1, ty], [0, 0, 1], **kwargs)


def _scale(sx, sy, **kwargs):
    return _matrix([sx, 0, 0], [0, sy, 0], [0, 0, 1], **kwargs)


def _rotate(theta, **kwargs):
    return _matrix([torch.cos(theta), torch.sin(-theta), 0], [torch.sin(theta), torch.cos(theta), 0], [0, 0, 1],
                   **kwargs)


# The inverse maps, spelled as upstream computes them (1/(1/s) is not always s in float32).
def _translate_inv(tx, ty, **kwargs):
    return _translate(-tx, -ty, **kwargs)


def _scale_inv(sx, sy, **kwargs):
    return _scale(1 / sx, 1 / sy, **kwargs)


def _rotate_inv(theta, **kwargs):
    return _rotate(-theta, **kwargs)


class AugmentPipe:
    """EDM's augmentation (after StyleGAN2-ADA, Karras et al. 2020), "non-leaking" because the network
    is told the applied transformation through `augment_labels` and sampling passes none.

    __call__(images float32 [N, C, H, W], generator=None) -> (augmented images [N, C, H, W],
    augment_labels float32 [N, L]); L = 9 for EDM's setting (xflip, yflip, scale, rotation as
    cos-1 and sin, anisotropy w·cos r and w·sin r, tx, ty). Each enabled transformation draws from
    `generator` (None = torch's global generator) in upstream's order and is applied with
    probability `p` times its multiplier. EDM's train.py uses p=0.12 (CIFAR-10) or 0.15 (FFHQ) with
    xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1. Once any geometric
    transformation is enabled, every image is resampled (pad, 2x upsample, warp, 2x downsample),
    so even unaugmented images change by float rounding.
    """

    def __init__(self, p=1,
        xflip=0, yflip=0, rotate_int=0, translate_int=0, translate_int_max=0.125,
        scale=0, rotate_frac=0, aniso=0, translate_frac=0, scale_std=0.2, rotate_frac_max=1, aniso_std=0.2,
        aniso_rotate_prob=0.5, translate_frac_std=0.125,
        brightness=0, contrast=0, lumaflip=0, hue=0, saturation=0, brightness_std=0.2, contrast_std=0.5,
        hue_max=1, saturation_std=1,
    ):
        unported = dict(rotate_int=rotate_int, translate_int=translate_int, brightness=brightness, contrast=contrast,
                        lumaflip=lumaflip, hue=hue, saturation=saturation)
        enabled = sorted(name for name, value in unported.items() if value > 0)
        if enabled:
            raise NotImplementedError(f'AugmentPipe: {", ".join(enabled)} not ported (EDM training does not use them)')
        self.p = float(p)
        self.xflip = float(xflip)
        self.yflip = float(yflip)
        self.scale = float(scale)
        self.rotate_frac = float(rotate_frac)
        self.aniso = float(aniso)
        self.translate_frac = float(translate_frac)
        self.scale_std = float(scale_std)                    # log2 std of isotropic scaling
        self.rotate_frac_max = float(rotate_frac_max)        # rotation range, 1 = full circle
        self.aniso_std = float(aniso_std)                    # log2 std of anisotropic scaling
        self.aniso_rotate_prob = float(aniso_rotate_prob)    # chance the anisotropy axes are rotated
        self.translate_frac_std = float(translate_frac_std)  # translation std, in image sizes

    def __call__(self, images, generator=None):
        N, C, H, W = images.shape
        device = images.device
        rand = lambda *shape: torch.rand(shape, device=device, generator=generator)
        randn = lambda *shape: torch.randn(shape, device=device, generator=generator)
        labels = [torch.zeros([N, 0], device=device)]

        # Flips: each image is flipped with probability p·multiplier / 2.
        for multiplier, axis in ((self.xflip, 3), (self.yflip, 2)):
            if multiplier > 0:
                w = torch.randint(2, [N, 1, 1, 1], device=device, generator=generator)
                w = torch.where(rand(N, 1, 1, 1) < multiplier * self.p, w, torch.zeros_like(w))
                images = torch.where(w == 1, images.flip(axis), images)
                labels.append(w)

        # G_inv maps output pixel coordinates to input ones; built up by right-multiplication.
        identity = torch.eye(3, device=device)
        G_inv = identity
        if self.scale > 0:
            w = randn(N)
            w = torch.where(rand(N) < self.scale * self.p, w, torch.zeros_like(w))
            s = w.mul(self.scale_std).exp2()
            G_inv = G_inv @ _scale_inv(s, s)
            labels.append(w)
        if self.rotate_frac > 0:
            w = (rand(N) * 2 - 1) * (np.pi * self.rotate_frac_max)
            w = torch.where(rand(N) < self.rotate_frac * self.p, w, torch.zeros_like(w))
            G_inv = G_inv @ _rotate_inv(-w)
            labels += [w.cos() - 1, w.sin()]
        if self.aniso > 0:
            w = randn(N)
            r = (rand(N) * 2 - 1) * np.pi
            w = torch.where(rand(N) < self.aniso * self.p, w, torch.zeros_like(w))
            r = torch.where(rand(N) < self.aniso_rotate_prob, r, torch.zeros_like(r))
            s = w.mul(self.aniso_std).exp2()
            G_inv = G_inv @ _rotate_inv(r) @ _scale_inv(s, 1 / s) @ _rotate_inv(-r)
            labels += [w * r.cos(), w * r.sin()]
        if self.translate_frac > 0:
            w = randn(2, N)
            w = torch.where(rand(1, N) < self.translate_frac * self.p, w, torch.zeros_like(w))
            G_inv = G_inv @ _translate_inv(w[0].mul(W * self.translate_frac_std), w[1].mul(H * self.translate_frac_std))
            labels += [w[0], w[1]]

        if G_inv is not identity:
            images = self._warp(images, G_inv)

        labels = torch.cat([x.to(torch.float32).reshape(N, -1) for x in labels], dim=1)
        return images, labels

    @staticmethod
    def _warp(images, G_inv):
        """Resample images [N, C, H, W] through G_inv [N, 3, 3] without aliasing: reflect-pad enough
        to cover the warped corners, upsample 2x with the sym6 filter, bilinear `grid_sample`, then
        filter and downsample 2x back to [N, C, H, W]."""
        N, C, H, W = images.shape
        device = images.device
        Hz = _SYM6
        Hz_pad = len(Hz) // 4

        # Padding: how far the image corners travel (plus the filter support), clipped to the size.
        cx = (W - 1) / 2
        cy = (H - 1) / 2
        corners = _matrix([-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1], device=device)  # [4, xyz]
        corners = G_inv @ corners.t()  # [N, xyz, 4]
        margin = corners[:, :2, :].permute(1, 0, 2).flatten(1)  # [xy, N*4]
        margin = torch.cat([-margin, margin]).max(dim=1).values  # [x0, y0, x1, y1]
        margin = margin + torch.as_tensor([Hz_pad * 2 - cx, Hz_pad * 2 - cy] * 2, dtype=torch.float32, device=device)
        margin = margin.max(torch.zeros(4, device=device))
        margin = margin.min(torch.as_tensor([W - 1, H - 1] * 2, dtype=torch.float32, device=device))
        mx0, my0, mx1, my1 = margin.ceil().to(torch.int32)
        images = F.pad(images, [int(mx0), int(mx1), int(my0), int(my1)], mode='reflect')
        G_inv = _translate((mx0 - mx1) / 2, (my0 - my1) / 2) @ G_inv

        # 2x upsampling: interleave zeros, then filter rows and columns with the flipped sym6 taps.
        taps = torch.as_tensor(Hz[::-1].copy(), dtype=images.dtype, device=device)[None, None].tile([C, 1, 1])
        pad = (len(Hz) + 1) // 2
        images = torch.stack([images, torch.zeros_like(images)], dim=4).reshape(N, C, images.shape[2], -1)[:, :, :, :-1]
        images = F.conv2d(images, taps.unsqueeze(2), groups=C, padding=[0, pad])
        images = torch.stack([images, torch.zeros_like(images)], dim=3).reshape(N, C, -1, images.shape[3])[:, :, :-1, :]
        images = F.conv2d(images, taps.unsqueeze(3), groups=C, padding=[pad, 0])
        G_inv = _scale(2, 2, device=device) @ G_inv @ _scale_inv(2, 2, device=device)
        G_inv = _translate(-0.5, -0.5, device=device) @ G_inv @ _translate_inv(-0.5, -0.5, device=device)

        # Warp in normalised [-1, 1] coordinates.
        shape = [N, C, (H + Hz_pad * 2) * 2, (W + Hz_pad * 2) * 2]
        G_inv = (_scale(2 / images.shape[3], 2 / images.shape[2], device=device) @ G_inv
                 @ _scale_inv(2 / shape[3], 2 / shape[2], device=device))
        grid = F.affine_grid(theta=G_inv[:, :2, :], size=shape, align_corners=False)
        images = F.grid_sample(images, grid, mode='bilinear', padding_mode='zeros', align_corners=False)

        # 2x downsampling with the sym6 taps, cropping the filter margin.
        taps = torch.as_tensor(Hz, dtype=images.dtype, device=device)[None, None].tile([C, 1, 1])
        pad = (len(Hz) - 1) // 2
        images = F.conv2d(images, taps.unsqueeze(2), groups=C, stride=[1, 2], padding=[0, pad])[:, :, :, Hz_pad:-Hz_pad]
        images = F.conv2d(images, taps.unsqueeze(3), groups=C, stride=[2, 1], padding=[pad, 0])[:, :, Hz_pad:-Hz_pad, :]
        return images
