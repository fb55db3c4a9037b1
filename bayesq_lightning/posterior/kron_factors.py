r"""K-FAC's Kronecker factors and their algebra, in one object (laplace-torch's ``Kron``).

:class:`KronFactors` holds the factor blocks in laplace-torch's ``Kron.kfacs`` order (the
parameters' order): a weight's block ``[G, A]``, then its bias's ``[G]`` holding the weight's
``G`` tensor, and for a ``1 x 1`` weight without bias one scalar block ``[G A]``. Its life:
:meth:`~KronFactors.accumulate` (one curvlinops K-FAC operator over the calibration loader),
:meth:`~KronFactors.combine` (the sum across processes), :meth:`~KronFactors.normalise` (the
``n_data`` scale, ``mean(diag G) = 1``) and :meth:`~KronFactors.spectrum` (the eigenvalues the
prior precision is fitted on).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from ..input_stats import InputStats, finish_input_hessians
from .fit import Prepared, Reduce
from .marglik import Spectrum


class KronFactors:
    r"""The Kronecker factors of every K-FAC parameter block, and their algebra.

    Parameters
    ----------
    blocks : list of list of Tensor
        laplace-torch's ``Kron.kfacs`` (see the module); the lists are owned (and edited in
        place) by this object.
    n_samples : int
        The calibration samples the factors sum (``G``) or average (``A``) over; after
        :meth:`combine`, over all processes.
    combined_inputs : iterable of int
        Blocks whose ``A`` already is the mean over every process's rows (streamed input
        statistics): :meth:`combine` leaves it alone.
    """

    def __init__(self, blocks: list[list[Tensor]], n_samples: int,
                 combined_inputs: Iterable[int] = ()) -> None:
        self.blocks = blocks
        self.n_samples = n_samples
        self.combined_inputs = frozenset(combined_inputs)
        self.weight_of_bias: dict[int, int] = {
            i: w for i, F in enumerate(blocks) if len(F) == 1
            for w, W in enumerate(blocks) if len(W) == 2 and W[0] is F[0]}
        """Bias block -> the weight block whose ``G`` it holds."""
        self.bias_scale: dict[int, float] = {}
        """Bias block -> the factor from its weight's normalised ``G`` to its ``s G``."""

    @classmethod
    def accumulate(cls, la, prep: Prepared, streamed: dict[str, InputStats], batches: Sequence,
                   reduce: Reduce | None) -> KronFactors:
        r"""One curvlinops K-FAC operator over every batch of ``prep.loader``, summed in place.

        The loss is ``CrossEntropyLoss(reduction="sum")`` with ``num_data = N`` calibration
        samples, so :math:`G = \sum_n g_n g_n^\top` (correction 1 for ``"sum"``) and
        :math:`A = \frac{1}{N T} \sum_n \sum_t x_{n,t} x_{n,t}^\top` (``T`` = number of conv
        output positions, 1 for Linear): :math:`G \otimes A` is the K-FAC approximation of the
        GGN *summed* over the ``N`` samples. laplace-torch's own ``fit`` gives the same factors
        by building an operator and a ``Kron`` per batch and adding them into new tensors,
        with one more forward pass per batch for a loss.

        The layers of ``streamed`` (by name in the user's model) add the operator's batches'
        inputs to those statistics instead of to the operator's own ``A``; their finished
        ``A`` (:func:`~bayesq_lightning.input_stats.finish_input_hessians` over ``batches``,
        summed over processes with ``reduce``) replaces it.
        """
        from ..adapters.curvlinops import KFACOperator
        from ..adapters.laplace import kron_blocks, kron_fisher_type

        dicts = isinstance(prep.data[0], Mapping)
        names = {n: name for name, m in la.model.named_modules()
                 for n, st in streamed.items() if m is st.module}
        op = KFACOperator(
            la.model, la.backend.lossfunc, la.params, _WithLabels(prep.loader) if dicts else
            prep.loader, fisher_type=kron_fisher_type(la.backend), separate_weight_and_bias=True,
            check_deterministic=False, num_data=prep.n_calib,
            input_stats={names[n]: st for n, st in streamed.items()},
            **({"batch_size_fn": lambda x: x[prep.dict_key_x].shape[0]} if dicts else {}))
        op.compute_kronecker_factors()
        # not shared: normalise scales each A in place (the products were shared when summed)
        inputs = finish_input_hessians(streamed, batches, reduce, share=False)
        for n, A in inputs.items():
            op.set_input_factor(names[n], A)
        blocks = kron_blocks(la.backend, op)
        combined = [i for i, F in enumerate(blocks)
                    if len(F) == 2 and any(F[1] is A for A in inputs.values())]
        return cls(blocks, prep.n_calib, combined)

    def combine(self, reduce: Reduce | None) -> None:
        r"""Sum the factors and :attr:`n_samples` over processes (in place).

        Summing the factors as computed is wrong: each process's ``A_r`` is divided by its own
        ``N_r``. Each process multiplies ``A_r`` back by ``N_r`` (the unnormalised per-sample
        sum), sums ``G_r``, ``N_r A_r``, the scalar blocks and ``N_r`` across processes (each
        tensor once: a bias block holds its weight's ``G``, and an all-reduce sums in place),
        then divides the summed ``A`` by :math:`\sum_r N_r`: exactly the factors of a single
        fit over all samples. ``reduce`` is called in block order, ``G`` before ``A``.
        """
        if reduce is None:
            return
        n_local, device = self.n_samples, self.blocks[0][0].device
        own_inputs = [i for i, F in enumerate(self.blocks)
                      if len(F) == 2 and i not in self.combined_inputs]
        for i, F in enumerate(self.blocks):
            if i in self.weight_of_bias:
                continue  # its weight's G, summed there
            if i in own_inputs:
                F[1] = F[1] * n_local  # back to the unnormalised per-sample sum
            F[0] = reduce(F[0])
            if i in own_inputs:
                F[1] = reduce(F[1])
        for i, w in self.weight_of_bias.items():
            self.blocks[i][0] = self.blocks[w][0]
        self.n_samples = int(reduce(torch.tensor(float(n_local), device=device)).item())
        for i in own_inputs:
            self.blocks[i][1] = self.blocks[i][1] / self.n_samples

    def check_finite(self) -> None:
        """Raise where a factor holds NaN or inf (after :meth:`combine`, every process raises)."""
        if not all(torch.isfinite(f).all() for F in self.blocks for f in F):
            raise RuntimeError(
                "the K-FAC fit produced Kronecker factors with NaN or inf entries; the curvature "
                "is probably not finite. Check the model's outputs on the calibration data and "
                "normalise the inputs as in training.")

    def normalise(self, n_data: int) -> None:
        r"""Rescale to the ``n_data`` scale and normalise the split, in place.

        With :math:`s = n_\text{data} / N`, :math:`\Lambda = s\, G \otimes A + \delta I`. For
        each weight, :math:`c = \mathrm{mean}(\mathrm{diag}\,G)`, :math:`G \leftarrow G / c`,
        :math:`A \leftarrow c\,s\,A` (a layer with :math:`G = 0`, e.g. dead ReLUs, keeps
        :math:`G = 0`); a scalar block is multiplied by ``s``. A bias block holds its weight's
        ``G`` (normalised with it): its curvature :math:`s G` is that ``G`` times
        ``bias_scale`` (:math:`c s`, or :math:`s` where :math:`c = 0`), which :meth:`spectrum`
        applies to the one eigensolve both share.
        """
        scale = n_data / self.n_samples
        bias_of_weight = {w: i for i, w in self.weight_of_bias.items()}
        for i, F in enumerate(self.blocks):
            if len(F) == 2:
                c = F[0].diagonal().mean()
                if i in bias_of_weight:
                    self.bias_scale[bias_of_weight[i]] = float(c * scale if c > 0 else scale)
                if c > 0:
                    F[0].div_(c)
                F[1].mul_(c * scale if c > 0 else scale)
            elif i not in self.weight_of_bias:
                F[0] = F[0] * scale

    def spectrum(self) -> Spectrum:
        r"""The curvature's eigenvalues per block: pairs ``(l_G, l_A)`` for a weight (those of
        :math:`G \otimes A` are their products), one tensor for a bias or scalar block (a
        bias's from its weight's ``G``, one eigensolve for both), and for a grouped
        convolution's weight (``A`` per group) the products of each group's
        :func:`grouped_eigenvalues`. Called only where :math:`\delta` is read (deferred)."""
        g_eig: dict[int, Tensor] = {}

        def of_g(w: int) -> Tensor:
            if w not in g_eig:
                g_eig[w] = eigvalsh(self.blocks[w][0])
            return g_eig[w]

        eig = [[of_g(self.weight_of_bias[i]) * self.bias_scale[i]] if i in self.weight_of_bias
               else [grouped_eigenvalues(*F)] if len(F) == 2 and F[1].dim() == 3 else
               [of_g(i) if j == 0 and len(F) == 2 else eigvalsh(f) if f.dim() > 1 else f
                for j, f in enumerate(F)]
               for i, F in enumerate(self.blocks)]
        return [tuple(e) if len(e) == 2 else e[0] for e in eig]

    def layer_factors(self, i: int) -> tuple[Tensor, Tensor]:
        """``(G, A)`` of weight block ``i``; a scalar block's as ``G = 1``, ``A`` its value.

        A weight's are this object's tensors (rescaled in place, nobody else's): no copy.
        """
        F = self.blocks[i]
        if len(F) == 2:
            return F[0].detach(), F[1].detach()
        return torch.ones_like(F[0]).reshape(1, 1), F[0].detach().reshape(1, 1).clone()

    def to_laplace(self):
        """The blocks as laplace-torch's ``Kron`` (sharing the tensors)."""
        from laplace.utils import Kron

        return Kron(self.blocks)


def eigvalsh(f: Tensor) -> Tensor:
    """Eigenvalues of a symmetric factor; in float64 where fp32 LAPACK fails to converge.

    A low-rank output factor (many classes, few samples: many zero eigenvalues) can make MKL's
    fp32 ``syevd`` fail to converge, depending on the thread count: the float64 solve of the
    same matrix is the fallback.
    """
    try:
        e = torch.linalg.eigvalsh(f)
        if bool(torch.isfinite(e).all()):
            return e
    except torch.linalg.LinAlgError:
        pass
    return torch.linalg.eigvalsh(f.double()).to(f.dtype)


def grouped_eigenvalues(G: Tensor, A: Tensor) -> Tensor:
    r"""Eigenvalues of :math:`\bigoplus_g G_{gg} \otimes A_g` (``A``: ``(groups, cols,
    cols)``, :math:`G_{gg}` the groups' diagonal blocks of ``G``), flattened."""
    groups, per = A.shape[0], G.shape[0] // A.shape[0]
    blocks = G.view(groups, per, groups, per).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    return (eigvalsh(blocks).unsqueeze(-1) * eigvalsh(A).unsqueeze(-2)).reshape(-1)


class _WithLabels:
    """``(batch, batch["labels"])`` for each dict batch of a loader, re-iterable, one at a time."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __iter__(self):
        return ((b, b["labels"]) for b in self.loader)

    def __len__(self) -> int:
        return len(self.loader)
