"""Planar and radial normalizing flows (Rezende & Mohamed, 2015, 'Variational inference with
normalizing flows') as NumPyro transforms, for guides:

    flow = [flows.PlanarTransform(p["u"], p["w"], p["b"]), flows.RadialTransform(p["z0"], p["a"], p["c"])]
    ppl.sample("z", dist.TransformedDistribution(dist.Normal(p["loc"], p["scale"]).to_event(1), flow))

Both act on vectors (the last axis) and are pytrees of their parameters, so those parameters are
operands of the site and are trained by reparameterization. The parameters are unconstrained: each
transform maps them to the invertible family of the paper (planar: w'u >= -1; radial: alpha > 0,
beta >= -alpha). Densities at given values (`ppl.density` of the guide, as in `objectives.stl`)
need the inverse: the radial flow's is closed-form; the planar flow's solves one scalar monotone
equation by bisection followed by a Newton step, so its derivative is the implicit function's.
"""

import jax
import jax.numpy as jnp
from numpyro.distributions import constraints
from numpyro.distributions.transforms import Transform

_BISECTIONS = 60


class _VectorFlow(Transform):
    """A bijection of real vectors whose parameters are its pytree leaves (`_params` names them)."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    _params = ()

    def tree_flatten(self):
        return tuple(getattr(self, name) for name in self._params), (self._params, {})


class PlanarTransform(_VectorFlow):
    """f(z) = z + u^ tanh(w'z + b), with u^ = u + (softplus(w'u) - 1 - w'u) w / |w|^2 (so w'u^ >= -1)."""

    _params = ("u", "w", "b")

    def __init__(self, u, w, b):
        self.u, self.w, self.b = u, w, b

    def _u_hat(self):
        wu = jnp.sum(self.w * self.u, -1, keepdims=True)
        return self.u + (jax.nn.softplus(wu) - 1.0 - wu) * self.w / jnp.sum(self.w**2, -1, keepdims=True)

    def __call__(self, z):
        return z + self._u_hat() * jnp.tanh(jnp.sum(self.w * z, -1, keepdims=True) + self.b)

    def _inverse(self, y):
        # a = w'z solves w'y = a + (w'u^) tanh(a + b), increasing in a, within |w'u^| of w'y
        wu, wy = jnp.sum(self.w * self._u_hat(), -1), jnp.sum(self.w * y, -1)
        g = lambda a: a + wu * jnp.tanh(a + self.b) - wy

        def bisect(_, bounds):
            low, high = bounds
            mid = (low + high) / 2
            return jnp.where(g(mid) < 0, mid, low), jnp.where(g(mid) < 0, high, mid)

        bracket = jax.lax.stop_gradient((wy - jnp.abs(wu) - 1.0, wy + jnp.abs(wu) + 1.0))
        low, high = jax.lax.fori_loop(0, _BISECTIONS, bisect, bracket)
        a = jax.lax.stop_gradient((low + high) / 2)
        a = a - g(a) / (1.0 + wu * (1.0 - jnp.tanh(a + self.b) ** 2))  # exact derivative through a
        return y - self._u_hat() * jnp.tanh(a + self.b)[..., None]

    def log_abs_det_jacobian(self, x, y, intermediates=None):
        slope = 1.0 - jnp.tanh(jnp.sum(self.w * x, -1) + self.b) ** 2
        return jnp.log(jnp.abs(1.0 + slope * jnp.sum(self.w * self._u_hat(), -1)))


class RadialTransform(_VectorFlow):
    """f(z) = z + beta (z - z0) / (alpha + |z - z0|), with alpha = softplus(a) and
    beta = softplus(c) - alpha (so beta >= -alpha)."""

    _params = ("z0", "a", "c")

    def __init__(self, z0, a, c):
        self.z0, self.a, self.c = z0, a, c

    def _alpha_beta(self):
        alpha = jax.nn.softplus(self.a)
        return alpha, jax.nn.softplus(self.c) - alpha

    def __call__(self, z):
        alpha, beta = self._alpha_beta()
        r = jnp.linalg.norm(z - self.z0, axis=-1, keepdims=True)
        return z + beta * (z - self.z0) / (alpha + r)

    def _inverse(self, y):
        # |y - z0| = r (1 + beta / (alpha + r)): the positive root of a quadratic in r
        alpha, beta = self._alpha_beta()
        s = jnp.linalg.norm(y - self.z0, axis=-1, keepdims=True)
        r = (s - alpha - beta + jnp.sqrt((alpha + beta - s) ** 2 + 4.0 * alpha * s)) / 2
        return self.z0 + (y - self.z0) / (1.0 + beta / (alpha + r))

    def log_abs_det_jacobian(self, x, y, intermediates=None):
        alpha, beta = self._alpha_beta()
        r = jnp.linalg.norm(x - self.z0, axis=-1)
        h = 1.0 / (alpha + r)
        return (x.shape[-1] - 1) * jnp.log1p(beta * h) + jnp.log1p(beta * h - beta * r * h**2)
