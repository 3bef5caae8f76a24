"""Feature statistics and the Fréchet distance between them.

Statistics are float64 mean and unbiased covariance (as torch-fidelity and the ADM/EDM reference
files use); the distance itself is torch-fidelity's `fid_statistics_to_metric`, not a copy of it.
"""

import numpy as np
import torch


def statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu float64 [D], sigma float64 [D, D]) of features [N, D], N >= 2; sigma is unbiased."""
    x = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, np.float64)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(stats_a: tuple[np.ndarray, np.ndarray], stats_b: tuple[np.ndarray, np.ndarray]) -> float:
    """‖mu_a − mu_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½) (Heusel et al. 2017, Eq. 6)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    def as_dict(stats):
        mu, sigma = stats
        return {"mu": np.asarray(mu, np.float64), "sigma": np.atleast_2d(np.asarray(sigma, np.float64))}

    return float(fid_statistics_to_metric(as_dict(stats_a), as_dict(stats_b), verbose=False)[KEY_METRIC_FID])
