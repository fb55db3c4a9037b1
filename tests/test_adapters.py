"""Every private name of another package that the adapters touch still exists, as written.

Each test names the private name, the version the adapter was written against and the
installed one, so that an upgrade that moves one fails here rather than silently changing the
posterior (an override that is never called, a hook that adds its inputs twice).
"""

from __future__ import annotations

import argparse
import inspect
import platform
import sys
from importlib.metadata import version

import pytest
import torch
from torch import nn

from bayesq_lightning.posterior.fit import import_laplace

import_laplace()

from bayesq_lightning.adapters import argparse as argparse_adapter  # noqa: E402
from bayesq_lightning.adapters import asdl as asdl_adapter  # noqa: E402
from bayesq_lightning.adapters import curvlinops as curvlinops_adapter  # noqa: E402
from bayesq_lightning.adapters import laplace as laplace_adapter  # noqa: E402
from bayesq_lightning.adapters import torch as torch_adapter  # noqa: E402


def _versions(adapter) -> tuple[str, str]:
    """(installed, written against): a standard-library module's are Python's."""
    if adapter.PACKAGE in sys.stdlib_module_names:
        return f"(Python {platform.python_version()})", f"(Python {adapter.VERSION})"
    return version(adapter.PACKAGE), adapter.VERSION


def _require(ok: bool, adapter, name: str, what: str) -> None:
    if not ok:
        installed, written = _versions(adapter)
        pytest.fail(
            f"{adapter.PACKAGE} {installed} changed the private API "
            f"{name!r}: {what}. {adapter.__name__} was written against {adapter.PACKAGE} "
            f"{written}; adapt it (and this check) to the installed version.",
            pytrace=False)


def _method(adapter, cls: type, name: str, params: tuple[str, ...]) -> None:
    fn = getattr(cls, name, None)
    _require(callable(fn), adapter, f"{cls.__name__}.{name}", "the method is gone")
    got = tuple(inspect.signature(fn).parameters)
    _require(got == params, adapter, f"{cls.__name__}.{name}",
             f"its parameters are {got}, not {params}")


def test_curvlinops_private_api():
    from curvlinops import KFACLinearOperator

    adapter = curvlinops_adapter
    for name, params in (*adapter.OVERRIDDEN, *adapter.CALLED):
        _method(adapter, KFACLinearOperator, name, params)
    source = inspect.getsource(KFACLinearOperator.compute_kronecker_factors)
    for name, _ in adapter.OVERRIDDEN:  # an override nobody calls changes nothing, silently
        _require(f"self.{name}" in source, adapter, name,
                 "compute_kronecker_factors no longer calls it")
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2, bias=False))
    data = [(torch.randn(5, 3), torch.randint(0, 2, (5,)))]
    op = adapter.KFACOperator(model, nn.CrossEntropyLoss(reduction="sum"),
                              list(model.parameters()), data, check_deterministic=False)
    for name in adapter.ATTRIBUTES:
        _require(hasattr(op, name), adapter, name, "the operator has no such attribute")
    _require(set(op._mapping) == {"0", "1"} and op._mapping["0"].keys() == {"weight", "bias"},
             adapter, "_mapping", "not {module name: {'weight': index, 'bias': index}}")
    op.compute_kronecker_factors()
    _require(set(op._input_covariances) == set(op.output_factors()) == {"0", "1"}, adapter,
             "_input_covariances", "not the input factors by module name")


def test_laplace_torch_private_api():
    from laplace import Laplace
    from laplace.baselaplace import KronLaplace, ParametricLaplace
    from laplace.curvature import CurvlinopsGGN
    from laplace.curvature.curvlinops import CurvlinopsInterface

    adapter = laplace_adapter
    classes = {"KronLaplace": KronLaplace, "CurvlinopsInterface": CurvlinopsInterface,
               "CurvlinopsGGN": CurvlinopsGGN}
    for cls, name, params in (*adapter.OVERRIDDEN, *adapter.CALLED):
        _method(adapter, classes[cls], name, params)
    for cls, name in adapter.ATTRIBUTES:
        _require(hasattr(classes[cls], name), adapter, f"{cls}.{name}", "the attribute is gone")
    _require("self._init_H()" in inspect.getsource(ParametricLaplace.__init__), adapter,
             "_init_H", "ParametricLaplace.__init__ no longer calls it")
    _require("_key" in inspect.getsource(Laplace), adapter, "_key",
             "the Laplace factory no longer picks its class by it")
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2, bias=False))
    la = adapter.KronLaplaceWithoutFactors(model, "classification")
    op = curvlinops_adapter.KFACOperator(
        model, la.backend.lossfunc, la.params, [(torch.randn(5, 3), torch.randint(0, 2, (5,)))],
        fisher_type=adapter.kron_fisher_type(la.backend), check_deterministic=False)
    op.compute_kronecker_factors()
    blocks = adapter.kron_blocks(la.backend, op)
    _require([len(F) for F in blocks] == [2, 1, 2] and blocks[1][0] is blocks[0][0], adapter,
             "_get_kron_factors", "not the blocks [G, A], [G] (the same G), [G, A] of a "
             "Linear with bias and one without")


def test_torch_private_api():
    adapter = torch_adapter
    for padding, mode in (("same", "zeros"), (1, "reflect"), (2, "circular")):
        conv = nn.Conv2d(2, 3, 3, padding=padding, padding_mode=mode)
        for cls, name in adapter.ATTRIBUTES:
            _require(hasattr(conv, name), adapter, f"{cls}.{name}", "the attribute is gone")
        x = torch.randn(1, 2, 5, 5)
        padded = nn.functional.pad(x, adapter.conv_input_padding(conv),
                                   mode="constant" if mode == "zeros" else mode)
        _require(torch.allclose(nn.functional.conv2d(padded, conv.weight, conv.bias), conv(x),
                                atol=1e-6), adapter, "Conv2d._reversed_padding_repeated_twice",
                 "no longer the F.pad padding of the convolution's input")


def test_argparse_private_api():
    adapter = argparse_adapter
    parser = argparse.ArgumentParser(description="what it does")
    group = parser.add_argument_group("budget", "how many bits")
    action = group.add_argument("--bits", help="bits per weight")
    for cls, name in adapter.ATTRIBUTES:
        _require(hasattr(parser, name), adapter, f"{cls}.{name}", "the attribute is gone")
    _require(action in adapter.actions(parser), adapter, "ArgumentParser._actions",
             "it no longer holds every action")
    _require(group in adapter.help_sections(parser), adapter, "ArgumentParser._action_groups",
             "it no longer holds the argument groups")
    _require({"-h", "--help", "--bits"} <= set(adapter.option_strings(parser)), adapter,
             "ArgumentParser._option_string_actions", "its keys are no longer the option strings")
    action.help, group.title, group.description = "rewritten", "renamed", "described anew"
    text = parser.format_help()
    _require(all(s in text for s in ("rewritten", "renamed:", "described anew")), adapter,
             "ArgumentParser._action_groups",
             "the help no longer prints the actions' and groups' texts as they are now")


def test_the_operator_keeps_its_input_statistics_per_instance():
    from bayesq_lightning.input_stats import InputStats

    model = nn.Sequential(nn.Linear(3, 2))
    data = [(torch.randn(5, 3), torch.randint(0, 2, (5,)))]
    make = lambda stats: curvlinops_adapter.KFACOperator(  # noqa: E731
        model, nn.CrossEntropyLoss(reduction="sum"), list(model.parameters()), data,
        check_deterministic=False, input_stats=stats)
    stats = InputStats(model[0])
    streamed, plain = make({"0": stats}), make(None)
    assert "input_stats" not in vars(curvlinops_adapter.KFACOperator)
    assert streamed.input_stats == {"0": stats} and plain.input_stats == {}
    plain.compute_kronecker_factors()
    assert stats.n == 0  # the other operator's inputs went to its own factor
    streamed.compute_kronecker_factors()
    assert stats.n == 5 and "0" not in streamed._input_covariances


def test_asdl_private_api():
    from asdl.operations import operation
    from asdl.operations.conv import Conv2d as AsdlConv2d

    adapter = asdl_adapter
    for name, params in adapter.REPLACED:
        _require(isinstance(inspect.getattr_static(AsdlConv2d, name, None), staticmethod),
                 adapter, f"Conv2d.{name}", "no longer a static method")
        _method(adapter, AsdlConv2d, name, params)
        _require(f"self.{name}(" in inspect.getsource(operation.Operation), adapter, name,
                 "Operation no longer calls it")
    originals = {name: getattr(AsdlConv2d, name) for name, _ in adapter.REPLACED}
    conv = nn.Conv2d(4, 6, 3, groups=2, dilation=2, padding="same", padding_mode="reflect")
    x, dy = torch.randn(3, 4, 6, 6), torch.randn(3, 6, 36)
    with adapter.exact_grouped_convs():
        patches = AsdlConv2d.preprocess_in_data(conv, x, None)
        diag = AsdlConv2d.cov_diag_weight(conv, patches, dy)
    grads = torch.stack([torch.autograd.grad((conv(x[i:i + 1]).flatten(2) * dy[i]).sum(),
                                             conv.weight)[0] for i in range(3)])
    torch.testing.assert_close(diag, grads.square().sum(0))
    _require(all(getattr(AsdlConv2d, n) is f for n, f in originals.items()), adapter,
             "Conv2d", "exact_grouped_convs did not put ASDL's own methods back")
