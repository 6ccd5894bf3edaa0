"""Sampling: the reverse-diffusion and AR steps (samplers), the registered samplers
`sampling.predictor` names (predictors), and generation from a trained module with its
conditioning (generation)."""
