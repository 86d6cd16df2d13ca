"""NumPyro's distributions, re-exported: `from ppl import dist; dist.Normal(0.0, 1.0)`."""

from numpyro.distributions import *  # noqa: F401,F403
from numpyro.distributions import constraints, transforms  # noqa: F401
