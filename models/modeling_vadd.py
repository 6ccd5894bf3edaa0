"""vadd models as `transformers` classes: what an exported folder loads with.

`scripts/export.py` copies this file, `dit.py` and `attention.py` into the folder and
names them in config.json's `auto_map`, so that, offline,

    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True)
    out = model(input_ids, z=z)            # out.logits: (B, L, V + 1) log-probabilities

builds the same networks as the vadd code (models/dit.py, not a copy of them) and loads
`model.safetensors` as it is (`backbone.*`, and for VADD `encoder.*`).

`logits` are the SUBS log-probabilities log p(x0 | xt, z) (Sahoo et al. 2024): at a
[MASK] position a log-softmax over the V real tokens (the [MASK] column, id V, is -inf);
at any other position 0 for the token it holds and -inf elsewhere (it carries over).
The vadd losses use the same numbers at masked positions.
"""

from types import SimpleNamespace

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .dit import DIT, GenDIT, InferDIT


class VaddConfig(PretrainedConfig):
    """config.json of an export: vadd's own keys (`config`: the run's resolved config,
    `vocab`, `parameters`, `weights`, ...) plus what transformers needs."""

    model_type = "vadd"

    def __init__(self, config: dict | None = None, vocab: dict | None = None, **kwargs):
        self.config = config or {}
        self.vocab = vocab or {}
        kwargs.setdefault("vocab_size", self.vocab.get("model_size"))
        super().__init__(**kwargs)

    @property
    def has_encoder(self) -> bool:
        """VADD exports hold the encoder's weights; MDLM exports do not."""
        return any(name.startswith("encoder.") for name in getattr(self, "parameters", {}))


def _namespace(node: dict) -> SimpleNamespace:
    return SimpleNamespace(**node)  # the networks read their sizes as attributes


class VaddForMaskedLM(PreTrainedModel):
    """The denoiser p(x0 | xt, z) (GenDIT for VADD, DIT for MDLM) and, for VADD, the
    encoder r(z | x0, xt) (InferDIT, `encode`)."""

    config_class = VaddConfig
    base_model_prefix = "vadd"
    main_input_name = "input_ids"

    def __init__(self, config: VaddConfig):
        super().__init__(config)
        run, size = config.config, int(config.vocab["model_size"])
        m = _namespace(run["model"])
        if config.has_encoder:
            self.backbone = GenDIT(m, size)
            enc = _namespace(run["decoder"])  # the encoder's group keeps its MDLM-era name
            self.encoder = InferDIT(enc, m.latent_dim, m.latent1d, size, m.gelu)
        else:
            self.backbone, self.encoder = DIT(m, size), None
        self.mask_id = int(config.vocab["size"])
        self.post_init()

    def _init_weights(self, module):
        """Every weight comes from model.safetensors; the networks initialise themselves."""

    def _sigma(self, sigma: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
        """The noise level fed to the networks: 0 unless trained with time_conditioning."""
        if sigma is not None:
            return sigma
        if self.config.config.get("time_conditioning"):
            raise ValueError("this model was trained with time_conditioning=True: pass sigma")
        return torch.zeros(ids.shape[0], device=ids.device)

    def latent_shape(self, length: int) -> tuple[int, ...]:
        m = self.config.config["model"]
        return (m["latent_dim"],) if m["latent1d"] else (length, m["latent_dim"])

    def forward(
        self,
        input_ids: torch.Tensor,
        z: torch.Tensor | None = None,
        sigma: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> MaskedLMOutput:
        """input_ids: xt (B, L), [MASK] = id V. z: (B, d) (or (B, L, d) for per-position
        latents); None draws it from the prior N(0, I), as the samplers do. sigma: (B,)
        the noise level, only for models trained with time_conditioning (else 0)."""
        n, length = input_ids.shape
        sigma = self._sigma(sigma, input_ids)
        key_mask = None if attention_mask is None else attention_mask.bool()
        extra = {}
        if self.encoder is not None:
            if z is None:
                z = torch.randn((n, *self.latent_shape(length)), device=input_ids.device)
            extra["z"] = z
        logits = self.backbone(input_ids, sigma, key_mask=key_mask, fp32_logits=True, **extra)
        return MaskedLMOutput(logits=self.subs_log_probs(logits.float(), input_ids))

    def subs_log_probs(self, logits: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        """(B, L, V_out) network logits -> (B, L, V + 1) SUBS log-probabilities."""
        v = self.mask_id
        logp = torch.full((*xt.shape, v + 1), float("-inf"), device=xt.device)
        logp[..., :v] = torch.log_softmax(logits[..., :v], dim=-1)
        visible = xt != v
        logp[visible] = float("-inf")
        logp[visible, xt[visible]] = 0.0  # an unmasked token carries over
        return logp

    @torch.no_grad()
    def encode(
        self,
        input_ids: torch.Tensor,
        visible: torch.Tensor | None = None,
        sigma: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """VADD's encoder network r(z | x0, xt): (mu, log_sigma), each (B, d). input_ids:
        the clean x0; visible: (B, L) True where xt shows the token (None: all visible).
        With decoder.fade_to_prior=True training mixed this with the prior by the mask
        probability (mean x sqrt(p_t)); that mixing is not applied here."""
        if self.encoder is None:
            raise ValueError("this export is an MDLM model: it has no encoder and no latent")
        if visible is None:
            visible = torch.ones_like(input_ids, dtype=torch.bool)
        sigma = self._sigma(sigma, input_ids)
        key_mask = None if attention_mask is None else attention_mask.bool()
        return self.encoder(input_ids, visible, sigma, key_mask)
