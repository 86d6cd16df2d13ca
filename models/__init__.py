"""A zoo of models with guides and, where they exist, closed-form answers used as test oracles."""
