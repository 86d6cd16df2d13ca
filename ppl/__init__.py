"""A probabilistic programming language in JAX with programmable variational inference.

Models and guides are generative functions (`@gen`, `sample`); objectives are programs
(`@expectation` with `sim` and `density`) that ADEV turns into unbiased gradient estimators.
"""

from ppl import autoguide, diagnostics, dist, distributed, flows, objectives
from ppl.choicemap import ChoiceMap, Trace
from ppl.distributed import Sharding
from ppl.expectation import Expectation, density, expectation, sim
from ppl.gen import GenerativeFunction, gen, plate, sample, scale, scan, vmap, with_estimators
from ppl.inference_data import log_likelihood, to_inference_data
from ppl.marginal import exact, marginal, normalize, sir
from ppl.params import Constrained, constrain, constrained
from ppl.predictive import predictive
from ppl.train import SVI, SVIState, fit, svi
from transforms.estimators import Estimator, EstimatorError, enum, mvd, reinforce, reparam, rsvi

__all__ = [
    "ChoiceMap",
    "Constrained",
    "Estimator",
    "EstimatorError",
    "Expectation",
    "GenerativeFunction",
    "SVI",
    "SVIState",
    "Sharding",
    "Trace",
    "autoguide",
    "constrain",
    "constrained",
    "density",
    "diagnostics",
    "dist",
    "distributed",
    "enum",
    "exact",
    "expectation",
    "fit",
    "flows",
    "gen",
    "log_likelihood",
    "marginal",
    "mvd",
    "normalize",
    "objectives",
    "plate",
    "predictive",
    "reinforce",
    "reparam",
    "rsvi",
    "sample",
    "scale",
    "scan",
    "sim",
    "sir",
    "svi",
    "to_inference_data",
    "vmap",
    "with_estimators",
]
