"""Evaluation estimators from n samples per problem: pass@1, avg@k, unbiased pass@k.

Unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): with n
samples of which c are correct, pass@k = 1 - C(n-c, k) / C(n, k), computed as the stable product
1 - prod_{i=n-c+1}^{n} (1 - k / i), averaged over problems.
"""

from __future__ import annotations

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k of one problem from n samples of which c are correct (Chen et al. 2021)."""
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
  if n - c < k:
    return 1.0
  return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(correct_PxN: np.ndarray, k: int) -> float:
  """pass@k averaged over problems, from each problem's n samples (0/1 or bool)."""
  correct_PxN = np.asarray(correct_PxN) > 0
  n = correct_PxN.shape[1]
  return float(np.mean([pass_at_k(n, int(c), k) for c in correct_PxN.sum(axis=1)]))


def avg_at_k(correct_PxN: np.ndarray) -> float:
  """Mean correctness over all problems and samples (avg@n; equals the unbiased pass@1)."""
  return float(np.mean(np.asarray(correct_PxN) > 0))
