"""The multi-scale residual quantiser of VAR's VQ-VAE (`VectorQuantizer2`) and its φ refinement convs.

Mirrors `FoundationVision/VAR:models/quant.py` @ 78b95394 (MIT License, Copyright (c) 2024
FoundationVision). The code is written anew; class names, constructor kwargs, submodule names (hence
state-dict keys and their order) and numerics follow upstream.

A latent f [B, Cvae, H, W] becomes S token maps of sides pn_1 < ... < pn_S = H (Eq. 5-6 of the VAR
paper, arXiv 2404.02905): at scale k the residual is area-resized to pn_k, every cell is snapped to its
nearest codebook entry, the embedded tokens are resized back to H (bicubic) and refined by
φ_k(h) = (1 - r)·h + r·conv3x3_k(h); the result is added to the reconstruction f_hat and subtracted from
the residual. Token maps are flattened row-major: idx_Bl[k] is int64 [B, pn_k²].

Not ported: `forward` and its commitment loss and code-usage statistics (VQ-VAE training; Neon keeps
the tokenizer frozen) and the unused progressive-training switch `prog_si`. The persistent buffer
`ema_vocab_hit_SV` is kept so official checkpoints load strictly.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Phi(nn.Conv2d):
    """φ(h) = (1 - r)·h + r·conv3x3(h) on [B, C, H, W], with r = |quant_resi|."""

    def __init__(self, embed_dim, quant_resi):
        super().__init__(embed_dim, embed_dim, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h_BChw):
        return h_BChw.mul(1 - self.resi_ratio) + super().forward(h_BChw).mul_(self.resi_ratio)


def _ticks(K: int) -> np.ndarray:
    """Where in [0, 1] each of K shared convs sits; scale k of S uses the conv nearest to k/(S-1)."""
    if K == 4:
        return np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K)
    return np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)


def _nearest(ticks: np.ndarray, at: float) -> int:
    # Kept in float64 numpy with upstream's expression: for K = 4 and S = 10, scale 2 (at = 2/9) lies
    # exactly halfway between two ticks, and only the same rounding picks the same conv.
    return int(np.argmin(np.abs(ticks - at)))


class PhiShared(nn.Module):
    """One φ for every scale (`share_quant_resi=1`)."""

    def __init__(self, qresi: nn.Module):
        super().__init__()
        self.qresi = qresi

    def __getitem__(self, at: float) -> nn.Module:
        return self.qresi


class PhiPartiallyShared(nn.Module):
    """K φ's shared by the S scales by position (`share_quant_resi=K` > 1; the released VQ-VAE has K = 4)."""

    def __init__(self, qresi_ls: nn.ModuleList):
        super().__init__()
        self.qresi_ls = qresi_ls
        self.ticks = _ticks(len(qresi_ls))

    def __getitem__(self, at: float) -> nn.Module:
        return self.qresi_ls[_nearest(self.ticks, at)]


class PhiNonShared(nn.ModuleList):
    """One φ per scale (`share_quant_resi=0`)."""

    def __init__(self, qresi: list):
        super().__init__(qresi)
        self.ticks = _ticks(len(qresi))

    def __getitem__(self, at: float) -> nn.Module:
        return super().__getitem__(_nearest(self.ticks, at))


class VectorQuantizer2(nn.Module):
    """Codebook `embedding` [vocab_size, Cvae] plus the φ convs `quant_resi`; see the module docstring."""

    def __init__(
        self,
        vocab_size,
        Cvae,
        using_znorm,
        beta: float = 0.25,
        default_qresi_counts=0,
        v_patch_nums=None,
        quant_resi=0.5,
        share_quant_resi=4,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.Cvae = Cvae
        self.using_znorm = using_znorm
        self.v_patch_nums = tuple(v_patch_nums)
        self.quant_resi_ratio = quant_resi
        self.beta = beta

        def make_phi():
            return Phi(Cvae, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()

        if share_quant_resi == 0:
            self.quant_resi = PhiNonShared(
                [make_phi() for _ in range(default_qresi_counts or len(self.v_patch_nums))]
            )
        elif share_quant_resi == 1:
            self.quant_resi = PhiShared(make_phi())
        else:
            self.quant_resi = PhiPartiallyShared(nn.ModuleList([make_phi() for _ in range(share_quant_resi)]))
        # Per-scale code usage, written only by VQ-VAE training; kept because checkpoints carry it.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.v_patch_nums), vocab_size))
        self.embedding = nn.Embedding(vocab_size, Cvae)

    def phi(self, si: int, SN: int) -> nn.Module:
        """The φ used at scale si of SN."""
        return self.quant_resi[si / (SN - 1)]

    def _nearest_code(self, z_NC: torch.Tensor) -> torch.Tensor:
        """int64 [N]: the codebook row closest to each row of z_NC [N, Cvae]."""
        E_VC = self.embedding.weight.data
        if self.using_znorm:  # cosine similarity
            return torch.argmax(F.normalize(z_NC, dim=-1) @ F.normalize(E_VC.T, dim=0), dim=1)
        # Squared L2 as |z|² + |e|² - 2 z·e, the same floating-point expression as upstream.
        d_NV = torch.sum(z_NC.square(), dim=1, keepdim=True) + torch.sum(E_VC.square(), dim=1)
        return torch.argmin(torch.addmm(d_NV, z_NC, E_VC.T, alpha=-2), dim=1)

    def f_to_idxBl_or_fhat(
        self, f_BChw: torch.Tensor, to_fhat: bool, v_patch_nums=None
    ) -> list[torch.Tensor]:
        """Quantise f [B, Cvae, H, W] scale by scale.

        Returns per scale either the token map int64 [B, ph·pw] (`to_fhat=False`) or the cumulative
        reconstruction f_hat [B, Cvae, H, W] after that scale. `v_patch_nums` (ints or (h, w) pairs,
        the last equal to (H, W)) overrides the configured scales.
        """
        B, C, H, W = f_BChw.shape
        f_rest = f_BChw.detach().clone()
        f_hat = torch.zeros_like(f_rest)
        hws = [(pn, pn) if isinstance(pn, int) else tuple(pn) for pn in (v_patch_nums or self.v_patch_nums)]
        assert hws[-1] == (H, W), f"the last scale {hws[-1]} must equal the latent size {(H, W)}"
        SN = len(hws)
        out = []
        for si, (ph, pw) in enumerate(hws):
            last = si == SN - 1
            z_BChw = f_rest if last else F.interpolate(f_rest, size=(ph, pw), mode="area")
            idx_N = self._nearest_code(z_BChw.permute(0, 2, 3, 1).reshape(-1, C))
            h_BChw = self.embedding(idx_N.view(B, ph, pw)).permute(0, 3, 1, 2)
            if not last:
                h_BChw = F.interpolate(h_BChw, size=(H, W), mode="bicubic")
            h_BChw = self.phi(si, SN)(h_BChw.contiguous())
            f_hat.add_(h_BChw)
            f_rest.sub_(h_BChw)
            out.append(f_hat.clone() if to_fhat else idx_N.reshape(B, ph * pw))
        return out

    def embed_to_fhat(self, ms_h_BChw: list[torch.Tensor], all_to_max_scale=True, last_one=False):
        """Rebuild f_hat from embedded token maps ms_h_BChw[k] [B, Cvae, pn_k, pn_k].

        `all_to_max_scale=True` (the tokenizer's own path) resizes every map to the last scale first and
        returns f_hat [B, Cvae, H, W] per scale, or only the final one if `last_one`. False grows f_hat
        scale by scale instead (upstream marks it experimental; no model is trained that way).
        """
        B = ms_h_BChw[0].shape[0]
        SN = len(self.v_patch_nums)
        H = W = self.v_patch_nums[-1]
        out = []
        if all_to_max_scale:
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, H, W, dtype=torch.float32)
            for si in range(SN):
                h_BChw = ms_h_BChw[si]
                if si < SN - 1:
                    h_BChw = F.interpolate(h_BChw, size=(H, W), mode="bicubic")
                f_hat.add_(self.phi(si, SN)(h_BChw))
                out.append(f_hat.clone())
        else:
            pn0 = self.v_patch_nums[0]
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, pn0, pn0, dtype=torch.float32)
            for si, pn in enumerate(self.v_patch_nums):
                f_hat = F.interpolate(f_hat, size=(pn, pn), mode="bicubic")
                f_hat.add_(self.phi(si, SN)(ms_h_BChw[si]))
                out.append(f_hat)
        return out[-1] if last_one else out

    def idxBl_to_var_input(self, gt_ms_idx_Bl: list[torch.Tensor]) -> torch.Tensor | None:
        """Teacher-forcing input of VAR: float32 [B, L - pn_1², Cvae].

        For k = 1..S-1 the cumulative f_hat after scale k, area-resized to pn_{k+1} and flattened
        row-major, so position j of scale k+1 sees everything decided at scales ≤ k.
        """
        B = gt_ms_idx_Bl[0].shape[0]
        C, SN = self.Cvae, len(self.v_patch_nums)
        H = W = self.v_patch_nums[-1]
        f_hat = gt_ms_idx_Bl[0].new_zeros(B, C, H, W, dtype=torch.float32)
        pieces = []
        for si in range(SN - 1):
            pn, pn_next = self.v_patch_nums[si], self.v_patch_nums[si + 1]
            h_BChw = self.embedding(gt_ms_idx_Bl[si]).transpose(1, 2).view(B, C, pn, pn)
            f_hat.add_(self.phi(si, SN)(F.interpolate(h_BChw, size=(H, W), mode="bicubic")))
            pieces.append(
                F.interpolate(f_hat, size=(pn_next, pn_next), mode="area").view(B, C, -1).transpose(1, 2)
            )
        return torch.cat(pieces, dim=1) if pieces else None

    def get_next_autoregressive_input(self, si: int, SN: int, f_hat: torch.Tensor, h_BChw: torch.Tensor):
        """One sampling step: add scale si's embedded tokens h [B, Cvae, pn, pn] to f_hat [B, Cvae, H, W].

        Returns (new f_hat, f_hat area-resized to the next side) — the second is f_hat itself at the last
        scale. Unlike upstream, f_hat is not updated in place.
        """
        HW = self.v_patch_nums[-1]
        if si == SN - 1:
            f_hat = f_hat + self.phi(si, SN)(h_BChw)
            return f_hat, f_hat
        f_hat = f_hat + self.phi(si, SN)(F.interpolate(h_BChw, size=(HW, HW), mode="bicubic"))
        pn_next = self.v_patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(pn_next, pn_next), mode="area")

    def extra_repr(self) -> str:
        return (
            f"{self.v_patch_nums}, znorm={self.using_znorm}, beta={self.beta}, "
            f"quant_resi={self.quant_resi_ratio}"
        )
