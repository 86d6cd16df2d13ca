"""Attend-Infer-Repeat (Eslami et al., 2016) on small canvases of scikit-learn's 8x8 digits.

Data: SIZE x SIZE canvases (intensities in [0, 1]) holding 0 to 3 digits (uniformly many), each
pasted at its native 8x8 size at a random position, without overlap (`make_canvases`, fixed seed;
test canvases use digits held out from the training ones).

Model, per canvas, a `lax.scan` over STEPS = 3 object slots:

    pres_t ~ Bernoulli(PRIOR_PRES)                    object t exists iff pres_1 = ... = pres_t = 1
    where_t ~ N(WHERE_LOC, WHERE_SCALE)               (log scale, x shift, y shift) of the object's box
    what_t ~ N(0, I_WHAT)                             its appearance code
    canvas += exists_t * place(decode(what_t), where_t)
    image ~ N(canvas, SIGMA) per pixel

so the number of objects has a truncated geometric prior ("is there another object" at every
step; once absent, always absent). A draw pres_t after the first absence is auxiliary: it does
not change the image, and the guide draws it (and the where/what of every absent object) from the
prior, so those terms cancel exactly in log p - log q. `place` is a spatial transformer (affine
grid, bilinear sampling): it maps the 8x8 glimpse onto the canvas; `extract` is its inverse,
which reads an 8x8 glimpse out of the canvas.

Guide, the same scan: at step t a network reads the residual (the image minus the objects found so
far, rendered with the model's decoder) and gives the probability that another object is there
and where it is; an encoder reads the glimpse `extract(residual, where_t)` and gives what_t.

Estimators (`ESTIMATORS`, by name) differ in how the presence site `pres` is differentiated,
while `where` and `what` are reparameterized unless said otherwise:
`reinforce` (score function), `reinforce+baseline` (with a learned, data-dependent baseline
b(image), NVIL-style (Mnih & Gregor, 2014), trained by its own squared-error loss), `enum` (exact
sum over the 2^STEPS presence paths), `mvd` (measure-valued derivative), `hybrid` (MVD at
`pres` and at the continuous `where`, reparam at `what`), and `iwae` (the importance weighted
bound with K = 5 particles and leave-one-out REINFORCE at `pres`, as in VIMCO).

Objectives are per canvas; `PerImage` averages independent per-canvas estimates over a batch, so
each site is a scalar site (enum is exact, not a local expectation, and the REINFORCE learning
signal is the canvas's own objective rather than the whole batch's).

    python -m models.air               # trains with `enum`, prints count accuracy on held-out canvases, writes air.png
    python -m models.air reinforce     # or any name in ESTIMATORS
"""

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ppl
from ppl import dist

SIZE, GLIMPSE, STEPS, WHAT, HIDDEN = 20, 8, 3, 10, 200
SIGMA = 0.3
PRIOR_PRES = 0.5
PRIOR_LOGIT = math.log(PRIOR_PRES / (1.0 - PRIOR_PRES))
DIGIT_SCALE = GLIMPSE / SIZE  # the glimpse's scale when a digit is drawn at its native size
WHERE_LOC = jnp.zeros(3)
WHERE_SCALE = jnp.array([0.1, 0.8, 0.8])
BASELINE_SCALE = 100.0  # the baseline network predicts the ELBO in these units (suits Adam's step size)
NUM_PARTICLES = 5
ESTIMATORS = ("reinforce", "reinforce+baseline", "enum", "mvd", "hybrid", "iwae")


# -- data -----------------------------------------------------------------------------------------


def load_digit_pools(seed=0, test_fraction=0.2):
    """(train, test) pools of scikit-learn's 8x8 digits as float32 arrays in [0, 1], disjoint."""
    from sklearn.datasets import load_digits

    digits = (load_digits().images / 16.0).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(digits))
    n_test = int(len(digits) * test_fraction)
    return digits[order[n_test:]], digits[order[:n_test]]


def _positions(rng, count):
    """`count` top-left corners of GLIMPSE x GLIMPSE boxes inside the canvas, pairwise disjoint."""
    while True:
        corners = rng.integers(0, SIZE - GLIMPSE + 1, size=(count, 2))
        apart = [np.any(np.abs(a - b) >= GLIMPSE) for i, a in enumerate(corners) for b in corners[:i]]
        if all(apart):
            return corners


def make_canvases(n, pool, seed=0):
    """(images (n, SIZE, SIZE), counts (n,)): canvases with 0..STEPS digits from `pool`, pasted
    without overlap at random positions (fixed seed)."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, SIZE, SIZE), np.float32)
    counts = rng.integers(0, STEPS + 1, size=n)
    for image, count in zip(images, counts):
        for row, col in _positions(rng, count):
            image[row : row + GLIMPSE, col : col + GLIMPSE] = pool[rng.integers(len(pool))]
    return jnp.asarray(images), jnp.asarray(counts, jnp.int32)


def load_data(n_train=3000, n_test=500, seed=0):
    """(train images, train counts, test images, test counts); test canvases use held-out digits."""
    train_pool, test_pool = load_digit_pools(seed)
    return (*make_canvases(n_train, train_pool, seed), *make_canvases(n_test, test_pool, seed + 1))


# -- spatial transformer --------------------------------------------------------------------------


def _unit(n):
    """Pixel centres of an n-pixel axis in [-1, 1] coordinates."""
    return (2.0 * jnp.arange(n) + 1.0) / n - 1.0


def _pixel(u, n):
    """The inverse of `_unit`: fractional pixel index of the [-1, 1] coordinate u."""
    return ((u + 1.0) * n - 1.0) / 2.0


def box(where):
    """(scale, x shift, y shift) of the affine map canvas = scale * glimpse + shift in [-1, 1]
    coordinates, from a `where` latent."""
    return DIGIT_SCALE * jnp.exp(where[0]), where[1], where[2]


def where_at(row, col):
    """The `where` latent that places the glimpse's top-left pixel at canvas pixel (row, col)
    at native size (an exact pixel copy)."""
    return jnp.array([0.0, (2.0 * col + GLIMPSE) / SIZE - 1.0, (2.0 * row + GLIMPSE) / SIZE - 1.0])


def _tent(coords, n):
    """(len(coords), n) bilinear weights of the pixels 0..n-1 at fractional pixel indices `coords`
    (pixels outside the axis count as zero)."""
    return jnp.maximum(0.0, 1.0 - jnp.abs(coords[:, None] - jnp.arange(n)))


def place(glimpse, where):
    """The GLIMPSE x GLIMPSE `glimpse` drawn onto an empty SIZE x SIZE canvas at `where`
    (bilinear sampling; separable, as the transform has no rotation)."""
    scale, x, y = box(where)
    rows = _tent(_pixel((_unit(SIZE) - y) / scale, GLIMPSE), GLIMPSE)
    cols = _tent(_pixel((_unit(SIZE) - x) / scale, GLIMPSE), GLIMPSE)
    return rows @ glimpse @ cols.T


def extract(image, where):
    """The GLIMPSE x GLIMPSE window of the canvas `image` at `where` (the inverse of `place`)."""
    scale, x, y = box(where)
    rows = _tent(_pixel(scale * _unit(GLIMPSE) + y, SIZE), SIZE)
    cols = _tent(_pixel(scale * _unit(GLIMPSE) + x, SIZE), SIZE)
    return rows @ image @ cols.T


# -- networks -------------------------------------------------------------------------------------


def _dense(key, n_in, n_out, scale=1.0):
    return {"w": jax.random.normal(key, (n_in, n_out)) * scale * math.sqrt(1.0 / n_in), "b": jnp.zeros(n_out)}


def _mlp(key, n_in, n_out, out_scale=1.0):
    k1, k2 = jax.random.split(key)
    return {"h": _dense(k1, n_in, HIDDEN), "out": _dense(k2, HIDDEN, n_out, out_scale)}


def _apply(p, x):
    return jnp.tanh(x @ p["h"]["w"] + p["h"]["b"]) @ p["out"]["w"] + p["out"]["b"]


def init_params(key):
    """Decoder (model), locator and encoder (guide), and the baseline network of `reinforce+baseline`."""
    k = jax.random.split(key, 4)
    locate = _mlp(k[1], SIZE * SIZE, 7, out_scale=0.1)  # presence logit, where loc (3), where log-scale (3)
    locate["out"]["b"] = jnp.array([2.0, 0.0, 0.0, 0.0, -2.0, -2.0, -2.0])  # start by looking for objects
    encode = _mlp(k[2], GLIMPSE * GLIMPSE, 2 * WHAT, out_scale=0.1)
    encode["out"]["b"] = jnp.concatenate([jnp.zeros(WHAT), jnp.full(WHAT, -1.0)])
    return {
        "decode": _mlp(k[0], WHAT, GLIMPSE * GLIMPSE),
        "locate": locate,
        "encode": encode,
        "baseline": _mlp(k[3], SIZE * SIZE, 1, out_scale=0.1),
    }


def decode(params, what):
    """The GLIMPSE x GLIMPSE appearance (intensities in [0, 1]) of the code `what`."""
    return jax.nn.sigmoid(_apply(params["decode"], what)).reshape(GLIMPSE, GLIMPSE)


def baseline(params, image):
    """The learned REINFORCE baseline b(image): a prediction of the canvas's ELBO."""
    return BASELINE_SCALE * _apply(params["baseline"], image.reshape(-1))[0]


def _add(params, canvas, exists, what, where):
    return canvas + exists * place(decode(params, what), where)


def render(params, pres, where, what):
    """The canvas drawn by stacked latents (STEPS leading) through the model's decoder."""
    exists = jnp.cumprod(pres)
    canvas = jnp.zeros((SIZE, SIZE))
    for t in range(pres.shape[0]):
        canvas = _add(params, canvas, exists[t], what[t], where[t])
    return canvas


def count(pres):
    """Number of objects: the leading run of presence indicators equal to 1."""
    return jnp.sum(jnp.cumprod(pres, axis=-1), axis=-1).astype(jnp.int32)


# -- model and guide ------------------------------------------------------------------------------


@ppl.gen
def model(params, image):
    def step(carry, _):
        canvas, exists = carry
        pres = ppl.sample("pres", dist.Bernoulli(probs=PRIOR_PRES))
        where = ppl.sample("where", dist.Normal(WHERE_LOC, WHERE_SCALE).to_event(1))
        what = ppl.sample("what", dist.Normal(0.0, 1.0).expand((WHAT,)).to_event(1))
        exists = exists * pres
        return (_add(params, canvas, exists, what, where), exists), None

    (canvas, _), _ = jax.lax.scan(step, (jnp.zeros((SIZE, SIZE)), jnp.ones(())), None, length=STEPS)
    ppl.sample("image", dist.Normal(canvas, SIGMA).to_event(2), obs=image)


def _or_prior(exists, value, prior):
    """`value` for an object that exists, the prior's parameter `prior` for one that does not."""
    return exists * value + (1.0 - exists) * prior


@ppl.gen
def guide(params, image):
    def step(carry, _):
        canvas, exists = carry
        residual = image - canvas
        out = _apply(params["locate"], residual.reshape(-1))  # presence logit, where loc (3), where log-scale (3)
        pres = ppl.sample("pres", dist.Bernoulli(logits=_or_prior(exists, out[0], PRIOR_LOGIT)))
        exists = exists * pres
        where_q = dist.Normal(_or_prior(exists, out[1:4], WHERE_LOC), _or_prior(exists, jnp.exp(out[4:7]), WHERE_SCALE))
        where = ppl.sample("where", where_q.to_event(1))
        loc, log_scale = jnp.split(_apply(params["encode"], extract(residual, where).reshape(-1)), 2)
        what_q = dist.Normal(_or_prior(exists, loc, 0.0), _or_prior(exists, jnp.exp(log_scale), 1.0))
        what = ppl.sample("what", what_q.to_event(1))
        return (_add(params, canvas, exists, what, where), exists), None

    jax.lax.scan(step, (jnp.zeros((SIZE, SIZE)), jnp.ones(())), None, length=STEPS)


# -- objectives -----------------------------------------------------------------------------------


class PerImage:
    """The mean over a batch of images of `objective(params, image)`, estimated image by image:
    independent per-image estimates (vmapped), averaged. Unbiased for the batch mean; offers the
    `estimate` / `value_and_grad_estimate` / `grad_estimate` interface that `ppl.fit` and
    `ppl.diagnostics.gradient_stats` use."""

    def __init__(self, objective):
        self.objective = objective

    def estimate(self, key, params, images):
        keys = jax.random.split(key, images.shape[0])
        return jnp.mean(jax.vmap(lambda k, image: self.objective.estimate(k, params, image))(keys, images))

    def value_and_grad_estimate(self, key, params, images):
        return jax.value_and_grad(lambda p: self.estimate(key, p, images))(params)

    def grad_estimate(self, key, params, images):
        return self.value_and_grad_estimate(key, params, images)[1]


def _with(estimators):
    return ppl.with_estimators(guide, estimators)


def _elbo_with_learned_baseline():
    """The ELBO with REINFORCE at `pres` using b(image) as baseline, plus the baseline's own loss
    -(ELBO - b)^2 as a term of value zero (so it leaves the REINFORCE learning signal alone) whose
    gradient trains b only."""

    @ppl.expectation
    def objective(params, image):
        b = baseline(params, image)
        q = _with({"pres": ppl.reinforce(baseline=jax.lax.stop_gradient(b))})
        z, log_q = ppl.sim(q)(params, image)
        log_w = ppl.density(model)(z, params, image) - log_q
        fit_b = -((jax.lax.stop_gradient(log_w) - b) ** 2) / BASELINE_SCALE
        return log_w + fit_b - jax.lax.stop_gradient(fit_b)

    return objective


def objective(name, num_particles=NUM_PARTICLES):
    """The per-image objective for the estimator `name` (one of ESTIMATORS), batched by `PerImage`."""
    builders = {
        "reinforce": lambda: ppl.objectives.elbo(model, _with({"pres": ppl.reinforce()})),
        "reinforce+baseline": _elbo_with_learned_baseline,
        "enum": lambda: ppl.objectives.elbo(model, _with({"pres": ppl.enum()})),
        "mvd": lambda: ppl.objectives.elbo(model, _with({"pres": ppl.mvd()})),
        "hybrid": lambda: ppl.objectives.elbo(model, _with({"pres": ppl.mvd(), "where": ppl.mvd()})),
        "iwae": lambda: ppl.objectives.iwae(model, _with({"pres": ppl.reinforce(leave_one_out=True)}), num_particles),
    }
    if name not in builders:
        raise ValueError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")
    return PerImage(builders[name]())


# -- training and evaluation ----------------------------------------------------------------------


def train(name="enum", steps=3000, batch_size=32, learning_rate=1e-3, data=None, seed=0, progress=True):
    """Fit model and guide with the estimator `name`; returns (params, losses)."""
    images = (data if data is not None else load_data())[0]
    params, losses = ppl.fit(
        objective(name),
        init_params(jax.random.key(seed)),
        images,
        optimizer=optax.adam(learning_rate),
        steps=steps,
        key=jax.random.key(seed + 1),
        batch_size=batch_size,
        progress=progress,
    )
    return params, losses


def infer(key, params, images):
    """One guide draw per image: {"pres", "where", "what"} with STEPS leading after the image axis."""
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(lambda k, image: guide.simulate(k, params, image).choices)(keys, images)


def inferred_counts(key, params, images, num_samples=15):
    """Per image, the most frequent object count over `num_samples` guide draws."""
    draws = jax.vmap(lambda k: count(infer(k, params, images)["pres"]))(jax.random.split(key, num_samples))
    votes = jax.vmap(lambda n: jnp.sum(draws == n, axis=0))(jnp.arange(STEPS + 1))
    return jnp.argmax(votes, axis=0)


def count_accuracy(key, params, images, counts):
    """Fraction of images whose inferred object count equals the true one."""
    return float(jnp.mean(inferred_counts(key, params, images) == counts))


def main(argv=sys.argv[1:]):
    name = argv[0] if argv else "enum"
    data = load_data()
    params, losses = train(name, data=data)
    _, _, test_images, test_counts = data
    accuracy = count_accuracy(jax.random.key(2), params, test_images, test_counts)
    majority = float(jnp.max(jnp.bincount(test_counts, length=STEPS + 1)) / test_counts.shape[0])
    elbo = PerImage(ppl.objectives.elbo(model, guide)).estimate(jax.random.key(3), params, test_images)
    print(f"estimator {name}: final training loss per canvas {float(jnp.mean(losses[-100:])):.2f}")
    print(f"held-out ELBO per canvas ({test_images.shape[0]} canvases): {float(elbo):.2f}")
    print(f"held-out count accuracy: {accuracy:.3f} (majority class: {majority:.3f})")
    figure(params, losses, test_images[:8], test_counts[:8]).savefig("air.png", dpi=100)
    print("wrote air.png")


def figure(params, losses, images, counts):
    """Canvases with their true counts, reconstructions with the inferred boxes, the loss curve."""
    import matplotlib

    if __name__ == "__main__":
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = infer(jax.random.key(4), params, images)
    recon = jax.vmap(lambda p, w, c: render(params, p, w, c))(z["pres"], z["where"], z["what"])
    n = images.shape[0]
    fig = plt.figure(figsize=(n, 3.6))
    for c in range(n):
        top, bottom = fig.add_subplot(3, n, c + 1), fig.add_subplot(3, n, n + c + 1)
        top.imshow(np.asarray(images[c]), cmap="gray_r", vmin=0, vmax=1)
        top.set_title(f"{int(counts[c])} digits", fontsize=7)
        bottom.imshow(np.clip(np.asarray(recon[c]), 0, 1), cmap="gray_r", vmin=0, vmax=1)
        _draw_boxes(bottom, z["pres"][c], z["where"][c])
        bottom.set_title(f"inferred {int(count(z['pres'][c]))}", fontsize=7)
        for ax in (top, bottom):
            ax.axis("off")
    curve = fig.add_subplot(3, 1, 3)
    window = max(1, min(50, len(losses) // 10))
    curve.plot(np.convolve(np.asarray(losses), np.ones(window) / window, mode="valid"))
    curve.set(xlabel="step", ylabel="loss / canvas")
    fig.tight_layout()
    return fig


def _draw_boxes(ax, pres, where, colors=("tab:red", "tab:green", "tab:blue")):
    """The boxes of the present objects (the glimpse's [-1, 1] square mapped onto the canvas)."""
    import matplotlib.patches as patches

    for t in range(int(count(pres))):
        scale, x, y = (float(v) for v in box(where[t]))
        corner = (float(_pixel(x - scale, SIZE)), float(_pixel(y - scale, SIZE)))
        ax.add_patch(patches.Rectangle(corner, scale * SIZE, scale * SIZE, fill=False, color=colors[t % len(colors)]))

if __name__ == "__main__":
    main()
