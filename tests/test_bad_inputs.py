"""Bad inputs to the public API, as one table: ``CASES``.

Every row calls ``quantize_model`` (through ``BayesQConfig``), ``save_quantized`` or
``load_quantized`` with one bad (or borderline) input and states the outcome:

* an error: ``error`` is the exception type and ``match`` a regex that must name both the
  problem and the fix (``"infeasible.*raise ..."``); or
* a success: ``check(result, setup)`` states what the result must be.

Whatever the outcome, :func:`test_bad_input` then checks that the model handed in is exactly as
it was (``conftest.snapshot`` / ``assert_unchanged``: every state-dict tensor bit for bit, NaN
included, plus modes, types and ``requires_grad``) and that every file already under the
case's directory (an existing artifact) is byte-identical. The one exception is a successful
``load_quantized``, which fills the skeleton by design (``mutates=True``).

Models are a 32-32-4 MLP with a LayerNorm and 64 random samples in 4 batches (the shared and
tied weight rows use ``test_tied``'s models); the posterior
structure is the default (kron) only where it matters, ``diag``/``rtn``/``gptq`` elsewhere,
and the prior precision is fixed (no marginal-likelihood fit) unless that is under test.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_unchanged, snapshot
from safetensors import safe_open
from safetensors.torch import save_file
from test_tied import Aliased, Shared, TiedEmbedding
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayesq_lightning import BayesQConfig, load_quantized, quantize_model, save_quantized
from bayesq_lightning.allocate import InfeasibleBudgetError
from bayesq_lightning.artifact import ArtifactError, QuantizedLinear

# --------------------------------------------------------------------------- models and data


class MLP(nn.Module):
    """``fc1 -> LayerNorm -> ReLU -> fc2``: two quantizable layers and one that is not."""

    def __init__(self, d: int = 32, h: int = 32, c: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(d, h)
        self.norm = nn.LayerNorm(h)
        self.fc2 = nn.Linear(h, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


class Mixed(nn.Module):
    """Unsupported layer types (Conv1d, Embedding, LayerNorm) in the path next to two Linears."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(16)
        self.conv1d = nn.Conv1d(1, 2, 3, padding=1)
        self.emb = nn.Embedding(3, 32)
        self.fc1 = nn.Linear(32, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1d(self.norm(x[:, :16]).unsqueeze(1)).flatten(1)  # (B, 2 * 16)
        h = h + self.emb(torch.zeros(len(x), dtype=torch.long, device=x.device))
        return self.fc2(torch.relu(self.fc1(h)))


class FanOut(nn.Module):
    """``q`` and ``k`` read one tensor (their ``X^T X`` is formed once and shared)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.q, self.k, self.head = (nn.Linear(32, 16), nn.Linear(16, 16),
                                               nn.Linear(16, 16), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.head((self.q(h) * self.k(h)).mean(1))


# the shared input has another sequence length and dtype in each batch
FAN_OUT_BATCHES = [(torch.randn(8, t, 32, generator=_g0).to(dtype), torch.randint(0, 4, (8,)))
                   for _g0 in [torch.Generator().manual_seed(3)]
                   for t, dtype in ((5, torch.float32), (9, torch.float64), (3, torch.bfloat16))]


def mlp(**kwargs) -> MLP:
    return MLP(**kwargs).eval()


def with_weight(layer: str, value: float) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        model = mlp()
        with torch.no_grad():
            model.get_submodule(layer).weight[1, 2] = value
        return model

    return make


_g = torch.Generator().manual_seed(0)
X = torch.randn(64, 32, generator=_g)
Y = torch.randint(0, 4, (64,), generator=_g)


def batches(x: torch.Tensor = X, y: torch.Tensor = Y, bs: int = 16) -> list:
    return [(x[i : i + bs], y[i : i + bs]) for i in range(0, len(x), bs)]


def poisoned(row: int, value: float) -> list:
    x = X.clone()
    x[row, 3] = value
    return batches(x)


BATCHES = batches()
OTHER_SHAPE = [BATCHES[0], (X[16:32, :24], Y[16:32])]  # batch 1 has 24 features, not 32


# --------------------------------------------------------------------------- the table


@dataclass
class Setup:
    model: nn.Module  # must be unchanged afterwards (unless the case ``mutates`` it)
    call: Callable[[], Any]
    ctx: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[Path], Setup]
    error: type[BaseException] | tuple[type[BaseException], ...] | None = None
    match: str | None = None
    check: Callable[[Any, Setup], None] | None = None
    mutates: bool = False


def quantize(loader: Any = BATCHES, model: Callable[[], nn.Module] = mlp, **cfg) -> Callable:
    """``quantize_model(model(), loader, BayesQConfig(**cfg))``; the config is built in the call."""

    def make(tmp_path: Path) -> Setup:
        net = model()
        return Setup(net, lambda: quantize_model(net, loader, BayesQConfig(**cfg),
                                                 progress=False))

    return make


def _saved(tmp_path: Path):
    src = mlp()
    result = quantize_model(src, None, BayesQConfig(method="rtn", bits=4.0), progress=False)
    save_quantized(result.model, result, tmp_path)
    return result


def load(corrupt: Callable[[Path], None] | None = None,
         skeleton: Callable[[], nn.Module] = lambda: mlp(seed=1)) -> Callable:
    """An artifact of ``mlp()`` in ``tmp_path``, ``corrupt``-ed, loaded into ``skeleton()``."""

    def make(tmp_path: Path) -> Setup:
        result = _saved(tmp_path)
        if corrupt is not None:
            corrupt(tmp_path)
        skel = skeleton()
        return Setup(skel, lambda: load_quantized(skel, tmp_path), {"result": result})

    return make


def save_into_existing(model: Callable[[], nn.Module], overwrite: bool = True) -> Callable:
    """``save_quantized(model(), result of mlp(), tmp_path, overwrite)`` over an existing
    artifact."""

    def make(tmp_path: Path) -> Setup:
        result = _saved(tmp_path)
        net = model()
        return Setup(net, lambda: save_quantized(net, result, tmp_path, overwrite=overwrite))

    return make


def truncate(d: Path) -> None:
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])


def flip_last_byte(d: Path) -> None:  # the end of the tensor data, past the header
    p = d / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))


def edit_manifest(edit: Callable[[str], str]) -> Callable[[Path], None]:
    """Rewrite the manifest wherever the loader may read it: ``bayesq.json`` and, where the
    artifact carries one, the copy in the safetensors header (metadata key ``"bayesq"``)."""

    def corrupt(d: Path) -> None:
        manifest = d / "bayesq.json"
        manifest.write_text(edit(manifest.read_text()))
        path = str(d / "model.safetensors")
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if "bayesq" in meta:
            save_file(tensors, path, metadata={**meta, "bayesq": edit(meta["bayesq"])})

    return corrupt


def _future(text: str) -> str:
    return json.dumps({**json.loads(text), "schema_version": 999})


def other_width() -> MLP:
    return mlp(h=24, seed=1)


def fc2_replaced() -> nn.Module:
    model = mlp(seed=1)
    model.fc2 = nn.Identity()
    return model


def fc2_deleted() -> nn.Module:
    model = mlp(seed=1)
    del model.fc2
    return model


# success checks ---------------------------------------------------------------------------


def _finite_logits(result, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = result.model.eval()(x)
    assert out.shape == (len(x), 4) and torch.isfinite(out).all()
    return out


def single_example_ok(result, setup: Setup) -> None:
    assert result.info["n_calib"] == 1 and result.info["n_data"] == 1
    assert result.bits_per_weight <= 4.0
    assert [x.name for x in result.layers] == ["fc1", "fc2"]
    _finite_logits(result, X[:4])


def unsupported_left_alone(result, setup: Setup) -> None:
    assert [x.name for x in result.layers] == ["fc1", "fc2"]
    assert set(result.skipped) == {"conv1d", "emb"}  # listed; norms have nothing to quantize
    assert "Conv1d is not quantized" in result.skipped["conv1d"]
    assert result.info["skipped"] == result.skipped and "float  emb" in result.table()
    assert isinstance(result.model.fc1, QuantizedLinear)
    assert isinstance(result.model.fc2, QuantizedLinear)
    for name, cls in (("norm", nn.LayerNorm), ("conv1d", nn.Conv1d), ("emb", nn.Embedding)):
        new, old = result.model.get_submodule(name), setup.model.get_submodule(name)
        assert type(new) is cls and new is not old
        for (k, a), (_, b) in zip(new.state_dict().items(), old.state_dict().items(),
                                  strict=True):
            assert torch.equal(a, b), f"{name}.{k}"
    _finite_logits(result, X[:4])


def keeps_dtype(dtype: torch.dtype) -> Callable[[Any, Setup], None]:
    def check(result, setup: Setup) -> None:
        assert result.bits_per_weight <= 4.0
        m = result.model
        assert isinstance(m.fc1, QuantizedLinear) and isinstance(m.fc2, QuantizedLinear)
        assert m.norm.weight.dtype == m.norm.bias.dtype == dtype
        assert m.fc1.bias.dtype == m.fc2.bias.dtype == dtype
        out = _finite_logits(result, X[:8].to(dtype))
        assert out.dtype == dtype
        assert all(p.dtype == dtype for p in setup.model.parameters())  # the original too

    return check


def shared_once(tied: dict[str, str]) -> Callable[[Any, Setup], None]:
    def check(result, setup: Setup) -> None:
        assert result.tied == tied and [x.name for x in result.layers] == ["a", "h"]
        assert result.n_weights == 32 * 32 + 4 * 32  # the shared matrix counted once
        assert result.model.b.block0_codes is result.model.a.block0_codes  # and stored once
        _finite_logits(result, X[:4])

    return check


def tied_embedding_float(result, setup: Setup) -> None:
    assert [x.name for x in result.layers] == ["mid"]
    assert "tied to 'emb' (Embedding)" in result.skipped["out"]
    assert result.model.out.weight is result.model.emb.weight


def loads_intact(loaded, setup: Setup) -> None:
    assert loaded is setup.model and isinstance(loaded.fc1, QuantizedLinear)
    with torch.no_grad():
        assert torch.equal(loaded(X[:8]), setup.ctx["result"].model(X[:8]))


# the rows ---------------------------------------------------------------------------------

FIT = r"do not fit the model \(batch {}: .*\); pass batches of the model's input form"

CASES = [
    # --- budgets
    Case("bits-below-cheapest", quantize(bits=2.5, structure="diag", prior_precision=1.0), InfeasibleBudgetError,
         r"budget 2\.5 bits/weight is infeasible: the cheapest allocation needs 3\.0+ "
         r"bits/weight.*raise `bits` to at least 3\.0+"),
    *[Case(f"bits={v}", quantize(bits=v), ValueError,
           rf"bits={v}: the budget must be a positive finite number.*e\.g\. bits=3\.0")
      for v in (0, -1, float("nan"), float("inf"))],
    Case("budget_bytes-below-cheapest", quantize(None, method="rtn", budget_bytes=100),
         InfeasibleBudgetError,
         r"budget_bytes=100 is infeasible.*raise budget_bytes to at least \d+"),
    Case("allowed_bits-empty", quantize(allowed_bits=()), ValueError,
         r"allowed_bits is empty; choose a subset of \(2, 3, 4, 8\)"),
    Case("pins-min-above-max", quantize(None, method="rtn", min_bits={"fc1": 8},
                                        max_bits={"fc1": 2}), ValueError,
         r"layer 'fc1'.*no width within its pins \[8, 2\].*relax min_bits/max_bits"),
    Case("pin-pattern-matches-no-layer", quantize(None, method="rtn", min_bits={"decoder.*": 8}),
         ValueError,
         r"min_bits pattern 'decoder\.\*' matches no quantized layer.*"
         r"correct the pattern .* or drop it"),
    Case("group_size-with-nonuniform", quantize(quantizer="nonuniform", group_size=16),
         ValueError, r"group_size=16 applies to uniform grids.*drop group_size"),
    # --- non-finite weights, inputs, curvature
    Case("nan-weight", quantize(model=with_weight("fc1", float("nan"))), ValueError,
         r"layer 'fc1' has 1 NaN/inf weight.*fix training.*exclude the layer"),
    Case("inf-weight", quantize(model=with_weight("fc2", float("inf")), method="gptq"),
         ValueError, r"layer 'fc2' has 1 NaN/inf weight.*fix training.*exclude the layer"),
    Case("nan-input", quantize(poisoned(20, float("nan"))), ValueError,
         r"batch 1 of the calibration loader has NaN or inf in its inputs.*drop or clean"),
    Case("inf-input", quantize(poisoned(40, float("-inf")), method="gptq"), ValueError,
         r"batch 2 of the calibration loader has NaN or inf in its inputs.*drop or clean"),
    # inputs of 1e30 are finite in fp32, but the curvature built from them overflows
    Case("curvature-overflow-kron", quantize(batches(X * 1e30)), RuntimeError,
         r"K-FAC fit.*curvature is probably not finite\. Check the model's outputs on the "
         r"calibration data and normalise the inputs as in training"),
    Case("curvature-overflow-diag", quantize(batches(X * 1e30), structure="diag",
                                                  prior_precision=1.0), ValueError,
         r"fitted curvature of layers \[.*\] is not finite.*largest \|x\| = 4\.1e\+30.*"
         r"normalise the calibration inputs as in training"),
    Case("hessian-overflow-gptq", quantize(batches(X * 1e30), method="gptq"), ValueError,
         r"input statistics \(X X\^T\) of layers \['fc1', 'fc2'\] are not finite.*"
         r"normalise the calibration inputs as in training"),
    # --- calibration loaders
    Case("empty-loader", quantize(DataLoader(TensorDataset(X[:0], Y[:0]), batch_size=4)),
         ValueError, r"calibration loader yielded no samples; pass a DataLoader with at least "
                     r"one non-empty batch"),
    Case("labels-only-loader", quantize([Y[:16], Y[16:32]], structure="diag"), ValueError,
         FIT.format(0)),
    Case("labels-only-loader-gptq", quantize([Y[:16], Y[16:32]], method="gptq"), ValueError,
         FIT.format(0)),
    Case("string-batches", quantize(["abc", "def"]), ValueError, FIT.format(0)),
    Case("string-batches-gptq", quantize(["abc", "def"], method="gptq"), ValueError,
         FIT.format(0)),
    Case("dict-unknown-keys", quantize([{"foo": X[:16], "bar": Y[:16]}], structure="diag"),
         ValueError, FIT.format(0)),
    Case("dict-unknown-keys-gptq", quantize([{"foo": X[:16], "bar": Y[:16]}], method="gptq"),
         ValueError, FIT.format(0)),
    Case("single-example", quantize([(X[:1], Y[:1])], bits=4.0), check=single_example_ok),
    Case("batches-of-two-shapes", quantize(OTHER_SHAPE, structure="diag"), ValueError,
         FIT.format(1)),
    Case("shared-input-of-three-shapes-and-dtypes", quantize(FAN_OUT_BATCHES, FanOut,
                                                          method="gptq", bits=4.0),
         check=lambda r, s: _fan_out_quantized(r)),
    Case("batches-of-two-shapes-gptq", quantize(OTHER_SHAPE, method="gptq"), ValueError,
         FIT.format(1)),
    # --- models
    Case("no-quantizable-layer", quantize(None, model=lambda: nn.Sequential(nn.LayerNorm(32)),
                                          method="rtn"), ValueError,
         r"no quantizable layer.*\['LayerNorm'\].*Check the patterns or quantize a model built"),
    Case("every-layer-excluded", quantize(exclude=["*"]), ValueError,
         r"no quantizable layer.*exclude=\['\*'\].*Check the patterns"),
    Case("model-is-a-bare-linear", quantize(None, model=lambda: nn.Linear(32, 4), method="rtn"),
         ValueError, r"model itself is a Linear/Conv2d layer.*wrap it in a parent module"),
    Case("unsupported-layers-beside-linear", quantize(model=lambda: Mixed().eval(), bits=4.0,
                                                             prior_precision=1.0),
         check=unsupported_left_alone),
    *[Case(f"{str(dt).removeprefix('torch.')}-model",
           quantize(batches(X.to(dt)), model=lambda dt=dt: mlp().to(dt), bits=4.0,
                    prior_precision=1.0),
           check=keeps_dtype(dt)) for dt in (torch.float16, torch.bfloat16)],
    # --- shared and tied weights (more in test_tied.py): quantized, stored, counted once
    Case("one-module-used-twice", quantize(model=Aliased, bits=4.0, prior_precision=1.0),
         check=shared_once(tied={})),
    Case("two-layers-one-weight", quantize(model=Shared, bits=4.0, prior_precision=1.0),
         check=shared_once(tied={"b": "a"})),
    Case("two-layers-one-weight-gptq", quantize(model=Shared, bits=4.0, method="gptq"),
         check=shared_once(tied={"b": "a"})),
    Case("output-tied-to-input-embedding", quantize(model=TiedEmbedding, bits=4.0),
         check=tied_embedding_float),
    # --- artifacts
    Case("artifact-intact", load(), check=loads_intact, mutates=True),
    Case("artifact-truncated", load(truncate), ArtifactError,
         r"model\.safetensors.*corrupt or was interrupted; re-export"),
    Case("artifact-flipped-byte", load(flip_last_byte), ArtifactError,
         r"model\.safetensors.*corrupt or was interrupted; re-export"),
    Case("manifest-invalid-json", load(edit_manifest(lambda _: "{not json")), ArtifactError,
         r"not valid JSON.*re-export"),
    Case("manifest-from-the-future", load(edit_manifest(_future)), ArtifactError,
         r"schema version 999.*re-export with this version or load with the version that "
         r"wrote it"),
    Case("tensors-file-missing", load(lambda d: (d / "model.safetensors").unlink()),
         FileNotFoundError, r"no tensor file .*model\.safetensors.*re-export the model"),
    Case("artifact-directory-empty", load(lambda d: [p.unlink() for p in d.iterdir()]),
         FileNotFoundError, r"no (manifest|artifact) .*export it with save_quantized"),
    Case("skeleton-of-another-width", load(skeleton=other_width), ArtifactError,
         r"layer 'fc1' has weight shape \(32, 32\) .* but \(24, 32\) in the skeleton; build the "
         r"skeleton with the configuration of the saved model"),
    Case("save-onto-an-artifact-without-overwrite", save_into_existing(lambda: mlp(seed=1), overwrite=False),
         FileExistsError, r"already holds an artifact .*; pass overwrite=True to replace it"),
    Case("save-result-onto-another-width", save_into_existing(other_width), ValueError,
         r"layer 'fc1'.*\(32, 32\).*\(24, 32\).*pass the QuantizationResult that produced"),
    Case("save-result-onto-model-with-another-layer-type", save_into_existing(fc2_replaced),
         (ValueError, TypeError),
         r"'fc2'.*Identity.*pass the QuantizationResult that produced"),
    Case("save-result-onto-model-lacking-a-layer", save_into_existing(fc2_deleted),
         (ValueError, KeyError),
         r"'fc2'.*not a submodule.*pass the QuantizationResult that produced"),
]


def _fan_out_quantized(result: Any) -> None:
    from bayesq_lightning.input_stats import layer_input_hessians

    assert {x.name for x in result.layers} == {"inp", "q", "k", "head"}
    H = layer_input_hessians(FanOut().eval(), FAN_OUT_BATCHES, ["q", "k"])
    assert H["q"] is H["k"] and torch.isfinite(H["q"]).all()


def _param(case: Case):
    return pytest.param(case, id=case.name)


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_case_names_are_unique():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    assert all((c.error is None) == (c.match is None) != (c.check is None) for c in CASES)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input(case: Case, tmp_path: Path) -> None:
    setup = case.make(tmp_path)
    before = snapshot(setup.model)
    files = _files(tmp_path)
    if case.error is not None:
        with pytest.raises(case.error, match=case.match):
            setup.call()
    else:
        case.check(setup.call(), setup)
    if not case.mutates:
        assert_unchanged(setup.model, before)
    assert _files(tmp_path) == files, "files of an existing artifact changed"


def test_save_with_overwrite_replaces_an_artifact_only(tmp_path: Path) -> None:
    """``overwrite=True`` replaces an artifact (the refusal without it is a row of the table),
    and still refuses a directory holding files that are not an artifact's."""
    _saved(tmp_path)
    other = quantize_model(mlp(seed=1), None, BayesQConfig(method="rtn", bits=3.0),
                           progress=False)
    save_quantized(other.model, other, tmp_path, overwrite=True)
    loaded = load_quantized(mlp(seed=2), tmp_path)
    assert torch.equal(loaded(X), other.model(X))
    (tmp_path / "notes.txt").write_text("mine")
    files = _files(tmp_path)
    with pytest.raises(FileExistsError, match=r"not a bayesq artifact \(notes\.txt\)"):
        save_quantized(other.model, other, tmp_path, overwrite=True)
    assert _files(tmp_path) == files


def test_lowrank_on_an_op_without_forward_mode_derivative():
    """HuggingFace's default SDPA attention has no forward-mode rule on the CPU: the lowrank
    fit says so and names the fixes (the model is left as it was)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                  intermediate_size=64, num_labels=2, vocab_size=64)
    model = transformers.BertForSequenceClassification(cfg).eval()
    if model.config._attn_implementation != "sdpa":
        pytest.skip("this transformers does not default to SDPA attention")
    ids = torch.randint(1, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    batch = [{"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "labels": torch.tensor([0, 1, 0, 1])}]
    before = snapshot(model)
    with pytest.raises(ValueError, match="forward-mode derivatives.*structure='kron'.*"
                                         "attn_implementation='eager'"):
        quantize_model(model, batch, BayesQConfig(bits=5.0, structure="lowrank"),
                       progress=False)
    assert_unchanged(model, before)
