"""A probabilistic programming language in JAX with programmable variational inference.

Models and guides are generative functions (`@gen`, `sample`); objectives are programs
(`@expectation` with `sim` and `density`) that ADEV turns into unbiased gradient estimators.
"""

from ppl import dist, objectives
from ppl.choicemap import ChoiceMap, Trace
from ppl.expectation import Expectation, density, expectation, sim
from ppl.gen import GenerativeFunction, gen, sample, scan, vmap, with_estimators
from ppl.marginal import marginal, normalize, sir
from ppl.train import SVI, SVIState, fit, svi
from transforms.estimators import Estimator, EstimatorError, enum, mvd, reinforce, reparam

__all__ = [
    "SVI",
    "SVIState",
    "ChoiceMap",
    "Estimator",
    "EstimatorError",
    "Expectation",
    "GenerativeFunction",
    "Trace",
    "density",
    "dist",
    "enum",
    "expectation",
    "fit",
    "marginal",
    "normalize",
    "objectives",
    "sir",
    "svi",
    "gen",
    "mvd",
    "reinforce",
    "reparam",
    "sample",
    "scan",
    "sim",
    "vmap",
    "with_estimators",
]
