"""VAR, the visual autoregressive transformer: next-scale prediction over the VQ-VAE's token pyramid.

Mirrors `FoundationVision/VAR:models/var.py` @ 78b95394
(MIT License, Copyright (c) 2024 FoundationVision). The code is written anew; the class name,
constructor kwargs, parameter and buffer names (hence state-dict keys and their order), the global-RNG
draw order of training and the sampling semantics follow upstream (Tian et al. 2024, arXiv 2404.02905).

The sequence is the S token maps of sides pn_1..pn_S, flattened and concatenated: L = Σ pn_k². Token 0 is
the class embedding (the start token); token j > 0 carries the word embedding of the teacher-forcing
input, and every token gets its level and position embeddings. In training a block-causal mask lets a
token see every token of its own and coarser scales; in sampling a key/value cache gives the same view.

Differences from upstream, none of which changes the numbers of a call upstream also supports:
* attention is always `scaled_dot_product_attention`; `flash_if_available` / `fused_if_available` are
  accepted and ignored;
* sampling draws from a generator made per call from `g_seed` (upstream reseeds one it owns, `var.rng`;
  the draws are the same), and can instead take one generator per sample (`generators=`);
* negative labels mean the null class, in `forward` and in tensors given to sampling (upstream: only an int
  label given to sampling);
* `autoregressive_steps` exposes the per-scale logits, tokens and f_hat that `autoregressive_infer_cfg`
  consumes; both are thin entries into `VAR/sampler.py`, which holds the sampling code;
* the progressive-training switch `prog_si` is not ported (Neon never uses it).
"""

import math

import torch
from torch import nn

from .. import sampler
from .blocks import AdaLNBeforeHead, AdaLNSelfAttn
from .vqvae import VQVAE


class SharedAdaLin(nn.Linear):
    """Linear D -> 6C whose output is viewed as [B, 1, 6, C] (the shared AdaLN of the "-s" models)."""

    def forward(self, cond_BD):
        return super().forward(cond_BD).view(-1, 1, 6, self.weight.shape[0] // 6)


class VAR(nn.Module):
    """The class-conditional next-scale transformer. It holds the VQ-VAE by reference (`vae_proxy`), so its
    state dict has no VQ-VAE keys. Persistent buffers: `lvl_1L` int64 [1, L] (scale of each position) and
    `attn_bias_for_masking` float32 [1, 1, L, L] (0 where visible, -inf elsewhere: never extrapolate it)."""

    def __init__(
        self,
        vae_local: VQVAE,
        num_classes=1000,
        depth=16,
        embed_dim=1024,
        num_heads=16,
        mlp_ratio=4.0,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.0,
        norm_eps=1e-6,
        shared_aln=False,
        cond_drop_rate=0.1,
        attn_l2_norm=False,
        patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        flash_if_available=True,
        fused_if_available=True,
    ):
        super().__init__()
        assert embed_dim % num_heads == 0
        self.Cvae, self.V = vae_local.Cvae, vae_local.vocab_size
        self.depth, self.C, self.D, self.num_heads = depth, embed_dim, embed_dim, num_heads
        self.num_classes = num_classes
        self.cond_drop_rate = cond_drop_rate
        self.drop_path_rate = drop_path_rate
        self.patch_nums = tuple(patch_nums)
        self.L = sum(pn * pn for pn in self.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        self.num_stages_minus_1 = len(self.patch_nums) - 1
        self.begin_ends, cur = [], 0
        for pn in self.patch_nums:
            self.begin_ends.append((cur, cur + pn * pn))
            cur += pn * pn
        # A tuple, so the frozen VQ-VAE is neither a submodule nor in the state dict.
        self.vae_proxy = (vae_local,)
        self.vae_quant_proxy = (vae_local.quantize,)

        init_std = math.sqrt(1 / self.C / 3)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, self.C))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, self.C))
        nn.init.trunc_normal_(self.pos_start, mean=0, std=init_std)
        nn.init.trunc_normal_(self.pos_1LC, mean=0, std=init_std)

        lvl_L = torch.cat([torch.full((pn * pn,), si) for si, pn in enumerate(self.patch_nums)])
        self.register_buffer("lvl_1L", lvl_L.view(1, self.L).clone())
        visible_LL = lvl_L.view(self.L, 1) >= lvl_L.view(1, self.L)
        self.register_buffer(
            "attn_bias_for_masking",
            torch.where(visible_LL, 0.0, -torch.inf).view(1, 1, self.L, self.L).contiguous(),
        )

        self.word_embed = nn.Linear(self.Cvae, self.C)
        # Row num_classes is the null class: the unconditional branch of CFG and the target of label dropout.
        self.class_emb = nn.Embedding(num_classes + 1, self.C)
        nn.init.trunc_normal_(self.class_emb.weight, mean=0, std=init_std)
        self.lvl_embed = nn.Embedding(len(self.patch_nums), self.C)
        nn.init.trunc_normal_(self.lvl_embed.weight, mean=0, std=init_std)

        if shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(self.D, 6 * self.C))
        else:
            self.shared_ada_lin = nn.Identity()
        # Drop-path rises linearly from 0 at block 0; float32 linspace (on the CPU, so meta builds work) as
        # upstream.
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            [
                AdaLNSelfAttn(
                    block_idx=i,
                    embed_dim=self.C,
                    cond_dim=self.D,
                    shared_aln=shared_aln,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[i],
                    attn_l2_norm=attn_l2_norm,
                    norm_eps=norm_eps,
                )
                for i in range(depth)
            ]
        )
        self.head_nm = AdaLNBeforeHead(self.C, self.D, norm_eps=norm_eps)
        self.head = nn.Linear(self.C, self.V)

    def get_logits(self, h_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, L, C] -> float32 logits [B, L, V]; cond_BD is the raw class embedding."""
        return self.head(self.head_nm(h_BLC.float(), cond_BD).float()).float()

    def forward(self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits.

        Args:
            label_B: int64 [B]; num_classes (or any negative value) is the null class.
            x_BLCv_wo_first_l: float32 [B, L - first_l, Cvae], `vae.quantize.idxBl_to_var_input(idx_Bl)`.
        Returns:
            float32 [B, L, V]; position j predicts token j of the concatenated token maps.

        Randomness, from torch's global generator in this order: `torch.rand(B)` for label dropout (labels
        with a draw below cond_drop_rate become the null class, in eval mode too, as upstream); then in
        training one DropPath draw per branch of every block with p > 0 (attention first, then FFN).
        """
        B = x_BLCv_wo_first_l.shape[0]
        with torch.autocast(device_type=x_BLCv_wo_first_l.device.type, enabled=False):
            label_B = torch.where(label_B < 0, self.num_classes, label_B)
            label_B = torch.where(
                torch.rand(B, device=label_B.device) < self.cond_drop_rate, self.num_classes, label_B
            )
            sos = cond_BD = self.class_emb(label_B)
            sos = sos.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
            x_BLC = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.float())), dim=1)
            x_BLC = x_BLC + (self.lvl_embed(self.lvl_1L.expand(B, -1)) + self.pos_1LC)
        cond_BD_or_gss = self.shared_ada_lin(cond_BD)
        attn_bias = self.attn_bias_for_masking
        device_type = x_BLC.device.type
        if torch.is_autocast_enabled(device_type):  # the blocks then run in the autocast dtype, mask included
            dtype = torch.get_autocast_dtype(device_type)
            x_BLC, cond_BD_or_gss, attn_bias = x_BLC.to(dtype), cond_BD_or_gss.to(dtype), attn_bias.to(dtype)
        for block in self.blocks:
            x_BLC = block(x=x_BLC, cond_BD=cond_BD_or_gss, attn_bias=attn_bias)
        return self.get_logits(x_BLC.float(), cond_BD)

    def autoregressive_steps(
        self, B: int, label_B, g_seed=None, cfg=1.5, top_k=0, top_p=0.0, more_smooth=False, generators=None
    ):
        """Upstream-named entry into `VAR.sampler.autoregressive_steps` (an `ARStep` per scale)."""
        return sampler.autoregressive_steps(
            self,
            B,
            label_B,
            g_seed=g_seed,
            cfg=cfg,
            top_k=top_k,
            top_p=top_p,
            more_smooth=more_smooth,
            generators=generators,
        )

    def autoregressive_infer_cfg(
        self, B: int, label_B, g_seed=None, cfg=1.5, top_k=0, top_p=0.0, more_smooth=False, generators=None
    ) -> torch.Tensor:
        """Upstream-named entry into `VAR.sampler.sample_images`: float32 [B, 3, H, W] in [0, 1]."""
        return sampler.sample_images(
            self,
            B,
            label_B,
            g_seed=g_seed,
            cfg=cfg,
            top_k=top_k,
            top_p=top_p,
            more_smooth=more_smooth,
            generators=generators,
        )

    @torch.no_grad()
    def init_weights(
        self, init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=0.02, conv_std_or_gain=0.02
    ):
        """Upstream's initialisation (run by `build_vae_var`): truncated normals of std `init_std`
        (√(1/3C) when negative) for linear and embedding weights, zero biases, the head scaled by `init_head`,
        AdaLN scales/shifts by `init_adaln` and gates by `init_adaln_gamma`, and the residual output
        projections divided by √(2·depth). VAR has no convolutions, so `conv_std_or_gain` is unused."""
        if init_std < 0:
            init_std = (1 / self.C / 3) ** 0.5
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=init_std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=init_std)
                if m.padding_idx is not None:
                    m.weight[m.padding_idx].zero_()
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                if m.weight is not None:
                    m.weight.fill_(1.0)
                if m.bias is not None:
                    m.bias.zero_()
        if init_head >= 0:
            self.head.weight.mul_(init_head)
            self.head.bias.zero_()
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.zero_()
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * self.depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * self.depth))
            if block.shared_aln:  # rows of ada_gss: gamma1, gamma2, then scales and shifts
                block.ada_gss[:, :, 2:].mul_(init_adaln)
                block.ada_gss[:, :, :2].mul_(init_adaln_gamma)
            else:
                block.ada_lin[-1].weight[2 * self.C :].mul_(init_adaln)
                block.ada_lin[-1].weight[: 2 * self.C].mul_(init_adaln_gamma)
                block.ada_lin[-1].bias.zero_()

    def extra_repr(self):
        return f"drop_path_rate={self.drop_path_rate:g}"
