"""RADD's losses (Ou et al. 2024) and SEDD's score entropy (Lou et al. 2024).

RADD shows that absorbing diffusion's p(x0 | xt) does not depend on t, and that four
losses estimate the same likelihood bound: t-DCE (MDLM's NELBO, `loss_type=mdlm` or
`t_DCE`), lambda-DCE (the masking ratio drawn directly), k-DCE (exactly k positions
masked: the any-order AR objective) and t-DSE (the score entropy, which for a network
that outputs a normalised conditional equals t-DCE). SEDD's own parameterisation
(`parameterization=sedd`) lets the network output free log-scores, trained with the same
score entropy. Every class here has no latent; `backbone=radd` (the time-free network)
or `dit` both work. RADD's spellings (`lambda_DCE`, `k_DCE`, `t_DSE`) select them too.
"""

import math

from algorithms import MDLM, Algorithm, key_mask, register
from errors import ConfigError


class _TimeFree(MDLM):
    """A DCE loss whose forward process has no time: the network must not read one."""

    @classmethod
    def validate(cls, cfg):
        name = cfg.training.loss_type
        if cfg.T != 0:
            raise ConfigError(
                f"training.loss_type={name} draws the masked set directly, with no time grid: "
                f"T={cfg.T} does not apply (set T=0, or training.loss_type=mdlm for T steps)"
            )
        if cfg.time_conditioning:
            raise ConfigError(
                f"training.loss_type={name} has no time to feed the network: set "
                "time_conditioning=False (or training.loss_type=t_DCE to keep it)"
            )


@register
class LambdaDCE(_TimeFree):
    """lambda-DCE: masking ratio lambda ~ U[eps, 1] (stratified), weight 1 / lambda."""

    name, aliases, label = "lambda_dce", ("lambda_DCE",), "lambda-DCE denoiser (RADD's loss)"

    def loss(self, module, batch, t, beta=1.0, num_particles=1, draws=None, train=False):
        from algorithms import objectives

        x0, spec = batch["input_ids"], module.spec
        return objectives.lambda_dce_loss(module.backbone, x0, key_mask(batch), t, spec, draws)

    def bound_name(self, num_particles):
        return "lambda-DCE bound (RADD; the continuous-time NELBO, masking ratio drawn directly)"


@register
class KDCE(_TimeFree):
    """k-DCE: k ~ U{1..n} positions masked (stratified), weight n / k."""

    name, aliases, label = "k_dce", ("k_DCE",), "k-DCE denoiser (RADD's any-order loss)"

    def t_eps(self) -> float:
        return 0.0  # t is the uniform that picks k: all of [0, 1)

    def loss(self, module, batch, t, beta=1.0, num_particles=1, draws=None, train=False):
        from algorithms import objectives

        x0 = batch["input_ids"]
        return objectives.k_dce_loss(module.backbone, x0, key_mask(batch), t, module.spec, draws)

    def bound_name(self, num_particles):
        return "k-DCE bound (RADD; the any-order AR NLL averaged over random orders)"


class _ScoreEntropy(MDLM):
    """Shared by t-DSE and SEDD: the diffusion-weighted denoising score entropy."""

    @classmethod
    def validate(cls, cfg):
        if cfg.T != 0:
            raise ConfigError(
                f"the score entropy is a continuous-time loss: T={cfg.T} does not apply "
                "(set T=0, or training.loss_type=mdlm for a T-step bound)"
            )

    def loss(self, module, batch, t, beta=1.0, num_particles=1, draws=None, train=False):
        from algorithms import objectives

        return objectives.score_entropy_loss(
            module.backbone, batch["input_ids"], key_mask(batch), t, module.spec,
            self.log_score, draws,
        )  # fmt: skip


@register
class TDSE(_ScoreEntropy):
    """RADD's t-DSE: the score entropy of the normalised conditional's score."""

    name, aliases, label = "t_dse", ("t_DSE",), "t-DSE denoiser (RADD's score entropy)"

    def bound_name(self, num_particles):
        return "t-DSE bound (RADD's score entropy of the conditional; equals t-DCE)"


@register
class SEDD(_ScoreEntropy):
    """SEDD: the network outputs log-scores; trained with the score entropy (DWDSE).

    Like SEDD's `scale_by_sigma`, the output is shifted by -log(e^sigma - 1) - log V, so
    zero logits are the score of a uniform conditional; softmax over the real tokens is
    the conditional every other sampler and the any-order likelihood read."""

    name, selected_by, label = "sedd", "parameterization", "SEDD (DiT, score parameterisation)"
    aliases = ()
    transformers_class = None  # the export's MaskedLM would read the scores as logits

    @classmethod
    def validate(cls, cfg):
        super().validate(cfg)
        loss = cfg.training.loss_type
        if loss not in ("vae", "t_dse", "t_DSE"):  # vae: the default, i.e. not set
            raise ConfigError(
                f"parameterization=sedd trains SEDD's score entropy, not training.loss_type="
                f"{loss}: set training.loss_type=t_DSE (or parameterization=subs)"
            )
        if cfg.backbone != "dit":
            raise ConfigError(
                f"parameterization=sedd with backbone={cfg.backbone}: SEDD's network is the "
                "DiT (backbone=dit); RADD's time-free net is parameterization=subs"
            )

    def log_score(self, logits, alpha_t):
        import torch

        a = torch.as_tensor(alpha_t, dtype=torch.float64, device=logits.device).reshape(-1, 1)
        # log(e^sigma - 1) with sigma = -log a is log(1 - a) - log(a)
        shift = torch.log(a) - torch.log1p(-a) - math.log(logits.shape[-1])
        return logits + shift.to(logits.dtype)

    def bound_name(self, num_particles):
        return "DWDSE bound (SEDD's diffusion-weighted denoising score entropy, continuous time)"


__all__ = ["Algorithm", "KDCE", "LambdaDCE", "SEDD", "TDSE"]
