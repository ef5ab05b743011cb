#!/usr/bin/env python
"""Fit the polynomial behind the GEGLU kernel's GELU (``customcrafter.kernels.GELU_POLYNOMIAL``) and print it with
its error against the exact (erf) GELU, evaluated in float32 as the kernel does.

``Φ(x) - 1/2 ≈ x · Σ_i c_i x^(2i)`` on ``[0, limit]`` (odd, so ``[-limit, limit]``), a minimax fit on a grid solved as
a linear programme; the error of ``Φ`` is weighted by ``max(x, 1)`` because the GELU's error is ``x`` times it.

    python benchmarks/fit_gelu_polynomial.py                 # limit 4, 10 coefficients: the kernel's
    python benchmarks/fit_gelu_polynomial.py --limit 4.25 --terms 11
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.optimize import linprog
from scipy.special import erf


def fit(limit: float, terms: int, points: int = 6000) -> np.ndarray:
    x = np.linspace(0.0, limit, points)
    target = 0.5 * erf(x / np.sqrt(2.0))
    basis = np.stack([(x / limit) ** (2 * i + 1) for i in range(terms)], axis=1)  # scaled: a well-conditioned LP
    weighted = basis * np.maximum(x, 1.0)[:, None]
    weighted_target = target * np.maximum(x, 1.0)
    # minimise t subject to |weighted @ c - weighted_target| <= t
    bound = -np.ones((points, 1))
    a_ub = np.vstack([np.hstack([weighted, bound]), np.hstack([-weighted, bound])])
    b_ub = np.concatenate([weighted_target, -weighted_target])
    cost = np.zeros(terms + 1)
    cost[-1] = 1.0
    result = linprog(cost, A_ub=a_ub, b_ub=b_ub, bounds=[(None, None)] * terms + [(0, None)], method="highs")
    if not result.success:
        raise RuntimeError(result.message)
    return result.x[:terms] / limit ** np.arange(1, 2 * terms, 2)


def gelu_float32(x: np.ndarray, coefficients, limit: float) -> np.ndarray:
    """The kernel's evaluation order, in float32."""
    x = x.astype(np.float32)
    clamped = np.clip(x, -limit, limit).astype(np.float32)
    square = clamped * clamped
    poly = np.full_like(x, np.float32(coefficients[-1]))
    for coefficient in coefficients[-2::-1]:
        poly = poly * square + np.float32(coefficient)
    return clamped * (np.float32(0.5) + clamped * poly) + np.maximum(x - np.float32(limit), np.float32(0.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=float, default=4.0)
    parser.add_argument("--terms", type=int, default=10)
    args = parser.parse_args()
    coefficients = [float(np.float32(c)) for c in fit(args.limit, args.terms)]
    x = np.linspace(-12.0, 12.0, 1_200_001)
    exact = x * 0.5 * (1.0 + erf(x / np.sqrt(2.0)))
    error = np.abs(gelu_float32(x, coefficients, args.limit) - exact)
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(exact), 1e-30))) - 7)  # bf16: 8 significant bits
    visible = np.abs(exact) >= 1e-3
    print(f"limit {args.limit}, {args.terms} coefficients: {coefficients}")
    print(f"max |error| {error.max():.3g}; in bf16 ulps where |GELU| >= 1e-3: {(error / ulp)[visible].max():.3f}; "
          f"max |error| where |GELU| < 1e-3: {error[~visible].max():.3g}")


if __name__ == "__main__":
    main()
