"""Masking schedules for absorbing-state (masked) diffusion.

Every schedule is written in terms of alpha_t, the probability that a token is still
visible at time t in [0, 1] (alpha_0 ~ 1, alpha_1 ~ 0), and its time derivative. All
other quantities the losses and samplers need follow from these two:

    loss_weight(t) = -alpha'_t / (1 - alpha_t)              continuous-time NELBO weight
    unmask_prob(t, s) = (alpha_s - alpha_t) / (1 - alpha_t)  P(masked at t -> visible at s)
    sigma(t) = -log alpha_t                                  the time-conditioning input

Pure tensor functions: no state beyond hyper-parameters, safe for tests on tiny tensors.
"""

import math

import torch
from omegaconf import DictConfig


class NoiseSchedule:
    """Base class: subclasses define `alpha` and `dalpha` (element-wise in t)."""

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        """P(token is [MASK] at time t) = 1 - alpha_t."""
        return 1.0 - self.alpha(t)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """w(t) = -alpha'_t / (1 - alpha_t), the continuous-time ELBO weight (1/t for loglinear)."""
        return -self.dalpha(t) / (1.0 - self.alpha(t))

    def unmask_prob(self, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """P(a position masked at t is revealed at s < t) = (alpha_s - alpha_t) / (1 - alpha_t)."""
        a_t, a_s = self.alpha(t), self.alpha(s)
        return (a_s - a_t) / (1.0 - a_t)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Total noise -log alpha_t, fed to the time embedding when time_conditioning=True."""
        return -torch.log(self.alpha(t))


class LogLinear(NoiseSchedule):
    """alpha_t = 1 - (1 - eps) t: MDLM's default; loss_weight(t) = 1/t exactly."""

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def alpha(self, t):
        return 1.0 - (1.0 - self.eps) * t

    def dalpha(self, t):
        return torch.full_like(t, -(1.0 - self.eps))


class Linear(NoiseSchedule):
    """sigma_t linear in t (MDLM's `linear`): alpha_t = exp(-(s_min + t (s_max - s_min)))."""

    def __init__(self, sigma_min: float = 1e-3, sigma_max: float = 7.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def alpha(self, t):
        return torch.exp(-(self.sigma_min + t * (self.sigma_max - self.sigma_min)))

    def dalpha(self, t):
        return -(self.sigma_max - self.sigma_min) * self.alpha(t)


class Cosine(NoiseSchedule):
    """alpha_t = eps + (1 - eps) cos(pi t / 2): alpha_0 = 1, alpha_1 = eps."""

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def alpha(self, t):
        return self.eps + (1.0 - self.eps) * torch.cos(0.5 * math.pi * t)

    def dalpha(self, t):
        return -(1.0 - self.eps) * 0.5 * math.pi * torch.sin(0.5 * math.pi * t)


class Geometric(NoiseSchedule):
    """sigma_t = s_min^(1-t) s_max^t (SEDD's geometric), alpha_t = exp(-sigma_t)."""

    def __init__(self, sigma_min: float = 1e-4, sigma_max: float = 20.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def _total(self, t):
        return self.sigma_min ** (1.0 - t) * self.sigma_max**t

    def alpha(self, t):
        return torch.exp(-self._total(t))

    def dalpha(self, t):
        return -self.alpha(t) * self._total(t) * math.log(self.sigma_max / self.sigma_min)


SCHEDULES = {"loglinear": LogLinear, "linear": Linear, "cosine": Cosine, "geometric": Geometric}


def get_noise(noise_cfg: DictConfig) -> NoiseSchedule:
    """Build the schedule named by `noise.type` with the remaining keys as arguments."""
    kwargs = {k: v for k, v in noise_cfg.items() if k != "type"}
    return SCHEDULES[noise_cfg.type](**kwargs)
