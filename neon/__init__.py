"""neon: Negative Extrapolation From Self-Training (arXiv 2510.03597).

θ_neon = (1 + w) θ_base − w θ_self_trained, where θ_self_trained is θ_base briefly fine-tuned on a
synthetic set drawn from θ_base with its usual sampler. The core (this package) is model-agnostic;
model families plug in through `neon.family`.
"""

__version__ = "0.1.0"
