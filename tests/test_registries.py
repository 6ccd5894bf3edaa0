"""Algorithms and samplers are plug-ins: registered by name, found by main.py's code path,
validated by their own rules; the validator's choice lists are the registries."""

import dataclasses
import json

import pytest
import torch
from test_end_to_end import make_cfg

import algorithms
import main
from config_check import ConfigError, registry_choices, validate_config
from sampling import predictors


def test_the_validators_choices_are_the_registries():
    choices = registry_choices()
    assert choices["training.loss_type"] == algorithms.names("training.loss_type")
    own = {"mdlm", "vae", "lambda_dce", "k_dce", "t_dse"}
    radd = {"t_DCE", "t_dce", "lambda_DCE", "k_DCE", "t_DSE"}  # RADD's spellings
    assert set(choices["training.loss_type"]) == own | radd
    assert choices["sampling.predictor"] == ["auto", *predictors.PREDICTORS]
    families = {cls.family for cls in algorithms.ALGORITHMS.values()}
    for cls in algorithms.ALGORITHMS.values():  # every default sampler exists and fits
        pred = predictors.get_predictor(cls.default_predictor)
        assert pred.family == cls.family and (cls.uses_latent or not pred.needs_latent)
    assert {p.family for p in predictors.PREDICTORS.values()} <= families


def test_the_other_name_maps_match_their_choice_lists_and_config_groups():
    """config_check loads before torch, so these lists are written out: they must stay
    the name maps the code builds from."""
    from pathlib import Path

    import noise_schedule
    from config_check import CHOICES
    from data import sources

    assert CHOICES["noise.type"] == list(noise_schedule.SCHEDULES)
    root = Path(__file__).resolve().parents[1] / "configs"
    for group in root.joinpath("noise").glob("*.yaml"):  # every noise group names a schedule
        assert group.read_text().split("type:")[1].split()[0] in noise_schedule.SCHEDULES
    for group in root.joinpath("data").glob("*.yaml"):  # every text data group has a source
        text = group.read_text()
        if "kind:" not in text:
            for key in ("train:", "valid:"):
                assert text.split(key)[1].split()[0] in sources.SOURCES, (group.name, key)


@pytest.mark.parametrize(
    "overrides,name,bound",
    [
        ([], "vae", "negative DELBO, kl_weighting=time, continuous time, beta=1"),
        (["eval.num_particles=3"], "vae", "negative IWAE-DELBO (K=3)"),
        (["training.loss_type=mdlm", "T=4"], "mdlm", "MDLM NELBO (T=4 steps)"),
        (["backbone=ar", "parameterization=ar"], "ar", "exact autoregressive NLL"),
        (["training.loss_type=t_DCE"], "mdlm", "t-DCE = MDLM NELBO (continuous time)"),
        (["training.loss_type=lambda_DCE"], "lambda_dce", "lambda-DCE bound"),
        (["training.loss_type=k_DCE", "backbone=radd"], "k_dce", "k-DCE bound"),
        (["training.loss_type=t_DSE"], "t_dse", "t-DSE bound"),
        (["parameterization=sedd", "time_conditioning=True"], "sedd", "DWDSE bound"),
    ],
)
def test_the_config_selects_the_algorithm_and_its_bound(tmp_path, overrides, name, bound):
    algorithm = algorithms.get_algorithm(make_cfg(tmp_path, *overrides))
    assert algorithm.name == name
    particles = 3 if "eval.num_particles=3" in overrides else 1
    assert algorithm.bound_name(particles).startswith(bound)


class HalfMDLM(algorithms.MDLM):
    """A toy algorithm: MDLM's loss at half weight, its own bound name and a rule."""

    name, label = "half_mdlm", "half MDLM"

    @classmethod
    def validate(cls, cfg):
        if cfg.T != 0:
            raise ConfigError(f"training.loss_type=half_mdlm needs T=0 (got T={cfg.T})")

    def loss(self, module, batch, t, beta=1.0, num_particles=1, draws=None, train=False):
        out = super().loss(module, batch, t, beta, num_particles, draws, train)
        return dataclasses.replace(out, per_seq=out.per_seq / 2)

    def bound_name(self, num_particles):
        return "half of the MDLM NELBO (a toy)"


def fill_greedily(module, x_init, *, steps, fixz, generator, top_k, top_p, order=None):
    """A toy sampler: one network call, every [MASK] set to its most probable token."""
    masked = x_init == module.vocab.mask_id
    sigma = torch.zeros(len(x_init), device=x_init.device)
    logits = predictors.denoiser(module)(x_init, sigma, None, masked)
    x = x_init.clone()
    x[masked] = logits[:, : module.vocab.size].argmax(-1)
    return x, {"steps": 1, "nfe_per_sequence": 1.0}


@pytest.fixture
def registered(monkeypatch):
    """Register the toy algorithm and sampler for one test, as a user's module would."""
    monkeypatch.setitem(algorithms.ALGORITHMS, HalfMDLM.name, HalfMDLM)
    greedy = predictors.Predictor("greedy", fill_greedily, summary="argmax, one call")
    monkeypatch.setitem(predictors.PREDICTORS, "greedy", greedy)


def test_a_registered_algorithm_and_sampler_train_evaluate_and_sample(tmp_path, registered):
    run = tmp_path / "run"
    cfg = make_cfg(run, "training.loss_type=half_mdlm", "trainer.max_steps=3")
    validate_config(cfg)
    main.run(cfg)
    ckpt = run / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 3
    common = ["training.loss_type=half_mdlm", f"eval.checkpoint_path={ckpt}"]
    ppl = make_cfg(tmp_path / "ppl", "mode=ppl_eval", *common)
    validate_config(ppl)
    main.run(ppl)
    assert json.loads((tmp_path / "ppl" / "ppl_eval.json").read_text())["bound"] == (
        "half of the MDLM NELBO (a toy)"
    )
    sample = make_cfg(tmp_path / "s", "mode=sample_eval", "sampling.predictor=greedy", *common)
    validate_config(sample)
    main.run(sample)
    (out,) = (tmp_path / "s").glob("samples_greedy_T*.json")
    saved = json.loads(out.read_text())
    assert saved["predictor"] == "greedy" and saved["nfe_per_sequence"] == 1.0
    assert all(max(ids) < 2048 for ids in saved["token_ids"])  # no [MASK] left
    with pytest.raises(ConfigError, match="half_mdlm needs T=0"):  # the class's own rule
        validate_config(make_cfg(tmp_path, "training.loss_type=half_mdlm", "T=4"))


def test_an_unregistered_name_is_refused_with_the_registered_ones(tmp_path):
    with pytest.raises(
        ConfigError, match=r"'half_mdlm' is not one of \['mdlm', 'vae', 'lambda_dce'"
    ):
        validate_config(make_cfg(tmp_path, "training.loss_type=half_mdlm"))
    with pytest.raises(ConfigError, match="sampling.predictor='greedy' is not one of"):
        validate_config(make_cfg(tmp_path, "sampling.predictor=greedy"))


def test_a_name_cannot_be_registered_twice():
    class Other(algorithms.MDLM):
        name = "mdlm"

    with pytest.raises(ValueError, match="registered already"):
        algorithms.register(Other)
    with pytest.raises(ValueError, match="registered already"):
        predictors.register(predictors.Predictor("vae", fill_greedily))


def test_every_data_group_says_its_kind_and_a_group_without_one_is_one_line(tmp_path):
    """data.kind has one home, the data group: the code reads it without a default."""
    from pathlib import Path

    from omegaconf import open_dict

    for group in (Path(__file__).resolve().parents[1] / "configs" / "data").glob("*.yaml"):
        assert "\nkind: " in group.read_text(), group.name
    cfg = make_cfg(tmp_path)
    with open_dict(cfg):
        del cfg.data["kind"]  # a user's group written before data.kind existed
    with pytest.raises(ConfigError, match="data=bible has no data.kind: add 'kind: text'"):
        validate_config(cfg)


def test_a_recipe_sets_only_what_it_changes_and_recipe_paper_nothing():
    """config.yaml and its groups are the one home of the paper-scale values: a recipe
    that repeated one would be a second home, which drifts when the default changes."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from checkpointing.architecture import leaves

    root = Path(__file__).resolve().parents[1] / "configs"
    assert not OmegaConf.load(root / "recipe" / "paper.yaml")  # comments only
    with initialize_config_dir(config_dir=str(root), version_base=None):
        base = OmegaConf.to_container(compose("config", overrides=["recipe=paper"]))
        cosine = compose("config", overrides=["lr_scheduler=cosine_decay_warmup"])
        base_cosine = OmegaConf.to_container(cosine.lr_scheduler)
    repeats = []
    for path in sorted(root.joinpath("recipe").glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path)) or {}
        picks_cosine = "override /lr_scheduler: cosine_decay_warmup" in path.read_text()
        for key, value in leaves({k: v for k, v in node.items() if k != "defaults"}).items():
            group, _, leaf = key.partition(".")
            default = leaves(base).get(key)
            if group == "lr_scheduler" and picks_cosine:
                default = base_cosine.get(leaf)
            if value == default:
                repeats.append(f"{path.name}: {key}={value}")
    assert not repeats, repeats
