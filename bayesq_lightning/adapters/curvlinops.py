r"""curvlinops' private API: the K-FAC operator of the K-FAC fit.

Written against curvlinops-for-pytorch 3.0.1. :class:`KFACOperator` overrides two private methods
of ``KFACLinearOperator`` (:data:`OVERRIDDEN`), calls one (:data:`CALLED`) and reads or writes
its private attributes (:data:`ATTRIBUTES`); nothing else in the package touches them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from curvlinops import KFACLinearOperator
from curvlinops.kfac import FisherType
from torch import nn

from ..input_stats import SharedProducts

if TYPE_CHECKING:
    from ...input_stats import InputStats

PACKAGE, VERSION = "curvlinops-for-pytorch", "3.0.1"
OVERRIDDEN = (("_hook_accumulate_input_covariance", ("self", "module", "inputs", "module_name")),
              ("_compute_loss_and_backward", ("self", "output", "y")))
"""``KFACLinearOperator`` methods overridden here, with their parameters; ``compute_kronecker_factors``
must call them."""
CALLED = (("_maybe_adjust_loss_scale", ("self", "loss", "output")),)
"""``KFACLinearOperator`` private methods called here, with their parameters."""
ATTRIBUTES = ("_params", "_mapping", "_fisher_type", "_mc_samples", "_loss_func",
              "_input_covariances", "_gradient_covariances")
"""Private attributes of a ``KFACLinearOperator`` read or written here."""


class KFACOperator(KFACLinearOperator):
    r"""curvlinops' ``KFACLinearOperator`` with three changes that leave its factors as they are.

    * The modules named in ``input_stats`` (by their names in the operator's model) add their
      inputs to those :class:`~bayesq_lightning.input_stats.InputStats` (K-FAC's ``A`` streamed
      over every batch) instead of to the operator's own input covariance; the finished ``A`` is
      handed back with :meth:`set_input_factor`.
    * The exact GGN of a two-class cross-entropy takes one backward pass instead of two. The
      loss Hessian in the logits, :math:`\mathrm{diag}(p) - p p^\top`, has rank
      :math:`C - 1`; for :math:`C = 2` it is :math:`v v^\top` with
      :math:`v = \sqrt{p_0 p_1}\,(1, -1)`, so one backward pass along ``v`` gives the same
      output factor ``G`` as curvlinops' two columns of its square root (to rounding).
    * That pass, and the Monte-Carlo GGN's, ask for each layer's bias gradient where it has a
      bias, not its weight's (:meth:`backward_for_factors`): the output factors are the same,
      bit for bit, without the weight gradients' matrix products.
    """

    def __init__(self, *args, input_stats: Mapping[str, InputStats] | None = None,
                 **kwargs) -> None:
        self.input_stats: dict[str, InputStats] = dict(input_stats or {})
        self.shared_inputs = SharedProducts()  # layers reading one tensor: one product
        super().__init__(*args, **kwargs)

    def set_input_factor(self, module_name: str, A: torch.Tensor) -> None:
        """Use ``A`` as the input factor of ``module_name`` (after ``compute_kronecker_factors``)."""
        self._input_covariances[module_name] = A

    def output_factors(self) -> dict[str, torch.Tensor]:
        """The output factors ``G`` by module name (after ``compute_kronecker_factors``)."""
        return self._gradient_covariances

    def backward_for_factors(self, scalar: torch.Tensor, retain_graph: bool) -> None:
        """One backward pass of ``scalar`` that reaches every layer's output gradient.

        ``G`` reads the gradients of the layers' outputs, which its hooks see on the way: a
        layer's bias gradient (a sum of that output gradient) forces them as surely as its
        weight's, without the weight gradient's matrix product.
        """
        targets = [self._params[pos.get("bias", pos.get("weight"))]
                   for pos in self._mapping.values()]
        torch.autograd.grad(scalar, targets, retain_graph=retain_graph)

    def _hook_accumulate_input_covariance(self, module: nn.Module, inputs: tuple,
                                          module_name: str) -> None:
        if module_name in self.input_stats:
            self.input_stats[module_name].add(inputs, self.shared_inputs)
        else:
            super()._hook_accumulate_input_covariance(module, inputs, module_name)

    def _compute_loss_and_backward(self, output: torch.Tensor, y: torch.Tensor) -> None:
        if self._fisher_type == FisherType.MC and output.ndim == 2:
            for mc in range(self._mc_samples):  # curvlinops' Monte-Carlo GGN
                loss = self._loss_func(output, self.draw_label(output))
                self.backward_for_factors(self._maybe_adjust_loss_scale(loss, output),
                                          retain_graph=mc < self._mc_samples - 1)
            return None
        if not (self._fisher_type == FisherType.TYPE2 and output.ndim == 2
                and output.shape[1] == 2
                and type(self._loss_func) is nn.CrossEntropyLoss):
            return super()._compute_loss_and_backward(output, y)
        p = output.detach().softmax(dim=1)
        v = (p[:, 0] * p[:, 1]).sqrt().unsqueeze(1) * output.new_tensor([1.0, -1.0])
        if self._loss_func.reduction == "mean":  # curvlinops' scaling of its square root
            v = v / output.shape[0]
        self.backward_for_factors((output * v).sum(), retain_graph=False)
        return None
