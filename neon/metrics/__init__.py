"""Metrics of the paper on Inception features, computed in memory on every rank.

`images` opens image sources (PNG/JPEG folders, `.npz` arrays, synthetic sets); `inception` holds
torch-fidelity's InceptionV3, the distributed feature extraction and the families' feature hook;
`fid` the statistics, FID, Inception score and precision/recall (torch-fidelity's functions) and
the drivers of `neon fid-stats` / `neon fid`; `stats` reads and writes reference statistics.
"""
