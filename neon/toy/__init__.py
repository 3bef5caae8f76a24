"""The toy family: the 2-D Gaussian setting of the Neon paper's appendix.

Target N(0, [[2, 1], [1, 2]]); two tiny generators (an ε-prediction diffusion MLP and a two-factor
autoregressive Gaussian model), each with a mode-seeking and a diversity-seeking sampler. It runs
through the same core path as every image family, which makes it the core's test family and the
subject of `neon demo`.
"""
