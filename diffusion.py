"""The Lightning module: training and validation loops around the objectives.

What lives here: optimisation (manual, so accumulation, gradient clipping, VADD's
encoder-only steps and EMA updates are explicit and in one place), KL annealing, the
global-batch antithetic time draw, EMA swapping for evaluation, and metric reduction.
What does not: the algorithm's loss and bound (algorithms/), sampling (sampling/), data
(dataloader.py, data/).
"""

import os
from contextlib import nullcontext

import lightning as L
import torch
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from omegaconf import DictConfig, OmegaConf

import sharding
import utils
from algorithms import get_algorithm, losses, objectives
from checkpointing import interchange, resume_state
from checkpointing.checkpoints import load_for_eval, read_checkpoint
from data.tokenization import Vocab, tokenizer_from_state
from errors import CheckpointError, NonFiniteLossError, VaddError  # noqa: F401  (re-exported)
from evaluation import latent_diagnostics, validation
from models import build_networks
from models.ema import ExponentialMovingAverage
from noise_schedule import get_noise
from sampling import generation


class Diffusion(L.LightningModule):
    def __init__(self, cfg: DictConfig, vocab: Vocab, tokenizer_state: dict | None = None):
        super().__init__()
        self.cfg, self.vocab = cfg, vocab
        self.tokenizer_state = tokenizer_state  # saved in checkpoints for evaluation
        self.algorithm = get_algorithm(cfg)  # the loss, bound and hooks (algorithms/)
        self.backbone, self.encoder = build_networks(cfg, vocab.model_size, self.algorithm)
        self.spec = objectives.DiffusionSpec(
            noise=get_noise(cfg.noise),
            mask_id=vocab.mask_id,
            vocab_size=vocab.size,
            num_steps=cfg.T,
            kl_weighting=cfg.training.kl_weighting,
            time_conditioning=cfg.time_conditioning,
            fade_to_prior=bool(cfg.decoder.fade_to_prior),
            frame=generation.training_frame(cfg, vocab.bos_id, vocab.eos_id),
        )
        tr = cfg.training
        self.free_bits = objectives.FreeBits(tr.free_bits, tr.free_bits_group)
        self.ema = None
        if cfg.training.ema > 0:
            self.ema = ExponentialMovingAverage(self.trainable_parameters(), cfg.training.ema)
        self.accumulate = int(cfg.trainer.accumulate_grad_batches)
        self.eval_draws, self.eval_particles = 1, 1  # ppl_eval raises both
        self.automatic_optimization = False
        self._val_sums: dict[str, torch.Tensor] = {}
        self.results: dict = {}
        self._micro = 0  # micro-batch index inside the current accumulation window
        self._rows_seen = 0  # rows of this rank's shard consumed in the current epoch
        self.train_sampler = None  # data_order.ResumableSampler of the training loader
        self._resumed_epoch: int | None = None  # the epoch a resume continues
        self._resume_rng: list | None = None

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location="cpu", use_ema=True, **_):
        """A ready model from a vadd checkpoint or exported folder: config, vocabulary and
        tokenizer (`.tokenizer`) from the file, the EMA weights (use_ema=False: the raw
        ones) in the networks, eval mode. Lightning's name; no hyper-parameters needed."""
        ckpt, path = read_checkpoint(str(checkpoint_path)), str(checkpoint_path)
        vadd = ckpt.get("vadd") or {}
        if "foreign" in ckpt:  # its config holds the architecture only, not a whole run's
            raise CheckpointError(
                f"{path} is a RADD / SEDD folder: evaluate it with `python main.py "
                f"mode=ppl_eval eval.checkpoint_path={path}` (or mode=sample_eval), or start "
                "a vadd run from its weights with model.init_from=<folder>"
            )
        if "config" not in vadd:
            raise CheckpointError(
                f"{path} holds no vadd config (an MDLM checkpoint?): warm-start a vadd run "
                "from it with model.init_from=<path>"
            )
        cfg = OmegaConf.create(vadd["config"])
        cfg.eval.disable_ema = not use_ema
        module = cls(cfg, Vocab(**vadd["vocab"]), vadd.get("tokenizer"))
        load_for_eval(module, ckpt, path)
        if module.ema is not None:
            if use_ema:  # the weights every evaluation of this checkpoint reports
                module.ema.copy_to(module.trainable_parameters())
            module.ema = None  # the networks hold the chosen weights: nothing to swap
        state = vadd.get("tokenizer")
        module.tokenizer = tokenizer_from_state(state) if state else None
        return module.to(map_location).eval()

    def networks(self) -> list[torch.nn.Module]:
        return [self.backbone] + ([self.encoder] if self.encoder is not None else [])

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for net in self.networks() for p in net.parameters() if p.requires_grad]

    def configure_model(self) -> None:
        """strategy=fsdp: shard the networks (FSDP2) before the optimiser is built; the EMA
        shadows become the matching shards. Other strategies keep whole networks."""
        if not sharding.is_fsdp(self.trainer.strategy):
            return
        reshard = self.cfg.strategy.reshard_after_forward
        sharding.shard_networks(self.networks(), self.trainer.strategy, reshard)
        if self.ema is not None:
            self.ema.shard_like(self.trainable_parameters())

    def _sharded(self) -> bool:
        return self._trainer is not None and sharding.is_fsdp(self.trainer.strategy)

    # ---------------------------------------------------------------- objectives
    def beta(self) -> float:
        t = self.cfg.training
        return losses.kl_beta(
            self.global_step, t.loss_strategy, t.init_kl_weight, t.kl_weight_interval,
            cycles=t.kl_cycles, ramp=t.kl_cycle_ramp, hold=t.kl_hold_steps,
        )  # fmt: skip

    def draw_t(self, n: int, seed: int, micro: int = 0, accumulate: int | None = None):
        """Antithetic t over the global batch; every rank draws the same u from `seed`.
        Validation passes accumulate=1: its batch is not an accumulation window, and the
        strata must cover [eps, 1] within it (else t would lie in 1/accumulate of it)."""
        accumulate = self.accumulate if accumulate is None else accumulate
        rank, world = utils.rank_world()
        gen = torch.Generator().manual_seed(seed)
        t = losses.sample_t(
            n,
            eps=self.algorithm.t_eps(),  # T steps: every step equally likely, no cut-off
            antithetic=self.cfg.training.antithetic_sampling,
            decoupled=bool(self.cfg.training.get("decoupled_strata", False)),
            generator=gen,
            offset=(micro * world + rank) * n,
            global_n=n * world * accumulate,
        )
        return t.to(self.device)

    def global_draws(self, n: int, length: int, seed: int, micro: int) -> objectives.Draws:
        """Mask uniforms (and latent noise) for the whole global batch, drawn from the step's
        seed on this device, sliced to this micro-batch: the same rows get the same noise
        whatever the number of devices or accumulation steps."""
        rank, world = utils.rank_world()
        rows = n * world * self.accumulate
        first = (micro * world + rank) * n
        gen = torch.Generator(device=self.device).manual_seed(seed + 1)
        mask_u = torch.rand((rows, length), generator=gen, device=self.device)[first : first + n]
        z_eps = None
        if self.algorithm.uses_latent:
            K, d = self.cfg.training.num_particles, self.cfg.model.latent_dim
            if self.cfg.model.latent1d:
                z_eps = torch.randn((rows, K, d), generator=gen, device=self.device)
                z_eps = z_eps[first : first + n]
            else:  # (rows, K, L, d) is too big to draw whole: one seed per global row instead
                z_eps = torch.empty((n, K, length, d), device=self.device)
                for i, row in enumerate(range(first, first + n)):  # rows, not tokens or steps
                    z_eps[i].normal_(generator=gen.manual_seed(utils.stream_seed(seed, "z", row)))
        return objectives.Draws(mask_u, z_eps)

    def compute_loss(
        self, batch, t, beta=1.0, num_particles=1, draws=None, train=False
    ) -> objectives.LossOutput:
        """The loss of a batch. train=True adds the training-only terms (free bits);
        evaluation calls it with beta = 1 and train=False: the plain bound."""
        return self.algorithm.loss(self, batch, t, beta, num_particles, draws, train)

    # ---------------------------------------------------------------- training
    def training_step(self, batch, batch_idx):
        opt, sched = self.optimizers(), self.lr_schedulers()
        micro = self._micro  # position inside the accumulation window (0 after a resume)
        seed = self.cfg.seed * 1_000_003 + self.global_step
        beta = self.beta()
        n, length = batch["input_ids"].shape
        t, draws = self.draw_t(n, seed, micro), self.global_draws(n, length, seed, micro)
        if micro == 0 and self.encoder is not None:
            for _ in range(self.cfg.training.encoder_training_times - 1):
                self._encoder_only_step(batch, t, beta, draws)
        out = self.compute_loss(batch, t, beta, self.cfg.training.num_particles, draws, True)
        if self.cfg.training.check_finite:
            self._check_finite(out.loss, batch)
        with self._grad_sync(last=micro + 1 == self.accumulate):
            self.manual_backward(out.loss / self.accumulate)
        self._micro = (micro + 1) % self.accumulate
        self._rows_seen += n  # after the backward: a crash above has not read this batch
        if self._micro == 0:
            self._freeze_decoder_trunk()
            norm = self._clip()
            if norm is not None:
                self.log("train/grad_norm", norm, on_step=True, batch_size=1)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            if self.ema is not None:
                self.ema.update(self.trainable_parameters())
        self._log_train(out, beta, sched)
        return out.loss.detach()

    def _check_finite(self, loss, batch):
        """Stop at a NaN/inf loss, before it reaches the weights; keep the batch to inspect."""
        finite = bool(torch.isfinite(loss))
        if self._trainer is not None and self.trainer.world_size > 1:  # all ranks stop together
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return
        path = os.path.join(
            self.cfg.checkpointing.save_dir, f"nonfinite_batch_step{self.global_step}.pt"
        )
        torch.save({k: v.cpu() for k, v in batch.items()}, path)
        raise NonFiniteLossError(
            f"training loss is {loss.item()} at step {self.global_step} (rank {self.global_rank}); "
            f"the batch is saved in {path}: lower optim.lr, check the data, or use bf16 not fp16"
        )

    def _encoder_only_step(self, batch, t, beta, draws=None):
        """One extra optimiser step of the encoder alone (`encoder_training_times` > 1).

        Uses the raw optimizer so Lightning's global step (max_steps, annealing) counts
        joint steps only; AdamW skips the decoder, whose gradients are set to None.
        """
        opt = self.optimizers()
        out = self.compute_loss(batch, t, beta, self.cfg.training.num_particles, draws, True)
        self.manual_backward(out.loss)
        for p in self.backbone.parameters():
            p.grad = None
        self._clip()
        opt.optimizer.step()
        opt.zero_grad(set_to_none=True)

    def _freeze_decoder_trunk(self):
        """training.freeze_decoder_steps=N: for the first N optimiser steps GenDIT's trunk
        (all but latent_map) gets no gradient, so AdamW skips it (warm start, README)."""
        if self.global_step < self.cfg.training.freeze_decoder_steps:
            for p in interchange.trunk_parameters(self.backbone):
                p.grad = None

    def _grad_sync(self, last: bool):
        """DDP all-reduces the gradients on the last micro-batch of an accumulation window
        only (no_sync before: local gradients add up). FSDP reduce-scatters every micro-batch,
        so its gradients stay sharded."""
        strategy = self.trainer.strategy
        if last or not isinstance(strategy, ParallelStrategy):
            return nullcontext()
        return strategy.block_backward_sync()

    def _clip(self) -> torch.Tensor | None:
        """Clip the gradients' global norm (over all shards under FSDP); return it, unclipped."""
        clip = self.cfg.trainer.gradient_clip_val
        if not clip or clip <= 0:
            return None
        norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), clip)
        return sharding.full_tensor(norm).detach()

    def _log_train(self, out, beta, sched):
        log = {"trainer/loss": out.loss.detach(), "trainer/lr": sched.get_last_lr()[0]}
        ntok = out.num_tokens.clamp_min(1)
        for name, value in out.stats.items():
            per_tok = name == "recon"
            log[f"train/{name}"] = value.sum() / ntok if per_tok else value.mean()
        if self.algorithm.uses_latent:  # beta anneals the KL term
            log["train/beta"] = beta
        self.log_dict(log, on_step=True, prog_bar=False, batch_size=len(out.per_seq))
        self.log("loss", out.loss.detach(), prog_bar=True, logger=False)

    def configure_optimizers(self):
        o = self.cfg.optim
        params = self.trainable_parameters()
        if self.encoder is not None and o.encoder_lr_scale != 1.0:
            # the encoder at lr x encoder_lr_scale (README "Posterior collapse"); one group
            # otherwise, so checkpoints keep the optimizer layout they always had
            enc = {id(p) for p in self.encoder.parameters()}
            params = [
                {"params": [p for p in params if id(p) not in enc]},
                {"params": [p for p in params if id(p) in enc], "lr": o.lr * o.encoder_lr_scale},
            ]
        opt = torch.optim.AdamW(
            params,
            lr=o.lr,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
            weight_decay=o.weight_decay,
            fused=self.device.type in ("cuda", "cpu"),  # one kernel per step (5x on CPU)
        )
        sched = utils.build_lr_scheduler(opt, self.cfg.lr_scheduler, self.cfg.trainer.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---------------------------------------------------------------- evaluation
    def on_validation_model_zero_grad(self) -> None:
        """Keep the gradients: Lightning zeroes them before every validation, which would
        silently drop a partial accumulation window when validation falls inside one
        (val_check_interval counts micro-batches). The optimizer step zeroes them itself."""

    def on_validation_epoch_start(self):
        self._rng_state = utils.get_rng_state()
        torch.manual_seed(self.cfg.seed)  # the same masks every validation: comparable numbers
        self._val_sums = {}
        self._latent_stats = latent_diagnostics.LatentStats()
        if self.ema is not None and not self.cfg.eval.disable_ema:
            self.ema.store_and_swap(self.trainable_parameters())
        if self._sharded():  # no collectives per forward: ranks may run unequal batch counts
            sharding.gather_for_eval(self.networks())

    def validation_step(self, batch, batch_idx):
        validation.evaluate_batch(self, batch, batch_idx)  # ppl_times draws, batched

    def _accumulate(self, key, value):
        value = value.detach().double()
        self._val_sums[key] = self._val_sums.get(key, 0.0) + value

    def on_validation_epoch_end(self):
        sums = {
            k: self.trainer.strategy.reduce(v, reduce_op="sum") for k, v in self._val_sums.items()
        }
        self.results = utils.summarise_eval(sums, self.eval_draws)
        if self.algorithm.uses_latent:
            rows = float(sums["sequences"]) * self.eval_draws
            summary = latent_diagnostics.reduce_and_summarise(
                self._latent_stats, self.trainer.strategy, rows, self.cfg.seed
            )
            self.results.update(summary)
        if self.cfg.data.kind == "image":  # one token per pixel value: bits per dim
            self.results["bits_per_dim"] = self.results["bpd"]
        if not self.trainer.sanity_checking:
            logged = {
                f"val/{k}": float(v)
                for k, v in self.results.items()
                if isinstance(v, float | int) and not isinstance(v, bool)
            }
            self.log_dict(logged, sync_dist=True, batch_size=1)  # equal on every rank
        if self._sharded():  # the registered parameters are the shards again
            sharding.reshard(self.networks(), self.cfg.strategy.reshard_after_forward)
        if self.ema is not None:
            self.ema.restore(self.trainable_parameters())
        utils.set_rng_state(self._rng_state)

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint):
        checkpoint["vadd"] = {
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "vocab": self.vocab.__dict__,
            "tokenizer": self.tokenizer_state,
        }
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()
        if self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            checkpoint["resume"] = resume_state.capture(  # best.ckpt's too
                resume_state.gather_rng(), self.train_sampler, self._rows_seen, self._micro,
                self.accumulate,
            )  # fmt: skip

    def on_load_checkpoint(self, checkpoint):
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])
        state = checkpoint.get("resume")
        if state is None:
            return
        if self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            resume_state.check_resumable(state)  # (evaluation may read any checkpoint)
        # The data position is applied here, before Lightning builds the data iterator
        # (worker processes start reading the sampler as soon as it exists).
        if self.train_sampler is not None and "data" in state:
            data = resume_state.data_position(state, checkpoint.get("loops"))
            self.train_sampler.load_state_dict(data)
            self._rows_seen, self._resumed_epoch = int(data["start"]), int(data["epoch"])
        self._resume_rng = state["rng"]

    # ---------------------------------------------------------------- exact resume
    # A checkpoint carries the data position and every RNG state, so a resumed run
    # draws the same rows, masks, t and z as the uninterrupted one would have.
    # `train_sampler` (data_order.ResumableSampler) is attached by runner.train.
    def on_train_epoch_start(self):
        # A resume continues the checkpoint's epoch, for which Lightning (2.6) does not
        # call this hook, or may: keep the restored row count for that epoch only.
        if self.current_epoch != self._resumed_epoch:
            self._rows_seen = 0
        self._resumed_epoch = None

    def on_train_start(self):
        self.first_step = self.global_step  # after a resume: the restored step
        rng, self._resume_rng = self._resume_rng, None
        if rng is not None:
            utils.set_rng_state(rng[min(self.global_rank, len(rng) - 1)])
        if self.trainer.ckpt_path:  # a resume: the config's optimiser values, not the saved ones
            o, opt = self.cfg.optim, self.optimizers(use_pl_optimizer=False)
            lrs = [o.lr, o.lr * o.encoder_lr_scale][: len(opt.param_groups)]
            for line in utils.apply_optim_config(opt, self.lr_schedulers(), lrs, o):
                utils.print0(f"[vadd] resume applies {line}")
