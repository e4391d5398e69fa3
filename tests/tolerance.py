"""The tolerance for comparing two float computations of the same values.

Two ways of computing the same tensor (another batch size, a pruned or sliced layer, a cache written in
other batches, ONNX Runtime instead of torch) add their products in another order, and so does the same
code on another CPU: AVX2 and AVX-512 BLAS kernels block their sums differently. Such results agree to a
few units in the last place of the dtype *relative to the size of the values*, so a fixed ``atol=1e-6,
rtol=0`` passes on one machine and fails on the next (1.01e-6 on logits of order 1 on an AVX-512 CPU).
"""

import torch


def close(expected: torch.Tensor, ulps: float = 64) -> dict[str, float]:
    """``rtol``/``atol`` for :func:`torch.testing.assert_close` against ``expected``: ``ulps`` units of the
    dtype's precision, relative to each value (rtol) and to the largest value (atol, for values near zero
    that are sums of larger terms).

    64 units of float32 (7.6e-6 relative) cover the reordered sums of the small models in these tests many
    times over, while a wrong slice, row or formula moves the values by 1e-3 or more of their size.

    Example:
        torch.testing.assert_close(actual, expected, **close(expected))
    """
    eps = torch.finfo(expected.dtype).eps
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    return {"rtol": ulps * eps, "atol": ulps * eps * scale}
