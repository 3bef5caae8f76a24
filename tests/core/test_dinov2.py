"""FD-DINOv2 and density/coverage: `neon fid --metrics fid,fd_dinov2,prdc` against direct computations
on the same features (a small random DINOv2-shaped ViT; no download), and density/coverage against
hand-computed values (Naeem et al. 2020)."""

import numpy as np
import pytest
import torch

from neon import progress
from neon.errors import NeonError
from neon.metrics import dinov2, fid, score, stats
from neon.metrics import images as image_sources

pytestmark = pytest.mark.usefixtures("one_thread")


def test_density_and_coverage_on_a_line():
    real = torch.arange(7, dtype=torch.float64)[:, None]  # radii: k = 1: all 1; k = 2: 2 at the ends, else 1
    fake = torch.tensor([[0.5], [10.0]], dtype=torch.float64)
    assert fid.density_coverage(fake, real, k=1) == pytest.approx((2 / 2, 2 / 7))
    assert fid.density_coverage(fake, real, k=2, chunk=1) == pytest.approx((2 / 4, 2 / 7))
    with pytest.raises(NeonError, match="more than 5 real images"):
        fid.density_coverage(fake, real[:5])


def test_the_network_is_timms_dinov2_vit_l14_at_224():
    with torch.device("meta"):
        net = dinov2.build(device="meta", pretrained=False)
    assert net.num_features == dinov2.DIM and net.patch_embed.img_size == (224, 224)
    x = dinov2.preprocess(torch.full((2, 3, 8, 8), 255, dtype=torch.uint8))
    assert x.shape == (2, 3, 224, 224) and x[0, 0, 0, 0] == pytest.approx((1 - 0.485) / 0.229)


def test_fd_dinov2_equals_a_direct_computation(tmp_path, monkeypatch, inception_file):
    small = dinov2.untrained(depth=1, embed_dim=32, num_heads=2)
    monkeypatch.setattr(dinov2, "_cached", {"cpu": small})
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8, generator=generator)
    b = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8, generator=generator) // 2
    paths = []
    for name, x in (("a", a), ("b", b)):
        paths.append(str(tmp_path / f"{name}.npz"))
        np.savez(paths[-1], samples=x.permute(0, 2, 3, 1).numpy())
    ref = str(tmp_path / "ref.npz")
    stats.save(ref, np.zeros(2048), np.eye(2048))
    from neon.metrics.inception import FidConfig

    result = progress.last(
        fid.evaluate(
            paths[0],
            ref,
            FidConfig(inception_weights=inception_file, batch_size=12),
            real=paths[1],
            metrics=["fid", "fd_dinov2", "prdc"],
        )
    )
    fa, fb = dinov2.forward(small, a), dinov2.forward(small, b)
    assert fa.shape == (12, 32) and result["fd_dinov2"] == pytest.approx(
        fid.frechet_distance(fid.statistics(fa), fid.statistics(fb)), rel=1e-9
    )
    assert {"density", "coverage", "precision", "recall"} <= set(result)
    assert image_sources.source(paths[0]).read(range(12)).shape == a.shape
    with pytest.raises(NeonError, match="unknown metric 'kid'"):
        score.parse_metrics("fid,kid")
    with pytest.raises(NeonError, match="compare with real images"):
        score.check_metrics(["fid", "prdc"], None, "--metrics", "--pr")
