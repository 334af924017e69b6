"""Hessian and GGN products against dense brute-force matrices (float64, relative error <= 1e-10)."""

from __future__ import annotations

import functools

import pytest
import torch

from diagnostics.curvature import GGNOperator, HessianOperator
from diagnostics.errors import ConfigError
from tests.cases import CASES, get_case
from tests.reference import dense_ggn, dense_gradient, dense_hessian

TOL = 1e-10
BACKENDS = ["fwd_rev", "rev_rev", "auto"]
# torch.func.linearize tracing costs seconds per batch: exercised on the smaller cases only.
LINEARIZE_CASES = ["mlp", "cnn_bn", "regression"]
OPERATORS = {"hessian": (HessianOperator, dense_hessian), "ggn": (GGNOperator, dense_ggn)}


@functools.cache
def reference(case: str, kind: str, names: tuple[str, ...]) -> torch.Tensor:
    c = get_case(case)
    return OPERATORS[kind][1](c.model, c.loss_fn, c.batches, names, c.mode)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def probes(P: int, K: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(P)
    return torch.randn(P, K, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", sorted(OPERATORS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_products_match_dense(case: str, kind: str, backend: str) -> None:
    c = get_case(case)
    op = OPERATORS[kind][0](c.model, c.loss_fn, c.batches, backend=backend)
    assert op.param_names == [n for n, _ in c.model.named_parameters()]
    dense = reference(case, kind, tuple(op.param_names))
    assert op.shape == dense.shape
    V = probes(op.num_params)
    assert rel(op @ V[:, 0], dense @ V[:, 0]) <= TOL
    assert rel(op @ V, dense @ V) <= TOL
    assert op.num_matvecs == 1 + V.shape[1]
    assert op.backend in ("fwd_rev", "rev_rev")
    assert op.reuses_linearisation == (op.backend == "rev_rev")  # plain fwd_rev recomputes per product


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", sorted(OPERATORS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_parameter_blocks_match_dense_blocks(case: str, kind: str, backend: str) -> None:
    c = get_case(case)
    for selection in c.blocks:
        op = OPERATORS[kind][0](c.model, c.loss_fn, c.batches, params=selection, backend=backend)
        full = OPERATORS[kind][0](c.model, c.loss_fn, c.batches, backend="rev_rev")
        idx = torch.cat([torch.arange(full.num_params)[full.param_slices[n]] for n in op.param_names])
        dense = reference(case, kind, tuple(full.param_names))[idx][:, idx]
        V = probes(op.num_params, 2)
        assert rel(op @ V, dense @ V) <= TOL, selection
        assert rel(op @ V[:, 1], dense @ V[:, 1]) <= TOL, selection


@pytest.mark.parametrize("kind", sorted(OPERATORS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_blocks_share_one_linearisation(case: str, kind: str) -> None:
    c = get_case(case)
    op = OPERATORS[kind][0](c.model, c.loss_fn, c.batches)
    dense = reference(case, kind, tuple(op.param_names))
    blocks = op.layer_blocks()
    V = probes(op.num_params, 2)
    expected = torch.zeros_like(V)
    for b in blocks.values():
        idx = b._index
        sub = dense[idx][:, idx]
        assert rel(b @ V[idx], sub @ V[idx]) <= TOL
        expected[idx] = sub @ V[idx]
    assert rel(op.block_diagonal_matvec(V), expected) <= TOL
    assert rel(op.block_diagonal_matvec(V[:, 0]), expected[:, 0]) <= TOL
    first = c.blocks[0]
    blk = op.block(first)
    idx = blk._index
    assert rel(blk @ V[idx], dense[idx][:, idx] @ V[idx]) <= TOL
    with pytest.raises(ConfigError, match="'nothing.*'"):
        op.block("nothing.*")


@pytest.mark.parametrize("kind", sorted(OPERATORS))
@pytest.mark.parametrize("case", LINEARIZE_CASES)
def test_linearized_forward_over_reverse(case: str, kind: str) -> None:
    c = get_case(case)
    op = OPERATORS[kind][0](c.model, c.loss_fn, c.batches, backend="fwd_rev", linearize=True)
    dense = reference(case, kind, tuple(op.param_names))
    V = probes(op.num_params)
    assert rel(op @ V[:, 0], dense @ V[:, 0]) <= TOL
    assert rel(op @ V, dense @ V) <= TOL
    assert op.reuses_linearisation and op.cache_bytes > 0
    blk = OPERATORS[kind][0](
        c.model, c.loss_fn, c.batches, params=c.blocks[0], backend="fwd_rev", linearize=True
    )
    idx = torch.cat([torch.arange(op.num_params)[op.param_slices[n]] for n in blk.param_names])
    W = probes(blk.num_params, 2)
    assert rel(blk @ W, dense[idx][:, idx] @ W) <= TOL


@pytest.mark.slow
def test_linearized_transformer() -> None:
    test_linearized_forward_over_reverse("transformer", "hessian")


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradient_and_loss_are_sample_weighted_means(case: str) -> None:
    c = get_case(case)
    names = [n for n, _ in c.model.named_parameters()]
    g, value = dense_gradient(c.model, c.loss_fn, c.batches, names, c.mode)
    for cls in (HessianOperator, GGNOperator):
        op = cls(c.model, c.loss_fn, c.batches)
        assert rel(op.gradient(), g) <= TOL
        assert op.loss() == pytest.approx(value, rel=1e-12)
        assert op.num_samples == sum(b[0].shape[0] for b in c.batches)


def test_uncached_products_equal_cached() -> None:
    c = get_case("transformer")
    cached = HessianOperator(c.model, c.loss_fn, c.batches, backend="rev_rev")
    uncached = HessianOperator(c.model, c.loss_fn, c.batches, backend="rev_rev", max_cache_bytes=0)
    auto = HessianOperator(c.model, c.loss_fn, c.batches, max_cache_bytes=0)
    V = probes(cached.num_params, 2)
    ref = cached @ V
    assert uncached.cache_bytes == 0 and not uncached.reuses_linearisation
    assert rel(uncached @ V, ref) <= TOL
    assert rel(auto @ V, ref) <= TOL
    assert auto.backend == "fwd_rev"  # nothing fits the budget: forward-over-reverse, recomputed
    assert cached.cache_bytes > 0


def test_single_batch_and_iterable_data_agree() -> None:
    c = get_case("mlp")
    x = torch.cat([b[0] for b in c.batches])
    y = torch.cat([b[1] for b in c.batches])
    one = HessianOperator(c.model, c.loss_fn, (x, y))
    two = HessianOperator(c.model, c.loss_fn, iter(c.batches))
    V = probes(one.num_params)
    assert len(two.batches) == 2 and len(one.batches) == 1
    assert rel(two @ V, one @ V) <= TOL


def test_flatten_unflatten_round_trip() -> None:
    c = get_case("cnn_bn")
    op = HessianOperator(c.model, c.loss_fn, c.batches, params=["conv.*", "fc.bias"])
    v = torch.arange(op.num_params, dtype=torch.float64)
    parts = op.unflatten(v)
    assert list(parts) == ["conv.weight", "conv.bias", "fc.bias"]
    assert parts["conv.weight"].shape == (2, 1, 3, 3)
    assert torch.equal(op.flatten(parts), v)


def test_mode_train_uses_batch_statistics() -> None:
    c = get_case("cnn_bn")
    ev = HessianOperator(c.model, c.loss_fn, c.batches)
    tr = HessianOperator(c.model, c.loss_fn, c.batches, mode="train")
    dense_train = dense_hessian(c.model, c.loss_fn, c.batches, tr.param_names, mode="train")
    V = probes(tr.num_params)
    assert rel(tr @ V, dense_train @ V) <= TOL
    assert rel(ev @ V, tr @ V) > 1e-3


def test_float32_products_in_model_dtype() -> None:
    c = get_case("mlp")
    model = c.model.float()
    batches = [(x.float(), y) for x, y in c.batches]
    op = HessianOperator(model, c.loss_fn, batches)
    dense = reference("mlp", "hessian", tuple(op.param_names))
    v = probes(op.num_params)[:, 0]
    out = op @ v
    assert out.dtype == torch.float32 and op.dtype == torch.float32
    assert rel(out.double(), dense @ v) <= 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_products(backend: str) -> None:
    c = get_case("transformer")
    model = c.model.cuda()
    op = HessianOperator(
        model, c.loss_fn, c.batches, backend=backend
    )  # batches on CPU: moved by the operator
    ggn = GGNOperator(model, c.loss_fn, c.batches, backend=backend)
    V = probes(op.num_params)
    for o, kind in ((op, "hessian"), (ggn, "ggn")):
        out = o @ V
        assert out.device.type == "cuda" and o.device.type == "cuda"
        assert rel(out.cpu(), reference("transformer", kind, tuple(o.param_names)) @ V) <= TOL
