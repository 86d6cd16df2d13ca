import jax
import numpy as np


def mean_and_stderr(samples):
    """Mean over the leading axis and its standard error, per coordinate (as numpy arrays)."""
    samples = np.asarray(samples, dtype=np.float64)
    return samples.mean(0), samples.std(0, ddof=1) / np.sqrt(samples.shape[0])


def within_stderr(samples, exact, n_se=5.0):
    """Whether the mean of `samples` is within n_se standard errors of `exact` (per coordinate)."""
    mean, se = mean_and_stderr(samples)
    return np.all(np.abs(mean - np.asarray(exact)) <= n_se * se + 1e-6)


def keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)
