"""EDM networks: the DDPM++/NCSN++ U-Net (`SongUNet`), the ADM U-Net (`DhariwalUNet`), the layers
they are built from, and the preconditioners (`EDMPrecond`, `VPPrecond`, `VEPrecond`) that turn a
U-Net F into a denoiser D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ)).

Compatible with `NVlabs/edm:training/networks.py` @ 008a4e5 (Karras et al. 2022; code licensed CC
BY-NC-SA 4.0 by NVIDIA): class names, constructor keyword arguments, submodule names (hence state-dict
keys and their order), initialisation and numerics follow upstream, so the `ema` state dict of an
official pickle loads strictly into a network built from that pickle's init kwargs. The code is
written here; the U-Net forward passes walk the `enc`/`dec` module dicts by each entry's role.
Differences: no `persistence` decorator (we never pickle source code); attention calls
`torch.nn.functional.scaled_dot_product_attention` instead of a custom autograd function (same
softmax(QᵀK/√c)·V, within float32 rounding); `model_type` is looked up in a fixed table rather than
in the module globals; `iDDPMPrecond` is not ported.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def _initial(shape: list[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """Initial values drawn from torch's global generator; the draw order matches upstream, so a
    network built after `torch.manual_seed(s)` gets upstream's initial weights for the same s."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init mode {mode!r}")


class Linear(nn.Module):
    """Fully connected layer on the last axis: [..., in_features] -> [..., out_features].

    Weights are cast to the input's dtype, so the float32 parameters serve float16 activations.
    """

    def __init__(
        self, in_features, out_features, bias=True, init_mode="kaiming_normal", init_weight=1, init_bias=0
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(_initial([out_features, in_features], **fans) * init_weight)
        # Upstream draws the bias even when init_bias is 0; keep the draw so the RNG stream matches.
        self.bias = nn.Parameter(_initial([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class Conv2d(nn.Module):
    """2-D convolution ("same" padding, odd `kernel`) with optional 2x up- or down-sampling by the
    separable FIR `resample_filter` (normalised to unit DC gain). x [N, in_channels, H, W] ->
    [N, out_channels, H', W'] with H' = 2H (up), H/2 (down) or H.

    `kernel=0` gives a pure resampler (no weight, in_channels == out_channels). `fused_resample`
    convolves and resamples in one padded pass (upstream uses it for NCSN++'s residual encoder).
    The persistent buffer `resample_filter` [1, 1, k, k] exists only when up or down is set.
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel,
        bias=True,
        up=False,
        down=False,
        resample_filter=(1, 1),
        fused_resample=False,
        init_mode="kaiming_normal",
        init_weight=1,
        init_bias=0,
    ):
        super().__init__()
        assert not (up and down)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(
            mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel
        )
        shape = [out_channels, in_channels, kernel, kernel]
        self.weight = nn.Parameter(_initial(shape, **fans) * init_weight) if kernel else None
        self.bias = nn.Parameter(_initial([out_channels], **fans) * init_bias) if kernel and bias else None
        taps = torch.as_tensor(resample_filter, dtype=torch.float32)
        fir = torch.outer(taps, taps)[None, None] / taps.sum().square()
        self.register_buffer("resample_filter", fir if up or down else None)

    def forward(self, x):
        w = None if self.weight is None else self.weight.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        f_pad = 0 if f is None else (f.shape[-1] - 1) // 2

        if self.fused_resample and self.up and w is not None:
            # Zero-stuffing transposed conv (x4 keeps the mean), then the conv with the padding left over.
            up = (f * 4).tile([self.in_channels, 1, 1, 1])
            x = F.conv_transpose2d(x, up, stride=2, groups=self.in_channels, padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), stride=2, groups=self.out_channels)
        else:
            if self.up:
                up = (f * 4).tile([self.in_channels, 1, 1, 1])
                x = F.conv_transpose2d(x, up, stride=2, groups=self.in_channels, padding=f_pad)
            if self.down:
                x = F.conv2d(
                    x, f.tile([self.in_channels, 1, 1, 1]), stride=2, groups=self.in_channels, padding=f_pad
                )
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with at most `num_groups` groups and at least `min_channels_per_group`
    channels in each (so narrow layers get fewer groups). x [N, C, ...] -> same shape."""

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(
            x, self.num_groups, weight=self.weight.to(x.dtype), bias=self.bias.to(x.dtype), eps=self.eps
        )


class UNetBlock(nn.Module):
    """Residual block shared by DDPM++, NCSN++ and ADM: GroupNorm-SiLU-conv, the embedding injected
    as a shift (or as scale and shift with `adaptive_scale`), GroupNorm-SiLU-dropout-conv, a skip
    connection (projected when the shape changes), optional 2x resampling, and optional multi-head
    self-attention. x [N, in_channels, H, W], emb [N or 1, emb_channels] -> [N, out_channels, H', W'].

    The number of heads is `num_heads` if given, else out_channels // channels_per_head (0 without
    `attention`). Both sums (residual and attention) are multiplied by `skip_scale`.
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        emb_channels,
        up=False,
        down=False,
        attention=False,
        num_heads=None,
        channels_per_head=64,
        dropout=0,
        skip_scale=1,
        eps=1e-5,
        resample_filter=(1, 1),
        resample_proj=False,
        adaptive_scale=True,
        init=None,
        init_zero=None,
        init_attn=None,
    ):
        super().__init__()
        init = {} if init is None else init
        init_zero = dict(init_weight=0) if init_zero is None else init_zero
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(
            in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter, **init
        )
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            # A 1x1 projection when the width changes (or when asked); otherwise only resampling.
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(
                in_channels,
                out_channels,
                kernel=kernel,
                up=up,
                down=down,
                resample_filter=resample_filter,
                **init,
            )

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(
                out_channels, out_channels * 3, kernel=1, **(init if init_attn is None else init_attn)
            )
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))

        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))

        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (orig if self.skip is None else self.skip(orig))) * self.skip_scale

        if self.num_heads:
            n, c, h, w = x.shape
            # qkv channels are laid out as [head, channel, (q, k, v)]: the checkpoints depend on it.
            q, k, v = (
                self.qkv(self.norm2(x)).reshape(n * self.num_heads, c // self.num_heads, 3, h * w).unbind(2)
            )
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            # Back to contiguous NCHW: a channels-last view would propagate through the following
            # convolutions and change which elements dropout masks in training (masks follow memory order).
            a = a.transpose(1, 2).contiguous().reshape(n, c, h, w)
            x = (self.proj(a) + x) * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a noise level: x [N] -> [N, num_channels] = [cos(x·f), sin(x·f)] with
    f_j = max_positions^(-j/(num_channels/2 - endpoint)), j < num_channels/2."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (
            half - (1 if self.endpoint else 0)
        )
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of a noise level: x [N] -> [N, num_channels] = [cos(2πx·f), sin(2πx·f)].
    The frequencies f ~ N(0, scale²) are a persistent buffer `freqs` [num_channels/2], drawn at
    construction from torch's global generator (load them from the checkpoint)."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


def _role(name):
    """What an `enc`/`dec` entry does, from the key the constructor gave it:
    '16x16_aux_down' -> 'aux_down'."""
    return name.split("_", 1)[1]


def _label_dropout(labels, p, n, training):
    """Classifier-free-guidance dropout: in training, each of the n rows of labels [n or 1, label_dim]
    is zeroed with probability p (one `rand([n, 1])` draw from torch's global generator)."""
    if not (training and p):
        return labels
    keep = torch.rand([n, 1], device=labels.device) >= p
    return labels * keep.to(labels.dtype)


def _encode(enc, x, emb):
    """Run a U-Net encoder (`enc` ModuleDict, in order) on x [N, C, R, R] with the embedding emb.
    Returns the bottleneck features and `skips`, one tensor per decoder 'block*' entry, consumed last first.

    Roles: 'conv' (first convolution), 'down' and 'block*' (UNetBlocks); each adds a skip. SongUNet's
    skip/residual encoders also carry the input image down the levels: 'aux_down' downsamples it,
    'aux_skip' adds its projection to the features, 'aux_residual' adds it and rescales by 1/√2 (the
    result is also the next level's image); both replace the level's last skip instead of adding one.
    """
    skips = []
    image = x
    for name, module in enc.items():
        role = _role(name)
        if role == "aux_down":
            image = module(image)
        elif role in ("aux_skip", "aux_residual"):
            x = x + module(image)
            if role == "aux_residual":
                x = image = x / math.sqrt(2)
            skips[-1] = x
        else:
            x = module(x) if role == "conv" else module(x, emb)
            skips.append(x)
    return x, skips


def _decode(dec, x, emb, skips):
    """Run a U-Net decoder (`dec` ModuleDict, in order) from the bottleneck x, popping `skips`.
    Returns (features, image): the last block's output and the sum of SongUNet's output heads (None
    when the decoder has none).

    Roles: 'in0', 'in1' and 'up' (UNetBlocks on the features), 'block*' (UNetBlocks on the features
    concatenated with the next skip along channels), and the output heads: 'aux_norm' then
    'aux_conv' (GroupNorm, SiLU, conv) turn the features into an image that is added to the image so
    far; 'aux_up' upsamples that image on entering a finer level (skip decoder).
    """
    image = None
    head = None
    for name, module in dec.items():
        role = _role(name)
        if role == "aux_up":
            image = module(image)
        elif role == "aux_norm":
            head = module(x)
        elif role == "aux_conv":
            head = module(F.silu(head))
            image = head if image is None else image + head
        else:
            if role.startswith("block"):
                x = torch.cat([x, skips.pop()], dim=1)
            x = module(x, emb)
    return x, image


class SongUNet(nn.Module):
    """The DDPM++ / NCSN++ U-Net of Song et al. 2021 ("Score-Based Generative Modeling through SDEs")
    as reimplemented by EDM. DDPM++: embedding_type='positional', channel_mult_noise=1,
    encoder_type='standard', resample_filter=[1,1]. NCSN++: 'fourier', 2, 'residual', [1,3,3,1].

    forward(x [N, in_channels, R, R], noise_labels [N] or [1], class_labels [N, label_dim] or None,
    augment_labels [N, augment_dim] or None) -> [N, out_channels, R, R], in x's dtype. The
    augmentation embedding is skipped when augment_labels is None (the sampling path).
    """

    def __init__(
        self,
        img_resolution,  # Input and output resolution R.
        in_channels,  # Channels of the input image.
        out_channels,  # Channels of the output image.
        label_dim=0,  # Number of classes; 0 = unconditional.
        augment_dim=0,  # Length of the augmentation label vector; 0 = none.
        model_channels=128,  # Base channel count.
        channel_mult=(1, 2, 2, 2),  # Channel multiplier per resolution level.
        channel_mult_emb=4,  # Embedding width = model_channels * channel_mult_emb.
        num_blocks=4,  # Residual blocks per level.
        attn_resolutions=(16,),  # Resolutions with self-attention.
        dropout=0.10,  # Dropout inside the residual blocks.
        label_dropout=0,  # Probability of dropping the class label in training (CFG).
        embedding_type="positional",  # 'positional' (DDPM++) or 'fourier' (NCSN++).
        channel_mult_noise=1,  # Noise embedding width = model_channels * channel_mult_noise.
        encoder_type="standard",  # 'standard', 'skip' or 'residual' (NCSN++).
        decoder_type="standard",  # 'standard' or 'skip'.
        resample_filter=(1, 1),  # FIR taps for up/down-sampling.
    ):
        assert embedding_type in ("fourier", "positional")
        assert encoder_type in ("standard", "skip", "residual")
        assert decoder_type in ("standard", "skip")
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block_kwargs = dict(
            emb_channels=emb_channels,
            num_heads=1,
            dropout=dropout,
            skip_scale=math.sqrt(0.5),
            eps=1e-6,
            resample_filter=resample_filter,
            resample_proj=True,
            adaptive_scale=False,
            init=init,
            init_zero=init_zero,
            init_attn=init_attn,
        )

        # Mapping network (construction order fixes both the state-dict order and the RNG stream).
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder. 'aux' entries carry the downsampled input image (skip/residual encoders).
        self.enc = nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(
                        caux, caux, kernel=0, down=True, resample_filter=resample_filter
                    )
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        caux,
                        cout,
                        kernel=3,
                        down=True,
                        resample_filter=resample_filter,
                        fused_resample=True,
                        **init,
                    )
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=res in attn_resolutions, **block_kwargs
                )
        skips = [block.out_channels for name, block in self.enc.items() if "aux" not in name]

        # Decoder. 'aux' entries produce the output image (at every level for the skip decoder).
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attention = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=attention, **block_kwargs
                )
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(
                        out_channels, out_channels, kernel=0, up=True, resample_filter=resample_filter
                    )
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        cos, sin = self.map_noise(noise_labels).chunk(2, dim=1)
        emb = torch.cat([sin, cos], dim=1)  # DDPM++ feeds the sine half first
        if self.map_label is not None:
            labels = _label_dropout(class_labels, self.label_dropout, x.shape[0], self.training)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        for layer in (self.map_layer0, self.map_layer1):
            emb = F.silu(layer(emb))

        features, skips = _encode(self.enc, x, emb)
        _, image = _decode(self.dec, features, emb, skips)
        return image


class DhariwalUNet(nn.Module):
    """The ADM U-Net of Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs") as reimplemented by EDM.

    forward(x [N, in_channels, R, R], noise_labels [N] or [1], class_labels [N, label_dim] or None,
    augment_labels [N, augment_dim] or None) -> [N, out_channels, R, R], in x's dtype.
    """

    def __init__(
        self,
        img_resolution,  # Input and output resolution R.
        in_channels,  # Channels of the input image.
        out_channels,  # Channels of the output image.
        label_dim=0,  # Number of classes; 0 = unconditional.
        augment_dim=0,  # Length of the augmentation label vector; 0 = none.
        model_channels=192,  # Base channel count.
        channel_mult=(1, 2, 3, 4),  # Channel multiplier per resolution level.
        channel_mult_emb=4,  # Embedding width = model_channels * channel_mult_emb.
        num_blocks=3,  # Residual blocks per level.
        attn_resolutions=(32, 16, 8),  # Resolutions with self-attention.
        dropout=0.10,  # Dropout inside the residual blocks.
        label_dropout=0,  # Probability of dropping the class label in training (CFG).
    ):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block_kwargs = dict(
            emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero
        )

        # Mapping network (note: map_label comes last here, unlike SongUNet).
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = (
            Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        )
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = None
        if label_dim:
            self.map_label = Linear(
                label_dim,
                emb_channels,
                bias=False,
                init_mode="kaiming_normal",
                init_weight=math.sqrt(label_dim),
            )

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=res in attn_resolutions, **block_kwargs
                )
        skips = [block.out_channels for block in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=res in attn_resolutions, **block_kwargs
                )
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(
                _label_dropout(class_labels, self.label_dropout, x.shape[0], self.training)
            )
        emb = F.silu(emb)

        features, skips = _encode(self.enc, x, emb)
        features, _ = _decode(self.dec, features, emb, skips)
        return self.out_conv(F.silu(self.out_norm(features)))


_UNETS = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


def _inputs(net, x, sigma, class_labels, force_fp32):
    """Shared input handling of the preconditioners: x as float32, sigma as float32 [N or 1, 1, 1, 1]
    (a scalar broadcasts over the batch), class labels as float32 [N, label_dim] (None -> one all-zero
    row; unconditional nets get None), and the dtype the U-Net runs in (float16 only on CUDA)."""
    x = x.to(torch.float32)
    sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
    if net.label_dim == 0:
        class_labels = None
    elif class_labels is None:
        class_labels = torch.zeros([1, net.label_dim], device=x.device)
    else:
        class_labels = class_labels.to(torch.float32).reshape(-1, net.label_dim)
    use_fp16 = net.use_fp16 and not force_fp32 and x.device.type == "cuda"
    return x, sigma, class_labels, torch.float16 if use_fp16 else torch.float32


class _Precond(nn.Module):
    """What the three preconditioners share: the U-Net under `model` (the state-dict prefix upstream
    uses) and D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise), with the coefficients of each subclass's
    `coefficients(sigma)` (sigma float32 [N or 1, 1, 1, 1])."""

    def __init__(self, img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.model = _UNETS[model_type](
            img_resolution=img_resolution,
            in_channels=img_channels,
            out_channels=img_channels,
            label_dim=label_dim,
            **model_kwargs,
        )

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels, dtype = _inputs(self, x, sigma, class_labels, force_fp32)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        assert F_x.dtype == dtype
        return c_skip * x + c_out * F_x.to(torch.float32)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


class VPPrecond(_Precond):
    """Variance-preserving preconditioning (Song et al. 2021; EDM Table 1, "VP" column):
    c_skip = 1, c_out = -σ, c_in = 1/√(σ²+1), c_noise = (M-1)·t(σ) with the VP schedule
    σ(t) = √(exp(β_d t²/2 + β_min t) - 1).

    forward(x [N, C, R, R], sigma [N] / [N,1,1,1] / scalar, class_labels [N, label_dim] or None,
    **model_kwargs such as augment_labels) -> D(x; σ) float32 [N, C, R, R].
    """

    def __init__(
        self,
        img_resolution,  # Image resolution.
        img_channels,  # Image channels.
        label_dim=0,  # Number of classes; 0 = unconditional.
        use_fp16=False,  # Run the U-Net in float16 (CUDA only)?
        beta_d=19.9,  # Extent of the noise schedule.
        beta_min=0.1,  # Initial slope of the noise schedule.
        M=1000,  # Number of DDPM timesteps.
        epsilon_t=1e-5,  # Smallest training t.
        model_type="SongUNet",  # 'SongUNet' or 'DhariwalUNet'.
        **model_kwargs,  # Passed on to the U-Net.
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        # Computed in float32 as upstream does; the sampler clamps its σ range to these values.
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))

    def coefficients(self, sigma):
        return 1, -sigma, 1 / (sigma**2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma)

    def sigma(self, t):
        """σ(t) of the VP schedule (a float32 tensor for Python-number input)."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t**2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        """t(σ), the inverse of `sigma`."""
        sigma = torch.as_tensor(sigma)
        return (
            (self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min
        ) / self.beta_d


class VEPrecond(_Precond):
    """Variance-exploding preconditioning (Song et al. 2021; EDM Table 1, "VE" column):
    c_skip = 1, c_out = σ, c_in = 1, c_noise = log(σ/2). Same call contract as `VPPrecond`."""

    def __init__(
        self,
        img_resolution,  # Image resolution.
        img_channels,  # Image channels.
        label_dim=0,  # Number of classes; 0 = unconditional.
        use_fp16=False,  # Run the U-Net in float16 (CUDA only)?
        sigma_min=0.02,  # Smallest supported noise level.
        sigma_max=100,  # Largest supported noise level.
        model_type="SongUNet",  # 'SongUNet' or 'DhariwalUNet'.
        **model_kwargs,  # Passed on to the U-Net.
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def coefficients(self, sigma):
        return 1, sigma, 1, (0.5 * sigma).log()


class EDMPrecond(_Precond):
    """EDM preconditioning (Karras et al. 2022, Table 1 and Eq. 7): with σ_d = sigma_data,
    c_skip = σ_d²/(σ²+σ_d²), c_out = σ·σ_d/√(σ²+σ_d²), c_in = 1/√(σ²+σ_d²), c_noise = ln(σ)/4.

    forward(x [N, C, R, R], sigma [N] / [N,1,1,1] / scalar, class_labels [N, label_dim] or None,
    **model_kwargs such as augment_labels) -> D(x; σ) float32 [N, C, R, R]. Any input dtype is
    accepted (the sampler passes float64); computation is float32 (float16 U-Net with use_fp16 on CUDA).
    """

    def __init__(
        self,
        img_resolution,  # Image resolution.
        img_channels,  # Image channels.
        label_dim=0,  # Number of classes; 0 = unconditional.
        use_fp16=False,  # Run the U-Net in float16 (CUDA only)?
        sigma_min=0,  # Smallest supported noise level.
        sigma_max=float("inf"),  # Largest supported noise level.
        sigma_data=0.5,  # Expected standard deviation of the data.
        model_type="DhariwalUNet",  # 'SongUNet' or 'DhariwalUNet'.
        **model_kwargs,  # Passed on to the U-Net.
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data

    def coefficients(self, sigma):
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4
