r"""Teachers for distillation: modules mapping inputs to class log-probabilities.

Every teacher runs on its own fp32 copy of the FP32 model (never the student, never the user's
module), has no trainable parameters and needs no gradients, so it also works where Lightning
evaluates under ``inference_mode``. ``forward(x)`` returns :math:`\log p(y \mid x)`, ``(B, C)``:
feeding it to :func:`~bayesq_lightning.metrics.evaluate` gives the teacher's own accuracy, NLL and
ECE.

* :class:`FP32Teacher` -- :math:`\mathrm{softmax}(f(x; \mu))`, the control;
* :class:`GLMTeacher` -- the last Linear layer's linearised predictive with the probit link:
  :math:`f = W \phi + b`, :math:`\mathrm{Var} f_c = T (e_c \otimes \phi)^\top \Lambda^{-1}
  (e_c \otimes \phi)` from the layer's fitted posterior, and
  :math:`p = \mathrm{softmax}(\mu_f / \sqrt{1 + \pi \mathrm{Var} f / 8})` (laplace-torch's
  recommended last-layer K-FAC + GLM + probit predictive, computed in closed form);
* :class:`SampleTeacher` -- :math:`\frac1S \sum_s \mathrm{softmax}(f(x; w_s))`, ``w_s`` drawn
  from :math:`N(\mu, T \Lambda^{-1})` over every quantized layer (fixed seeds: the same draws on
  every call and every process).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..artifact.modules import QUANTIZED_TYPES
from ..artifact.replace import set_submodule
from ..batches import LogitsModel, clone_fp32, inputs_to, split_batch

TEACHERS = ("posterior", "fp32")
PREDICTIVES = ("glm", "samples")
GLM_GRID = (0.0, *(10.0 ** (k / 4) for k in range(-16, 5)))  # 0 and 1e-4 ... 10
SAMPLES_GRID = (0.0, 1e-4, 1e-3, 1e-2, 0.1, 1.0)


def fp32_reference(model: nn.Module, posterior=None) -> nn.Module:
    """An fp32 copy of ``model`` with every packed layer back in floating point.

    A packed layer gets its posterior mean (the trained FP32 weight) when ``posterior`` has it;
    a model without packed layers is simply copied.
    """
    net = clone_fp32(model)
    packed = [(n, m) for n, m in net.named_modules() if isinstance(m, tuple(QUANTIZED_TYPES.values()))]
    if packed and posterior is None:
        raise ValueError(
            f"the model is already quantized ({len(packed)} packed layers) and no posterior "
            "holds its FP32 weights; pass the FP32 model (or a result with a posterior, "
            "method='bayesq')"
        )
    for name, m in packed:
        lp = posterior.layers.get(name)
        if lp is None:
            raise ValueError(f"packed layer {name!r} has no posterior, so its FP32 weight is "
                             "unknown; pass the FP32 model")
        set_submodule(net, name, m.to_float(lp.mean.to(m.block0_codes.device).float()))
    return net


class Teacher(nn.Module):
    """Base: an fp32 eval copy of the FP32 model, frozen; ``forward`` gives log-probabilities."""

    name = ""

    def __init__(self, fp32_model: nn.Module) -> None:
        super().__init__()
        self.net = LogitsModel(clone_fp32(fp32_model))
        self.net.requires_grad_(False)
        self.n_classes: int | None = None
        self.temperature = 1.0
        self.tuning: dict[float, float] = {}  # NLL per temperature, when tuned

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # always eval: BatchNorm statistics and dropout fixed

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def forward(self, x=None, **inputs) -> torch.Tensor:
        """Log-probabilities of a tensor batch, a dict batch, or dict entries as keywords."""
        if x is None:
            x = inputs
        with torch.no_grad():  # the net (a LogitsModel) drops a ``labels`` key itself
            return self.log_probs(inputs_to(x, self.device, torch.float32))

    def log_probs(self, x) -> torch.Tensor:
        raise NotImplementedError

    def tune_temperature(self, batches: list, grid: Sequence[float]) -> float | None:
        """Set ``temperature`` to the ``grid`` value with the lowest NLL on labelled ``batches``.

        The calibration labels serve the teacher's fit only (as they serve the posterior's);
        the distillation loss never sees them. Returns the chosen value, or ``None`` (nothing
        changed) when the batches carry no labels.
        """
        labelled = [(x, y) for x, y in map(split_batch, batches) if y is not None]
        if not labelled:
            return None
        with torch.no_grad():
            nll = self._grid_nll(labelled, [float(t) for t in grid])
        self.temperature = min(nll, key=nll.get)
        self.tuning = nll
        return self.temperature

    def _grid_nll(self, labelled: list, grid: list[float]) -> dict[float, float]:
        """Mean NLL of ``(inputs, labels)`` pairs at each temperature (one pass per value)."""
        n = sum(len(y) for _, y in labelled)
        nll = {}
        for t in grid:
            self.temperature = t
            nll[t] = sum(_nll_sum(self(x), y) for x, y in labelled) / n
        return nll


def _nll_sum(log_probs: torch.Tensor, y: torch.Tensor) -> float:
    return float(-log_probs.gather(1, y.to(log_probs.device)[:, None]).sum())


class FP32Teacher(Teacher):
    """The FP32 model's own softmax."""

    name = "fp32"

    def log_probs(self, x) -> torch.Tensor:
        return self.net(x).float().log_softmax(-1)


class GLMTeacher(Teacher):
    """Last-layer GLM predictive with the probit link, from the head's fitted posterior.

    The head is the Linear layer whose output *is* the logits (found on the first call with
    forward hooks); its posterior must be among ``posterior.layers``.
    """

    name = "posterior-glm"

    def __init__(self, fp32_model: nn.Module, posterior, temperature: float = 1.0) -> None:
        super().__init__(fp32_model)
        self.posterior = posterior
        self.temperature = temperature
        self.head: str | None = None
        self._phi: torch.Tensor | None = None

    def _find_head(self, x) -> None:
        modules = dict(self.net.model.named_modules())
        seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        hooks = [modules[n].register_forward_hook(
            lambda m, i, o, n=n: seen.__setitem__(n, (i[0], o)))
            for n in self.posterior.layers if isinstance(modules.get(n), nn.Linear)]
        try:
            logits = self.net(x)
        finally:
            for h in hooks:
                h.remove()
        heads = [n for n, (_, o) in seen.items() if o.shape == logits.shape and torch.equal(o, logits)]
        if not heads:
            raise ValueError(
                "the GLM teacher needs the posterior of the Linear layer that produces the "
                f"logits, but none of the posterior's Linear layers ({len(seen)}) outputs them "
                "(the head was excluded from quantization, or the logits are post-processed); "
                "use predictive='samples' or teacher='fp32'"
            )
        self.head = heads[-1]
        if seen[self.head][0].dim() != 2:
            raise ValueError(f"the head {self.head!r} sees inputs of shape "
                             f"{tuple(seen[self.head][0].shape)}; the GLM teacher needs (B, features)")
        modules[self.head].register_forward_hook(
            lambda m, i, o: setattr(self, "_phi", i[0].detach()))

    def moments(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f_mu, Var f)`` of the logits at temperature 1, each ``(B, C)``."""
        if self.head is None:
            self._find_head(x)
        f_mu = self.net(x).float()
        var = self.posterior.layers[self.head].output_variance(self._phi, 1.0)
        return f_mu, var.to(f_mu.device).float()

    @staticmethod
    def probit(f_mu: torch.Tensor, var: torch.Tensor, temperature: float) -> torch.Tensor:
        """:math:`\log \mathrm{softmax}(\mu_f / \sqrt{1 + \pi T \mathrm{Var} f / 8})`."""
        return (f_mu * (1.0 + math.pi / 8.0 * temperature * var).rsqrt()).log_softmax(-1)

    def log_probs(self, x) -> torch.Tensor:
        return self.probit(*self.moments(x), self.temperature)

    def _grid_nll(self, labelled: list, grid: list[float]) -> dict[float, float]:
        """As :meth:`Teacher._grid_nll`, with one forward pass per batch for the whole grid."""
        n = sum(len(y) for _, y in labelled)
        nll = dict.fromkeys(grid, 0.0)
        for x, y in labelled:
            f_mu, var = self.moments(inputs_to(x, self.device, torch.float32))
            for t in grid:
                nll[t] += _nll_sum(self.probit(f_mu, var, t), y) / n
        return nll


class SampleTeacher(Teacher):
    """Mean softmax over ``n_samples`` networks drawn from the posterior of the quantized layers."""

    name = "posterior-samples"

    def __init__(self, fp32_model: nn.Module, posterior, n_samples: int = 16,
                 temperature: float = 1.0, seed: int = 0) -> None:
        super().__init__(fp32_model)
        self.posterior = posterior
        self.n_samples = n_samples
        self.temperature = temperature
        self.seed = seed
        modules = dict(self.net.model.named_modules())
        self._layers = {n: modules[n] for n in posterior.layers}
        self._draws: dict[float, list[dict[str, torch.Tensor]]] = {}

    def draws(self) -> list[dict[str, torch.Tensor]]:
        """The ``n_samples`` weight draws at the current temperature, drawn once and kept
        (``n_samples`` copies of the quantized weights: memory for speed, as every batch
        reuses the same draws)."""
        t = float(self.temperature)
        if t not in self._draws:
            self._draws = {t: [
                {n: self.posterior.layers[n].sample(1, t, torch.Generator().manual_seed(
                    self.seed * 1_000_003 + s * 10_007 + i))[0]
                 for i, n in enumerate(self._layers)}
                for s in range(self.n_samples)]}
        return self._draws[t]

    def log_probs(self, x) -> torch.Tensor:
        means = {n: m.weight.detach().clone() for n, m in self._layers.items()}
        total = None
        try:
            for draw in self.draws():
                for n, m in self._layers.items():
                    m.weight.copy_(draw[n].to(m.weight.device))
                p = self.net(x).float().softmax(-1)
                total = p if total is None else total + p
        finally:
            for n, m in self._layers.items():
                m.weight.copy_(means[n])
        return (total / self.n_samples).clamp_min(1e-30).log()


def build_teacher(config, fp32_model: nn.Module, posterior=None, batches: list | None = None
                  ) -> Teacher:
    """The teacher ``config.teacher`` / ``config.predictive`` names, on its own fp32 copy.

    Parameters
    ----------
    config : DistillConfig
        ``teacher``, ``predictive``, ``posterior_temperature``, ``n_samples``, ``seed``.
    fp32_model : nn.Module
        The unquantized model (copied; see :func:`fp32_reference` for a quantized one).
    posterior : Posterior, optional
        The fitted posterior; required by ``teacher="posterior"``.
    batches : list, optional
        Labelled calibration batches: with ``config.posterior_temperature=None`` the posterior
        teacher's temperature is the grid value with the lowest NLL on them (``GLM_GRID``, or
        the coarser ``SAMPLES_GRID``; :math:`T \to 0` is the FP32 softmax, so the tuned teacher
        is never worse than FP32 on this data). Without labels, ``T = 1``.
    """
    if config.teacher == "fp32":
        return FP32Teacher(fp32_model)
    if posterior is None:
        raise ValueError(
            "teacher='posterior' needs a fitted posterior, and none was given (posterior-free "
            "methods such as 'rtn' or 'gptq' fit none); pass posterior= from a method='bayesq' "
            "result, or use teacher='fp32'"
        )
    t = 1.0 if config.posterior_temperature is None else config.posterior_temperature
    if config.predictive == "glm":
        teacher: Teacher = GLMTeacher(fp32_model, posterior, t)
    else:
        teacher = SampleTeacher(fp32_model, posterior, config.n_samples, t, config.seed)
    if batches:
        tune_teacher(teacher, config, batches)
    return teacher


def tune_teacher(teacher: Teacher, config, batches: list) -> float | None:
    """With ``config.posterior_temperature=None``, tune a posterior teacher's temperature on
    labelled ``batches`` (see :func:`build_teacher`); returns it, or ``None`` if untouched."""
    if config.teacher != "posterior" or config.posterior_temperature is not None:
        return None
    return teacher.tune_temperature(batches, GLM_GRID if config.predictive == "glm"
                                    else SAMPLES_GRID)
