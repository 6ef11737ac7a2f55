"""2DGBNN: stochastic weight sharing for Bayesian networks (Lin et al., AISTATS 2025).

The plan, one step each:

1. ``bnn 1..E``: train the converted network as a mean-field BNN by variational inference,
   ``loss = NLL + kl_weight * KL(q || N(w_pretrained, prior_sigma^2)) / N_train``. Sigma is the
   parameter itself, kept positive by projection: after every optimiser step it is clamped to
   ``sigma_min`` (the sampling op already floors it at 2^-30). The last epoch accumulates each
   weight's gradient magnitude for the outlier rule.
2. ``mixture``: every conv/linear weight entry is a point (mu, sigma). Outliers keep their own
   Gaussian: ``|mu| >= tau_w`` (``auto``: the 99.9th percentile of ``|mu|``), the top
   ``grad_outlier_fraction`` by accumulated gradient magnitude, and members of clusters with at
   most ``min_cluster_size`` points. The rest are clustered by k-means (on the raw points: mu,
   ten times sigma's scale, decides most of it, so a Gaussian's members have close means) into
   Gaussians with the members' mean and full covariance, which are also the priors; members
   outside their Gaussian's 95 % ellipse are blended. The ellipse is the fitted (prior)
   Gaussian's, which describes how the members spread; the posterior's mu-variance, which VI
   shrinks to what the loss tolerates, would put most members outside it.
3. ``vi 1..E``: variational inference over the Gaussians' means and Cholesky factors and the
   outliers' (mu, sigma), with the post-init values as priors (closed-form KL). One 2-D sample
   per Gaussian per forward pass; every member takes its first coordinate. After every epoch but
   the last, neighbouring Gaussians close in Wasserstein-2 distance with small member gradient
   and member variance merge (the last epoch trains the final set).

Prediction averages the logits of ``eval_samples`` forward passes, then takes the softmax.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from pwf_core._seeding import derive_seed, seed_everything
from pwf_core.bayes import bayesian_params, set_sampling
from pwf_core.distributed import is_main
from pwf_core.methods.base import (
    ECE,
    TOP1,
    Column,
    Figure,
    Method,
    Step,
    StepContext,
    StepRecord,
    integer,
    prefixed,
)
from pwf_core.methods.gbnn2d.blending import assign_blends
from pwf_core.methods.gbnn2d.config import AUTO_TAU_W_SHARE, TwoDGBNNConfig
from pwf_core.methods.gbnn2d.export import stored_bytes
from pwf_core.methods.gbnn2d.gaussians import (
    fitted_gaussians,
    kmeans_2d,
    parameters_from_covariance,
)
from pwf_core.methods.gbnn2d.merging import MergeRule, merge
from pwf_core.methods.gbnn2d.network import (
    ATTRIBUTE,
    install,
    mixture_snapshot,
    sharing_of,
    weight_points,
)
from pwf_core.methods.gbnn2d.sharing import SharedGaussians
from pwf_core.methods.gbnn2d.training import MeanFieldHooks, SharedGaussianHooks, dataset_size
from pwf_core.registry import register_method
from pwf_core.train import OptimConfig, TrainingHooks, train

MAX_AUTO_GAUSSIANS = 6000


GAUSSIANS = Column("ws/shared_values", "Gaussians", integer)
OUTLIERS = Column("ws/outliers", "outliers", integer)


def magnitude_threshold(mu: torch.Tensor, tau_w: float | str) -> float:
    """The ``|mu|`` from which a weight is an outlier by magnitude.

    Args:
        mu: Every converted weight's mean (any shape).
        tau_w: An absolute threshold, returned as it is, or ``auto``: the
            ``round(AUTO_TAU_W_SHARE * N)``-th largest ``|mu|`` (at least the largest), so that
            ``|mu| >= threshold`` holds for that many weights, ties aside, whatever the
            weights' scale.
    """
    if tau_w != "auto":
        return float(tau_w)
    magnitude = mu.detach().abs().flatten().cpu()
    top = max(1, round(AUTO_TAU_W_SHARE * len(magnitude)))
    return float(torch.kthvalue(magnitude, len(magnitude) - top + 1).values)


@register_method
class TwoDGBNN(Method):
    """Mean-field BNN → shared 2-D Gaussians with outliers and blends → VI with merging."""

    config_class = TwoDGBNNConfig
    bayesian = True
    stochastic_final = True
    converted: ClassVar[tuple[str, ...]] = ("weight",)
    size_knob = "compression.gaussians (K before merging) and compression.tau_d (merging)"
    size_knob_fields = ("gaussians", "tau_d")
    table_columns: ClassVar[tuple[Column, ...]] = (GAUSSIANS, OUTLIERS, TOP1, ECE)
    config: TwoDGBNNConfig

    def __init__(self, config: TwoDGBNNConfig) -> None:
        super().__init__(config)
        self.prior_mu: torch.Tensor | None = None
        self.grad_magnitude: torch.Tensor | None = None
        self.meanfield: dict[str, float] = {}
        self.tau_w: float | None = None  # the magnitude threshold used; None before the mixture
        self.clusters: int | None = None  # K that k-means used (gaussians: auto resolved)

    # -- plan and state ---------------------------------------------------------------------

    def plan(self) -> list[Step]:
        cfg = self.config
        stages = [("bnn", cfg.bnn_epochs), ("mixture", 1), ("vi", cfg.vi_epochs)]
        steps, index = [], 0
        for stage, count in stages:
            for number in range(1, count + 1):
                steps.append(Step(index=index, stage=stage, number=number, of=count))
                index += 1
        return steps

    def initialise(self, model: nn.Module) -> None:
        for param in bayesian_params(model):
            param.sigma.data.fill_(self.config.sigma_init)
        self.prior_mu = torch.cat([p.mu.detach().flatten() for p in bayesian_params(model)])

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"meanfield.{k}": torch.tensor(v) for k, v in self.meanfield.items()}
        if self.prior_mu is not None:
            state["prior_mu"] = self.prior_mu
        if self.grad_magnitude is not None:
            state["grad_magnitude"] = self.grad_magnitude
        if self.tau_w is not None:  # float64: the metric shows the threshold that was used
            state["tau_w"] = torch.tensor(self.tau_w, dtype=torch.float64)
        if self.clusters is not None:
            state["clusters"] = torch.tensor(self.clusters)
        return state

    def state_bytes(self, num_converted: int) -> int:
        # prior_mu and grad_magnitude (float32) and the shared Gaussians' member index (int64)
        # per weight; the Gaussians, blends and outliers are a small share on top.
        return 20 * num_converted

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.prior_mu = state.get("prior_mu")
        self.grad_magnitude = state.get("grad_magnitude")
        self.tau_w = float(state["tau_w"]) if "tau_w" in state else None
        self.clusters = int(state["clusters"]) if "clusters" in state else None
        self.meanfield = {
            k.removeprefix("meanfield."): float(v) for k, v in state.items() if "meanfield." in k
        }

    def before_load(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        prefix = f"{ATTRIBUTE}."
        if any(key.startswith(prefix) for key in tensors):
            install(model, SharedGaussians.from_state(tensors, prefix))

    # -- steps ------------------------------------------------------------------------------

    def _train(
        self, model: nn.Module, step: Step, ctx: StepContext, lr: float, hooks: TrainingHooks
    ):
        sigma_lr = self.config.bnn_sigma_lr if step.stage == "bnn" else lr
        optim = OptimConfig(
            optimizer="adamw",
            lr=lr,
            sigma_lr=sigma_lr,
            weight_decay=0.0,
            grad_clip=None,
            compile=ctx.train.compile,
            channels_last=ctx.train.channels_last,
            amp=ctx.train.amp,
        )
        return train(
            model,
            ctx.train_loader,
            optim,
            1.0,
            device=ctx.device,
            hooks=hooks,
            epoch_offset=1000 * step.index,
            progress=ctx.progress_for(step),
        )

    def run_step(self, model: nn.Module, step: Step, ctx: StepContext) -> StepRecord:
        seed_everything(derive_seed(ctx.seed, step.stage, step.number))
        start = time.perf_counter()
        metrics: dict[str, float] = {}
        if step.stage == "bnn":
            assert self.prior_mu is not None, "initialise() records the prior before the BNN"
            last = step.number == step.of
            hooks = MeanFieldHooks(self.prior_mu, self.config, dataset_size(ctx.train_loader), last)
            trained = self._train(model, step, ctx, self.config.bnn_lr, hooks)
            if last:  # the outlier rule reads the last BNN epoch's gradients
                self.grad_magnitude = hooks.grad_magnitude
            metrics |= {"train/loss": trained.mean_loss, "time/train_s": trained.seconds}
        elif step.stage == "mixture":
            if is_main():  # rank 0's points and gradients decide; the others receive it
                self.build_mixture(model)
        else:
            sharing = sharing_of(model)
            sharing.reset_gradients()
            hooks = SharedGaussianHooks(sharing, self.config, dataset_size(ctx.train_loader))
            trained = self._train(model, step, ctx, self.config.vi_lr, hooks)
            metrics |= {"train/loss": trained.mean_loss, "time/train_s": trained.seconds}
            if step.number < step.of and is_main():
                points = weight_points(model).to(sharing.means.device)
                metrics["bnn/merged"] = float(merge(sharing, points, self.merge_rule))
                assign_blends(sharing, points)
        self.synchronise(model)
        samples = self.config.step_samples
        measured = time.perf_counter()
        metrics |= ctx.evaluate(model, mc_samples=samples, average="logits")
        metrics |= self.structure_metrics(model) | self.threshold_metrics()
        metrics["time/eval_s"] = time.perf_counter() - measured
        metrics["time/step_s"] = time.perf_counter() - start
        if step.stage == "bnn" and step.number == step.of:
            final = ctx.evaluate(model, mc_samples=self.config.eval_samples, average="logits")
            self.meanfield = {f"meanfield/{k}": v for k, v in final.items()} | {
                f"meanfield/{k}": v
                for k, v in self.structure_metrics(model).items()
                if k.startswith("size/")
            }
        return StepRecord(step, metrics)

    @property
    def merge_rule(self) -> MergeRule:
        cfg = self.config
        tau_g = math.inf if cfg.tau_g is None else cfg.tau_g
        return MergeRule(cfg.tau_d, tau_g, cfg.tau_v, cfg.merge_neighbours)

    def number_of_gaussians(self, num_weights: int, num_inliers: int) -> int:
        wanted = self.config.gaussians
        if wanted == "auto":
            wanted = min(MAX_AUTO_GAUSSIANS, max(8, round(math.sqrt(num_weights))))
        return max(1, min(int(wanted), num_inliers // (self.config.min_cluster_size + 1) or 1))

    @torch.no_grad()
    def build_mixture(self, model: nn.Module) -> SharedGaussians:
        """Outliers, k-means, Gaussians with full covariances, blends: install on ``model``."""
        cfg = self.config
        points = weight_points(model)
        device = points.device
        count = len(points)
        self.tau_w = magnitude_threshold(points[:, 0], cfg.tau_w)
        outlier = points[:, 0].abs() >= self.tau_w
        if self.grad_magnitude is not None and cfg.grad_outlier_fraction > 0:
            top = max(1, math.ceil(cfg.grad_outlier_fraction * count))
            magnitude = self.grad_magnitude.to(device)
            threshold = torch.kthvalue(magnitude.cpu(), count - top + 1).values.to(device)
            outlier |= magnitude >= threshold
        inliers = (~outlier).nonzero().squeeze(1)
        clusters = self.number_of_gaussians(count, len(inliers))
        self.clusters = clusters
        _, labels = kmeans_2d(points[inliers], clusters)
        sizes = torch.bincount(labels, minlength=clusters)
        kept = sizes > cfg.min_cluster_size
        small = ~kept[labels]
        outlier[inliers[small]] = True
        inliers, labels = inliers[~small], labels[~small]
        compact = torch.cumsum(kept, 0) - 1
        labels = compact[labels]
        total = int(kept.sum())
        means, covariance = fitted_gaussians(points[inliers].cpu(), labels.cpu(), total)
        log_diag, offdiag = parameters_from_covariance(covariance)
        outliers = outlier.nonzero().squeeze(1)
        sharing = SharedGaussians(total, len(outliers), 0, count)
        sharing.means.data.copy_(means)
        sharing.log_diag.data.copy_(log_diag)
        sharing.offdiag.data.copy_(offdiag)
        sharing.outlier_mu.data.copy_(points[outliers, 0].cpu())
        sigma = points[outliers, 1].clamp_min(cfg.sigma_min).cpu()
        sharing.outlier_log_sigma.data.copy_(sigma.log())
        sharing.member[:] = -1
        sharing.member[inliers.cpu()] = labels.cpu()
        sharing.outlier_index.copy_(outliers.cpu())
        for name in ("means", "log_diag", "offdiag", "outlier_mu", "outlier_log_sigma"):
            getattr(sharing, f"prior_{name}").copy_(getattr(sharing, name).detach())
        install(model, sharing)
        assign_blends(sharing, points)
        return sharing

    # -- measurements -----------------------------------------------------------------------

    def threshold_metrics(self) -> dict[str, float]:
        """``bnn/tau_w``: the magnitude threshold the mixture used (what ``auto`` became)."""
        return {} if self.tau_w is None else {"bnn/tau_w": self.tau_w}

    def structure_metrics(self, model: nn.Module) -> dict[str, float]:
        """Counts of Gaussians, outliers and blends; trainable parameters and stored bytes."""
        sharing = sharing_of(model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if sharing is None:  # the mean-field BNN: mu and sigma of every weight, all float32
            return {"size/trainable_params": float(trainable), "size/bytes": 4.0 * trainable}
        return {
            "ws/shared_values": float(sharing.num_gaussians),
            "ws/outliers": float(sharing.num_outliers),
            "bnn/blended": float(sharing.num_blended),
            "ws/unique_values": float(sharing.num_gaussians + sharing.num_outliers),
            "size/trainable_params": float(trainable),
            "size/bytes": float(stored_bytes(model)),
        }

    def describe(self, metrics: Mapping[str, float], step: Step | None = None) -> list[str]:
        """``98 Gaussians``, ``876 outliers`` once the mixture exists."""
        return [
            f"{int(metrics[column.key])} {column.label}"
            for column in (GAUSSIANS, OUTLIERS)
            if column.key in metrics
        ]

    def summary_line(self, metrics: Mapping[str, float]) -> str:
        return (
            f"top-1 {100 * metrics['cls/acc']:.2f} %, NLL {metrics['cls/nll']:.4f}, ECE "
            f"{metrics['cal/ece']:.4f} with {int(metrics['ws/shared_values'])} shared Gaussians, "
            f"{int(metrics['ws/outliers'])} outliers; "
            f"{int(metrics['size/trainable_params']):,} trainable parameters "
            f"(mean-field BNN: {int(metrics['meanfield/size/trainable_params']):,})"
        )

    def figures(self, model: nn.Module, seed: int) -> list[Figure]:
        """The (mu, sigma) points coloured by Gaussian, with each Gaussian's 95 % ellipse."""
        if sharing_of(model) is None:
            return []
        return [Figure("mixture", "gaussian_mixture", mixture_snapshot(model, seed=seed))]

    def size_knobs(self) -> dict[str, str]:
        knobs = super().size_knobs()
        return knobs | ({"gaussians": str(self.clusters)} if self.clusters is not None else {})

    def finalize(self, model: nn.Module, ctx: StepContext) -> dict[str, float]:
        """The stochastic model's metrics (``eval_samples`` averaged logits: the headline
        ``cls/*``, ``cal/*``, and the same under ``sampled/``), the mean-weight model's
        (``mean/*``), the mean-field BNN's (``meanfield/*``), the sizes."""
        set_sampling(model, None)
        model.eval()
        seed_everything(derive_seed(ctx.seed, "final-eval"))
        headline = ctx.evaluate(
            model, mc_samples=self.config.eval_samples, average="logits", keep=True
        )
        metrics = {**headline, **prefixed("sampled", headline)}
        metrics |= prefixed("mean", ctx.evaluate(model))
        metrics |= self.structure_metrics(model) | self.threshold_metrics() | self.meanfield
        plain = sum(p.numel() for p in model.parameters() if p.requires_grad)
        plain += sum(p.mu.numel() for p in bayesian_params(model))
        plain -= sharing_of(model).trainable_params()
        metrics["deterministic/size/params"] = float(plain)
        metrics["deterministic/size/bytes"] = 4.0 * plain
        return metrics
