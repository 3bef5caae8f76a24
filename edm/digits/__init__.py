"""Neon on real images on a CPU: scikit-learn's handwritten digits (issue 17).

`data` (the digits at 16×16 and their fixed train/held-out split), `classifier` (the small CNN whose
penultimate layer gives the digits-FID features), `family` (the `digits` family: the EDM family
plus those features and the held-out reference) and `demo` (`neon demo digits`: the base, Neon,
the matched-compute control and the report).
"""
