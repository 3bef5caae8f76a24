"""EDM training losses and EDM's non-leaking geometric augmentation.

`EDMLoss` (Karras et al. 2022, Eq. 2 with the Table 1 choices: ln σ ~ N(P_mean, P_std²), weight
λ(σ) = (σ² + σ_d²)/(σ·σ_d)²) and `VPLoss` are compatible with `NVlabs/edm:training/loss.py`,
`AugmentPipe` with `NVlabs/edm:training/augment.py` (both @ 008a4e5, code licensed CC BY-NC-SA 4.0
by NVIDIA): same class names, arguments, formulas and order of random draws, so a loss call after
`torch.manual_seed(s)` reproduces upstream's numbers for the same s. The code is written here.

Additions: every random draw can come from an explicit `generator` (drawn on the generator's device and
moved to the images', so a CPU generator gives the same values on any device), and the losses accept
`sigma`, `noise` and `augment_labels` to run without drawing at all. The augmentation pipe implements the
transformations EDM's train.py enables (x/y flips, isotropic and anisotropic scaling, fractional
rotation and translation); the integer rotation/translation and colour transforms of the StyleGAN2-ADA
heritage are not ported and raise if enabled.
"""

import math

import torch
import torch.nn.functional as F


def _on_generator(draw, *args, device, generator, **kwargs):
    """`draw(*args, **kwargs)` made on the generator's device (`device` without one: torch's global
    generator there, as upstream), then moved to `device`."""
    where = device if generator is None else generator.device
    return draw(*args, device=where, generator=generator, **kwargs).to(device)


def _randn(shape, like, generator):
    return _on_generator(torch.randn, shape, dtype=like.dtype, device=like.device, generator=generator)


def _denoising_loss(net, images, labels, sigma, weight, augment_pipe, noise, augment_labels, generator):
    """weight · (D(y + σn; σ) - y)², with y, augment_labels = augment_pipe(images) when a pipe is given."""
    if augment_pipe is not None:
        if augment_labels is not None:
            raise ValueError("pass either augment_pipe or augment_labels, not both")
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

    def __call__(
        self,
        net,
        images,
        labels=None,
        augment_pipe=None,
        *,
        sigma=None,
        noise=None,
        augment_labels=None,
        generator=None,
    ):
        if sigma is None:
            rnd_normal = _on_generator(
                torch.randn, [images.shape[0], 1, 1, 1], device=images.device, generator=generator
            )
            sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        return _denoising_loss(
            net, images, labels, sigma, weight, augment_pipe, noise, augment_labels, generator
        )


class VPLoss:
    """The VP-SDE loss (Song et al. 2021): t ~ U(ε_t, 1), σ = σ_VP(t), weight 1/σ². Same call
    contract as `EDMLoss`; its first draw is `rand([B, 1, 1, 1])` instead of `randn`."""

    def __init__(self, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5):
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t

    def __call__(
        self,
        net,
        images,
        labels,
        augment_pipe=None,
        *,
        sigma=None,
        noise=None,
        augment_labels=None,
        generator=None,
    ):
        if sigma is None:
            rnd_uniform = _on_generator(
                torch.rand, [images.shape[0], 1, 1, 1], device=images.device, generator=generator
            )
            sigma = self.sigma(1 + rnd_uniform * (self.epsilon_t - 1))
        weight = 1 / sigma**2
        return _denoising_loss(
            net, images, labels, sigma, weight, augment_pipe, noise, augment_labels, generator
        )

    def sigma(self, t):
        """σ(t) = √(exp(β_d t²/2 + β_min t) - 1)."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t**2) + self.beta_min * t).exp() - 1).sqrt()


# Low-pass decomposition filter of the Symlet-6 wavelet (PyWavelets' 'sym6'): the anti-aliasing filter
# of the 2x up- and down-sampling around the geometric warp.
_SYM6 = (
    0.015404109327027373,
    0.0034907120842174702,
    -0.11799011114819057,
    -0.048311742585633,
    0.4910559419267466,
    0.787641141030194,
    0.3379294217276218,
    -0.07263752278646252,
    -0.021060292512300564,
    0.04472490177066578,
    0.0017677118642428036,
    -0.007800708325034148,
)
_MARGIN = len(_SYM6) // 4  # extra border (in pixels) the filters need on each side


class _Draws:
    """`torch.rand` / `randn` / `randint` of the given shapes from one generator (None = torch's global
    generator), float32 / int64, drawn on the generator's device and moved to `device`."""

    def __init__(self, device, generator):
        self.device = device
        self.generator = generator

    def rand(self, *shape):
        return _on_generator(torch.rand, shape, device=self.device, generator=self.generator)

    def randn(self, *shape):
        return _on_generator(torch.randn, shape, device=self.device, generator=self.generator)

    def randint(self, high, *shape):
        return _on_generator(torch.randint, high, shape, device=self.device, generator=self.generator)

    def gate(self, values, prob, shape=None):
        """values where a fresh uniform draw (of `shape`, default values.shape) is below prob, else 0."""
        chosen = self.rand(*(values.shape if shape is None else shape)) < prob
        return torch.where(chosen, values, torch.zeros_like(values))


# Affine maps of the plane as 3x3 matrices acting on column vectors (x, y, 1).


def _affine(a, b, tx, c, d, ty):
    """[N, 3, 3] float32 matrices [[a, b, tx], [c, d, ty], [0, 0, 1]] from [N] tensors and numbers."""
    ref = next(v for v in (a, b, tx, c, d, ty) if isinstance(v, torch.Tensor))
    m = torch.zeros([ref.shape[0], 3, 3], device=ref.device)
    m[:, 0, 0], m[:, 0, 1], m[:, 0, 2] = a, b, tx
    m[:, 1, 0], m[:, 1, 1], m[:, 1, 2] = c, d, ty
    m[:, 2, 2] = 1
    return m


def _fixed_scaling(sx, sy, device):
    """One [3, 3] float32 scaling matrix from Python numbers (each rounded to float32 once)."""
    return torch.tensor([[sx, 0.0, 0.0], [0.0, sy, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float32, device=device)


def _fixed_shift(tx, ty, device):
    """One [3, 3] float32 translation matrix from Python numbers."""
    return torch.tensor([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]], dtype=torch.float32, device=device)


def _rotation(theta):
    """Counter-clockwise rotation by theta [N] (radians)."""
    return _affine(theta.cos(), (-theta).sin(), 0, theta.sin(), theta.cos(), 0)


def _scaling(sx, sy):
    return _affine(sx, 0, 0, 0, sy, 0)


def _shift(tx, ty):
    return _affine(1, 0, tx, 0, 1, ty)


# The random geometric transformations. Each draws its parameters (in the order the golden cases
# replay), and returns the factors of its inverse map, output -> input pixel coordinates (centred
# on the image), and its augment-label columns [N]. A parameter is zeroed (the identity) unless a
# second uniform draw is below `prob`.


def _isotropic_scaling(draw, n, prob, log2_std):
    w = draw.gate(draw.randn(n), prob)
    s = torch.exp2(w * log2_std)
    return [_scaling(1 / s, 1 / s)], [w]


def _fractional_rotation(draw, n, prob, max_turns):
    angle = draw.gate((draw.rand(n) * 2 - 1) * (math.pi * max_turns), prob)
    return [_rotation(angle)], [angle.cos() - 1, angle.sin()]


def _anisotropic_scaling(draw, n, prob, log2_std, rotate_prob):
    """Scale x by 1/s and y by s, s = 2^(w·log2_std), in a frame rotated by angle (with rotate_prob)."""
    w = draw.randn(n)
    angle = (draw.rand(n) * 2 - 1) * math.pi
    w = draw.gate(w, prob)
    angle = draw.gate(angle, rotate_prob)
    inv = 1 / torch.exp2(w * log2_std)
    # 1 / inv rather than s: the same float32 rounding as inverting the scaling matrix entrywise.
    factors = [_rotation(-angle), _scaling(inv, 1 / inv), _rotation(angle)]
    return factors, [w * angle.cos(), w * angle.sin()]


def _fractional_translation(draw, n, prob, std, height, width):
    w = draw.gate(draw.randn(2, n), prob, shape=(1, n))
    return [_shift(-(w[0] * (width * std)), -(w[1] * (height * std)))], [w[0], w[1]]


def _padding(G_inv, height, width):
    """Reflect padding [left, right, top, bottom] (ints) that covers where the output corners land in
    the input under G_inv [N, 3, 3], plus the filter margin; at most the image size minus one."""
    cx, cy = (width - 1) / 2, (height - 1) / 2
    corners = torch.tensor([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], device=G_inv.device)
    xy = (G_inv @ corners.T)[:, :2]  # [N, (x, y), corner]
    reach = torch.cat([(-xy).amax(dim=(0, 2)), xy.amax(dim=(0, 2))])  # -x_min, -y_min, x_max, y_max
    extra = torch.tensor([2 * _MARGIN - cx, 2 * _MARGIN - cy] * 2, device=G_inv.device)
    most = torch.tensor([width - 1, height - 1] * 2, dtype=torch.float32, device=G_inv.device)
    x0, y0, x1, y1 = (reach + extra).clamp(min=torch.zeros_like(most), max=most).ceil().tolist()
    return [int(x0), int(x1), int(y0), int(y1)]


def _fir(images, taps, axis, stride=1, padding=0):
    """Depthwise 1-D convolution of images [N, C, H, W] along `axis` (2 or 3) with taps [K]."""
    if axis == 2:
        kernel, stride, padding = taps.reshape(1, -1, 1), [stride, 1], [padding, 0]
    else:
        kernel, stride, padding = taps.reshape(1, 1, -1), [1, stride], [0, padding]
    C = images.shape[1]
    kernel = kernel.to(images.dtype).tile([C, 1, 1, 1])
    return F.conv2d(images, kernel, stride=stride, padding=padding, groups=C)


def _upsample2x(images, taps):
    """[N, C, H, W] -> [N, C, 2H, 2W]: zeros between the pixels, then the flipped taps along W, then H."""
    for axis in (3, 2):
        shape = list(images.shape)
        shape[axis] = 2 * shape[axis] - 1
        stuffed = images.new_zeros(shape)
        stuffed[(slice(None),) * axis + (slice(None, None, 2),)] = images
        images = _fir(stuffed, taps.flip(0), axis, padding=(len(taps) + 1) // 2)
    return images


def _downsample2x(images, taps):
    """[N, C, 2H + 4m, 2W + 4m] -> [N, C, H, W] (m = _MARGIN): filter and subsample along W, then H,
    cropping the filter margin."""
    m = _MARGIN
    images = _fir(images, taps, 3, stride=2, padding=(len(taps) - 1) // 2)[:, :, :, m:-m]
    return _fir(images, taps, 2, stride=2, padding=(len(taps) - 1) // 2)[:, :, m:-m, :]


def _warp(images, G_inv):
    """Resample images [N, C, H, W] float32 at G_inv [N, 3, 3] · (output pixel position), in pixel
    units from the image centre, without aliasing: reflect-pad, upsample 2x, bilinear `grid_sample`
    into a 2x grid with a filter margin, downsample 2x. Returns [N, C, H, W]."""
    N, C, H, W = images.shape
    device = images.device
    taps = torch.tensor(_SYM6, dtype=torch.float32, device=device)
    pad = _padding(G_inv, H, W)
    images = _upsample2x(F.pad(images, pad, mode="reflect"), taps)
    out_shape = [N, C, 2 * (H + 2 * _MARGIN), 2 * (W + 2 * _MARGIN)]

    # Re-express G_inv for the grid: centred on the padded image, in pixels of the 2x upsampled image
    # (whose pixel centres sit half a pixel off), then in grid_sample's [-1, 1] coordinates of the
    # input (on the left) and of the output grid (on the right).
    G = _fixed_shift((pad[0] - pad[1]) / 2, (pad[2] - pad[3]) / 2, device) @ G_inv
    up_h, up_w = images.shape[2:]
    out_h, out_w = out_shape[2:]
    for left, right in [
        (_fixed_scaling(2, 2, device), _fixed_scaling(1 / 2, 1 / 2, device)),
        (_fixed_shift(-0.5, -0.5, device), _fixed_shift(0.5, 0.5, device)),
        # The right factor inverts the scaling (2/out_w, 2/out_h) entrywise, in double precision.
        (
            _fixed_scaling(2 / up_w, 2 / up_h, device),
            _fixed_scaling(1 / (2 / out_w), 1 / (2 / out_h), device),
        ),
    ]:
        G = left @ G @ right
    grid = F.affine_grid(G[:, :2, :], out_shape, align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return _downsample2x(images, taps)


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

    def __init__(
        self,
        p=1,
        xflip=0,
        yflip=0,
        rotate_int=0,
        translate_int=0,
        translate_int_max=0.125,
        scale=0,
        rotate_frac=0,
        aniso=0,
        translate_frac=0,
        scale_std=0.2,
        rotate_frac_max=1,
        aniso_std=0.2,
        aniso_rotate_prob=0.5,
        translate_frac_std=0.125,
        brightness=0,
        contrast=0,
        lumaflip=0,
        hue=0,
        saturation=0,
        brightness_std=0.2,
        contrast_std=0.5,
        hue_max=1,
        saturation_std=1,
    ):
        unported = dict(
            rotate_int=rotate_int,
            translate_int=translate_int,
            brightness=brightness,
            contrast=contrast,
            lumaflip=lumaflip,
            hue=hue,
            saturation=saturation,
        )
        enabled = sorted(name for name, value in unported.items() if value > 0)
        if enabled:
            raise NotImplementedError(
                f"AugmentPipe: {', '.join(enabled)} not ported (EDM training does not use them)"
            )
        # Each multiplier times p is the probability of its transformation.
        self.p = float(p)
        self.xflip, self.yflip = float(xflip), float(yflip)
        self.scale = float(scale)
        self.scale_std = float(scale_std)  # log2 std of the scale factor
        self.rotate_frac = float(rotate_frac)
        self.rotate_frac_max = float(rotate_frac_max)  # largest rotation, in full turns
        self.aniso = float(aniso)
        self.aniso_std = float(aniso_std)  # log2 std of the anisotropy
        self.aniso_rotate_prob = float(aniso_rotate_prob)  # chance the anisotropy axes are rotated
        self.translate_frac = float(translate_frac)
        self.translate_frac_std = float(translate_frac_std)  # translation std, in image sizes

    def __call__(self, images, generator=None):
        N, C, H, W = images.shape
        draw = _Draws(images.device, generator)
        columns = []

        # Flips are exact pixel permutations, applied first: each image with probability
        # min(1, p·multiplier)/2.
        for axis, multiplier in ((3, self.xflip), (2, self.yflip)):
            if multiplier > 0:
                flip = draw.gate(draw.randint(2, N, 1, 1, 1), multiplier * self.p)
                images = torch.where(flip == 1, images.flip(axis), images)
                columns.append(flip.flatten())

        transforms = []
        if self.scale > 0:
            transforms.append(_isotropic_scaling(draw, N, self.scale * self.p, self.scale_std))
        if self.rotate_frac > 0:
            transforms.append(_fractional_rotation(draw, N, self.rotate_frac * self.p, self.rotate_frac_max))
        if self.aniso > 0:
            transforms.append(
                _anisotropic_scaling(draw, N, self.aniso * self.p, self.aniso_std, self.aniso_rotate_prob)
            )
        if self.translate_frac > 0:
            transforms.append(
                _fractional_translation(draw, N, self.translate_frac * self.p, self.translate_frac_std, H, W)
            )

        if transforms:
            # One warp for the whole chain; the product is taken left to right, starting at the identity.
            G_inv = torch.eye(3, device=images.device)
            for factors, labels in transforms:
                for factor in factors:
                    G_inv = G_inv @ factor
                columns += labels
            images = _warp(images, G_inv)

        if not columns:
            return images, torch.zeros([N, 0], device=images.device)
        return images, torch.stack([c.to(torch.float32) for c in columns], dim=1)
