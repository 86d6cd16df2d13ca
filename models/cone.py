"""The noisy cone, and hierarchical guides trained with HVI, IWHVI and DIWHVI.

The model is the "noisy cone" of Becker, Lew et al. ("Probabilistic programming with programmable
variational inference", PLDI 2024, Fig. 2):

    x ~ N(0, 10),  y ~ N(0, 10),  s = x^2 + y^2,  z ~ N(s, 0.1 + s / 100),   z observed (= 5)

(scales are standard deviations). The mean of z is a paraboloid over the plane; the posterior of
(x, y) given z is concentrated on a thin ring of radius about sqrt(z) (relative width ~1.5%):
strongly non-Gaussian, and out of reach of any single Gaussian guide.

Exact reference: under the prior, s = x^2 + y^2 is Exponential with mean 200, so
p(z) = int_0^inf exp(-s / 200) / 200 N(z; s, 0.1 + s / 100) ds, a 1-D integral computed by
quadrature (`log_evidence`); the posterior density on a grid is p(x, y, z) / p(z)
(`posterior_density`).

Guides, over the latent addresses ("x", "y"):

- `mean_field`: independent Normals for x and y (trained with `elbo` and `iwae`);
- `hierarchical`: an auxiliary psi ~ N(0, I_d) at address "psi" (d = `PSI_DIM` = 1: the ring is
  a curve), then x, y | psi ~ N(mu(psi), sigma(psi)) from a small tanh MLP, initialized as a broad
  curve across the plane. Its marginal q(x, y) is intractable; `ppl.marginal` estimates it by
  importance sampling psi from a reverse model `reverse`, tau(psi | x, y) = N(m(x, y), s(x, y))
  (another MLP), trained jointly with the guide through the bound (Ranganath et al., 2016; Sobolev
  & Vetrov, 2019). It is trained with `hvi`, `iwhvi` (K inner particles) and `diwhvi` (K outer
  times K inner), K = `NUM_PARTICLES`.

Each objective is maximized with Adam, averaging `batch` estimates per step. Every trained guide
is then scored by one common estimator, the importance weighted bound over `EVAL_OUTER` draws of
its marginal (the hierarchical ones with `EVAL_INNER` inner particles each), next to the exact
log p(z) and the bound it was trained on.

    python -m models.cone      # trains the five objectives, prints a table of bounds, writes cone.png
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ppl
from models.vae import _dense, _mlp
from ppl import dist

Z_OBS = 5.0
PRIOR_SCALE = 10.0
PSI_DIM, HIDDEN = 1, 32
KEEP = ("x", "y")
NUM_PARTICLES = 5  # K for iwae, iwhvi (inner) and diwhvi (outer and inner)
EVAL_OUTER, EVAL_INNER = 500, 50
HIERARCHICAL = ("hvi", "iwhvi", "diwhvi")
NAMES = ("elbo", "iwae") + HIERARCHICAL


def noise_scale(s):
    """The standard deviation of z given s = x^2 + y^2."""
    return 0.1 + s / 100.0


@ppl.gen
def model(params, z):
    x = ppl.sample("x", dist.Normal(0.0, PRIOR_SCALE))
    y = ppl.sample("y", dist.Normal(0.0, PRIOR_SCALE))
    s = x**2 + y**2
    ppl.sample("z", dist.Normal(s, noise_scale(s)), obs=z)


@ppl.gen
def mean_field(params, z):
    scale = jnp.exp(params["log_scale"])
    ppl.sample("x", dist.Normal(params["loc"][0], scale[0]))
    ppl.sample("y", dist.Normal(params["loc"][1], scale[1]))


@ppl.gen
def hierarchical(params, z):
    psi = ppl.sample("psi", dist.Normal(0.0, 1.0).expand((PSI_DIM,)).to_event(1))
    loc, log_scale = jnp.split(_mlp(params["guide"], psi), 2)
    scale = jnp.exp(log_scale)
    ppl.sample("x", dist.Normal(loc[0], scale[0]))
    ppl.sample("y", dist.Normal(loc[1], scale[1]))


@ppl.gen
def reverse(kept, params, z):
    """tau(psi | x, y): the proposal for psi in the marginal's importance sampler."""
    loc, log_scale = jnp.split(_mlp(params["reverse"], jnp.stack([kept["x"], kept["y"]])), 2)
    ppl.sample("psi", dist.Normal(loc, jnp.exp(log_scale)).to_event(1))


def _mlp_params(key, n_in, n_out):
    k1, k2 = jax.random.split(key)
    return {"h": _dense(k1, n_in, HIDDEN), "out": _dense(k2, HIDDEN, n_out)}


def _broad(guide):
    """The guide's MLP with loc(psi) stretched over the plane (a wiggly curve) and scale e^-1, so
    that training contracts a long curve onto the ring instead of growing a short arc."""
    out = guide["out"]
    return {
        "h": {"w": 2.0 * guide["h"]["w"], "b": guide["h"]["b"]},
        "out": {"w": out["w"].at[:, :2].multiply(8.0), "b": out["b"].at[2:].set(-1.0)},
    }


def init_params(name, key):
    """Initial parameters for the guide that objective `name` trains."""
    if name not in HIERARCHICAL:
        return {"loc": jnp.array([1.0, 0.5]), "log_scale": jnp.zeros(2)}
    k1, k2 = jax.random.split(key)
    return {"guide": _broad(_mlp_params(k1, PSI_DIM, 4)), "reverse": _mlp_params(k2, 2, 2 * PSI_DIM)}


def guide_of(name):
    """The guide that objective `name` trains."""
    return hierarchical if name in HIERARCHICAL else mean_field


def marginal_guide(name, num_inner):
    """The guide of `name` as a generative function over ("x", "y") only."""
    if name in HIERARCHICAL:
        return ppl.marginal(hierarchical, KEEP, ppl.sir(num_inner, reverse))
    return mean_field


@functools.cache
def objective(name, num_particles=NUM_PARTICLES):
    """The bound `name` (elbo, iwae, hvi, iwhvi or diwhvi) of the noisy cone, with its guide."""
    k = num_particles
    builders = {
        "elbo": lambda: ppl.objectives.elbo(model, mean_field),
        "iwae": lambda: ppl.objectives.iwae(model, mean_field, k),
        "hvi": lambda: ppl.objectives.hvi(model, hierarchical, KEEP, reverse),
        "iwhvi": lambda: ppl.objectives.iwhvi(model, hierarchical, KEEP, k, reverse),
        "diwhvi": lambda: ppl.objectives.diwhvi(model, hierarchical, KEEP, k, k, reverse),
    }
    return builders[name]()


@functools.cache
def tight_bound(name, num_outer=EVAL_OUTER, num_inner=EVAL_INNER):
    """The common evaluation bound: IWAE with `num_outer` particles of the guide's marginal."""
    return ppl.objectives.iwae(model, marginal_guide(name, num_inner), num_outer)


@functools.cache
def averaged(objective, num_estimates):
    """The mean of `num_estimates` independent estimates of `objective` (same expectation, less variance)."""

    @ppl.expectation
    def mean(params, *args):
        return jnp.mean(jax.vmap(lambda _: objective(params, *args))(jnp.arange(num_estimates)))

    return mean


@functools.cache
def _vmapped_estimate(objective):
    return jax.jit(lambda keys, params, z: jax.vmap(lambda k: objective.estimate(k, params, z))(keys))


def estimates(objective, params, num, seed=0, z=Z_OBS):
    """`num` independent estimates of `objective(params, z)` (compiled once per objective and shape)."""
    return _vmapped_estimate(objective)(jax.random.split(jax.random.key(seed), num), params, jnp.asarray(z))


def train(name, steps=3000, batch=16, learning_rate=0.02, seed=0, progress=True):
    """Maximize objective `name` (averaged over `batch` estimates per step); returns (params, losses)."""
    return ppl.fit(
        averaged(objective(name), batch),
        init_params(name, jax.random.key(seed)),
        jnp.asarray(Z_OBS),
        optimizer=optax.adam(optax.cosine_decay_schedule(learning_rate, steps)),
        steps=steps,
        key=jax.random.key(seed + 1),
        progress=progress,
    )


def log_evidence(z=Z_OBS, num_points=200_001):
    """log p(z) by the trapezoidal rule over s = x^2 + y^2 ~ Exponential(mean 2 * PRIOR_SCALE^2)."""
    s = np.linspace(0.0, 3.0 * z + 10.0, num_points)
    mean = 2.0 * PRIOR_SCALE**2
    scale = noise_scale(s)
    integrand = np.exp(-s / mean) / mean * np.exp(-0.5 * ((z - s) / scale) ** 2) / (scale * math.sqrt(2 * math.pi))
    return float(np.log(np.trapezoid(integrand, s)))


def log_joint(x, y, z=Z_OBS):
    """log p(x, y, z), elementwise over arrays x and y."""
    one = lambda a, b: ppl.density(model)({"x": a, "y": b}, None, jnp.asarray(z))
    return jax.vmap(one)(jnp.ravel(x), jnp.ravel(y)).reshape(jnp.shape(x))


def posterior_density(x, y, z=Z_OBS):
    """p(x, y | z) = p(x, y, z) / p(z), elementwise."""
    return jnp.exp(log_joint(x, y, z) - log_evidence(z))


def guide_samples(name, params, num, seed=0):
    """`num` draws of (x, y) from the fitted guide, as an array (num, 2)."""
    draw = lambda k: guide_of(name).simulate(k, params, jnp.asarray(Z_OBS)).choices
    choices = jax.jit(jax.vmap(draw))(jax.random.split(jax.random.key(seed), num))
    return jnp.stack([choices["x"], choices["y"]], axis=1)


def evaluate(name, params, losses, num_estimates=50, seed=0):
    """{"trained": (mean, se) of the bound `name` was trained on, over the last 10% of its training
    steps (`losses`, from `train`, whose learning rate decays to 0), "common": (mean, se) of
    `num_estimates` estimates of `tight_bound` at `params`}."""
    tail = -np.asarray(losses[-max(1, len(losses) // 10) :], np.float64)
    common = np.asarray(estimates(tight_bound(name), params, num_estimates, seed), np.float64)
    stats = lambda v: (v.mean(), v.std(ddof=1) / math.sqrt(len(v)))
    return {"trained": stats(tail), "common": stats(common)}


def table(results, log_p):
    """The bounds in `results` ({name: evaluate(...)}) and their gaps to log p(z), as text."""
    lines = [
        f"log p(z = {Z_OBS}) = {log_p:.3f} (quadrature)",
        f"common bound: IWAE over {EVAL_OUTER} draws of each guide's marginal ({EVAL_INNER} inner particles)",
        f"{'objective':>9} {'guide':>12} {'trained bound':>16} {'gap':>6} {'common bound':>16} {'gap':>6}",
    ]
    for name, r in results.items():
        (t, t_se), (c, c_se) = r["trained"], r["common"]
        lines.append(
            f"{name:>9} {guide_of(name).__name__:>12} {t:9.3f} ± {t_se:.3f} {log_p - t:6.3f}"
            f" {c:9.3f} ± {c_se:.3f} {log_p - c:6.3f}"
        )
    return "\n".join(lines)


def main():
    import matplotlib

    matplotlib.use("Agg")
    fitted, results = {}, {}
    for name in NAMES:
        print(f"training {name} ({guide_of(name).__name__} guide)")
        fitted[name], losses = train(name)
        results[name] = evaluate(name, fitted[name], losses)
    print(table(results, log_evidence()))
    figure(fitted, results).savefig("cone.png", dpi=100)
    print("wrote cone.png")


def figure(fitted, results, panel=3.0, limit=3.0):
    """The exact posterior, then samples of each fitted guide ({name: params}) over its half-maximum
    contour, titled with the common bound from `results` ({name: evaluate(...)}); 2 rows of 3 panels."""
    import matplotlib.pyplot as plt

    grid = jnp.linspace(-limit, limit, 600)
    gx, gy = jnp.meshgrid(grid, grid)
    density = np.asarray(posterior_density(gx, gy))
    fig, axes = plt.subplots(2, 3, figsize=(3 * panel, 2 * panel + 0.4), layout="constrained")
    axes = axes.ravel()
    axes[0].imshow(density, origin="lower", extent=(-limit, limit, -limit, limit), cmap="magma")
    axes[0].set_title(f"exact p(x, y | z = {Z_OBS:g})", fontsize=9)
    for ax, (name, params) in zip(axes[1:], fitted.items()):
        xy = np.asarray(guide_samples(name, params, 2000))
        ax.contour(np.asarray(gx), np.asarray(gy), density, levels=[0.5 * density.max()], colors="0.6")
        ax.scatter(xy[:, 0], xy[:, 1], s=1, alpha=0.5)
        ax.set_title(f"{name}: bound {results[name]['common'][0]:.2f}", fontsize=9)
    for ax in axes:
        ax.set(xlim=(-limit, limit), ylim=(-limit, limit), aspect="equal", xticks=[], yticks=[])
    fig.suptitle(f"samples of each fitted guide, with the common bound (log p(z) = {log_evidence():.2f})", fontsize=9)
    return fig


if __name__ == "__main__":
    main()
