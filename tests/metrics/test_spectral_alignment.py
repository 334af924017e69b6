import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from diagnostics.errors import ConfigError
from diagnostics.metrics.alignment_probe import (
    Projector,
    RowSampler,
    cosine_matrices,
    project_all,
    top_vectors,
)
from diagnostics.metrics.alignment_stats import alignment_cosines, alignment_statistics
from diagnostics.metrics.context import StepContext
from diagnostics.metrics.explosion import ExplosionDetector
from diagnostics.metrics.registry import get_diagnostic, preset_names
from diagnostics.metrics.spectral_alignment import (
    LinearMap,
    SpectralAlignment,
    _in_map_order,
    batched_alignment_statistics,
    find_linear_maps,
    project_rows,
)
from diagnostics.store.records import expand_records
from diagnostics.zoo.models import TinyGPT


def _lm_loss(model, batch):
    x, y = batch
    out = model(x)
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _sum_loss(model, batch):
    return model(batch[0]).sum()


def _ctx(model, batch, step, loss_fn=_sum_loss):
    return StepContext(step=step, model=model, loss_fn=loss_fn, batch=batch, loss=None)


def _stats(out):
    # {metric: {key: value}} for index-0 records, plus vectors per key.
    d: dict = {}
    for r in expand_records(out.records):
        d.setdefault(r.metric, {}).setdefault(r.key, {})[r.index] = r.value
    return d


def _tiny_gpt():
    torch.manual_seed(0)
    return TinyGPT(d_model=16, n_heads=2, n_layers=1, block_size=8, seed=3).double()


def test_registered_in_standard_preset():
    assert "spectral_alignment" in preset_names("standard")
    assert isinstance(get_diagnostic("spectral_alignment", max_tokens=64), SpectralAlignment)


def test_statistics_match_direct_svd_on_a_real_model():
    model = _tiny_gpt()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 96, (3, 8), generator=g)
    batch = (x, torch.randint(0, 96, (3, 8), generator=g))
    # Reference inputs of every Linear, captured by our own hooks on the same eval forward.
    inputs = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda m, a, n=n: inputs.__setitem__(n, a[0].detach().reshape(-1, a[0].shape[-1]))
        )
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    with torch.no_grad():
        model.eval()
        _lm_loss(model, batch)
        model.train()
    for h in hooks:
        h.remove()
    d = SpectralAlignment(max_tokens=256, init_iters=2000, init_tol=1e-14)
    out = d.compute(_ctx(model, batch, 0, _lm_loss))
    got = _stats(out)
    assert set(got["sa_sign_diversity"]) == set(inputs) and len(inputs) == 7
    for name, xin in inputs.items():
        w = dict(model.named_modules())[name].weight.detach()
        _, s, vh = torch.linalg.svd(w, full_matrices=False)
        v1 = vh[0]
        if torch.dot(v1, d.state["v1"][name].double()) < 0:  # the diagnostic's sign convention
            v1 = -v1
        ref = alignment_statistics(alignment_cosines(xin, v1))
        assert got["sa_sigma1"][name][0] == pytest.approx(float(s[0]), rel=1e-9), name
        for metric, field in [
            ("sa_positive_fraction", "positive_fraction"),
            ("sa_sign_diversity", "sign_diversity"),
            ("sa_mean", "mean"),
            ("sa_mean_abs", "mean_abs"),
        ]:
            # v1 from power iteration agrees with the SVD's to ~1e-7 (its stopping rule is on 1 - |cos|).
            assert got[metric][name][0] == pytest.approx(ref[field], abs=1e-6), (name, metric)
        assert [got["sa_quantile"][name][i] for i in range(5)] == pytest.approx(ref["quantiles"], abs=1e-6)
        assert [got["sa_histogram"][name][i] for i in range(20)] == pytest.approx(ref["histogram"], abs=1e-12)


def test_batched_statistics_equal_single_statistics():
    g = torch.Generator().manual_seed(2)
    cos = torch.rand(4, 97, generator=g, dtype=torch.float64) * 2 - 1
    cos[1, :10] = 0.0
    cos[2] = cos[2].abs()
    cos[3] = 0.0
    batched = batched_alignment_statistics(cos)
    for i in range(4):
        ref = alignment_statistics(cos[i])
        for k, v in ref.items():
            assert batched[k][i] == pytest.approx(v, abs=1e-12), (i, k)


def test_power_iteration_tracks_v1_and_sign_across_slow_weight_changes():
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(6, 9).double()
    with torch.no_grad():
        u, _, vh = torch.linalg.svd(torch.randn(9, 6, generator=g, dtype=torch.float64), full_matrices=False)
        lin.weight.copy_(
            u @ torch.diag(torch.tensor([5.0, 2.0, 1.5, 1.0, 0.5, 0.2], dtype=torch.float64)) @ vh
        )
    model = nn.Sequential(lin)
    d = SpectralAlignment(power_iters=1)
    batch = (torch.randn(20, 6, generator=g, dtype=torch.float64),)
    prev = None
    ref_prev = None
    for step in range(60):
        with torch.no_grad():  # a slow drift of the weight, as between optimizer steps
            lin.weight.add_(0.03 * torch.randn(9, 6, generator=g, dtype=torch.float64))
        out = d.compute(_ctx(model, batch, step))
        v = d.state["v1"]["0"].double()
        _, s, vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
        # The SVD's sign is arbitrary: carry it by continuity from the diagnostic's first v1.
        ref = vh[0] if torch.dot(vh[0], v if ref_prev is None else ref_prev) >= 0 else -vh[0]
        ref_prev = ref
        assert abs(float(torch.dot(v, ref))) > 0.999, step
        if prev is not None:
            assert float(torch.dot(v, prev)) > 0.9, step  # the sign is carried, never flipped
            assert float(torch.dot(v, ref)) > 0.999, step  # and it is the continuous branch of v1
        prev = v
        assert _stats(out)["sa_sigma1"]["0"][0] == pytest.approx(float(s[0]), rel=1e-3)



def _with_spectrum(lin, sv, g):
    u, _, vh = torch.linalg.svd(torch.randn(*lin.weight.shape, generator=g, dtype=torch.float64),
                                full_matrices=False)
    with torch.no_grad():
        lin.weight.copy_(u @ torch.diag(torch.tensor(sv, dtype=torch.float64)) @ vh)
    return vh[0]


@pytest.mark.parametrize("gap", [1, 100])
def test_a_probe_far_from_the_previous_one_converges_v1_again(gap):
    # Checkpoints analysed far apart: the weight has turned (close top singular values, a new basis), and one
    # warm power step from the old v_1 is far from the new one. Past refine_gap steps the probe converges.
    g = torch.Generator().manual_seed(5)
    lin = nn.Linear(8, 12).double()
    model = nn.Sequential(lin)
    batch = (torch.randn(30, 8, generator=g, dtype=torch.float64),)
    d = SpectralAlignment(refine_gap=20)
    _with_spectrum(lin, [3.0, 2.7, 2.0, 1.0, 0.5, 0.3, 0.2, 0.1], g)
    d.compute(_ctx(model, batch, 0))
    v1 = _with_spectrum(lin, [3.0, 2.7, 2.0, 1.0, 0.5, 0.3, 0.2, 0.1], g)
    out = d.compute(_ctx(model, batch, gap))
    sigma = _stats(out)["sa_sigma1"]["0"][0]
    cos = abs(float(torch.dot(d.state["v1"]["0"].double(), v1)))
    if gap > d.refine_gap:
        assert sigma == pytest.approx(3.0, rel=1e-6)
        assert cos > 1 - 1e-5
    else:  # one warm step: a lower bound of sigma_1 and a v_1 still far from the new one
        assert sigma < 3.0 * (1 - 1e-3)
        assert cos < 0.99
    assert d.state["last_step"] == gap


def test_sign_diversity_invariant_to_global_sign_of_v1():
    model = _tiny_gpt()
    g = torch.Generator().manual_seed(4)
    batch = (torch.randint(0, 96, (2, 8), generator=g), torch.randint(0, 96, (2, 8), generator=g))
    d = SpectralAlignment(init_iters=500, detail_every=1)
    d.compute(_ctx(model, batch, 0, _lm_loss))  # cold start
    flipped = {k: -v for k, v in d.state["v1"].items()}  # the same v1 with every sign flipped
    a = _stats(d.compute(_ctx(model, batch, 1, _lm_loss)))
    d.state["v1"] = flipped
    b = _stats(d.compute(_ctx(model, batch, 1, _lm_loss)))
    for key in a["sa_sign_diversity"]:
        assert b["sa_sign_diversity"][key][0] == pytest.approx(a["sa_sign_diversity"][key][0], abs=1e-9)
        assert b["sa_mean_abs"][key][0] == pytest.approx(a["sa_mean_abs"][key][0], abs=1e-6)
        assert b["sa_mean"][key][0] == pytest.approx(-a["sa_mean"][key][0], abs=1e-6)
        assert b["sa_positive_fraction"][key][0] == pytest.approx(
            1 - a["sa_positive_fraction"][key][0], abs=1e-9
        )
        assert b["sa_quantile"][key][0] == pytest.approx(-a["sa_quantile"][key][4], abs=1e-6)


def test_hooks_removed_also_when_the_loss_fails():
    model = _tiny_gpt()
    batch = (torch.randint(0, 96, (2, 8)), torch.randint(0, 96, (2, 8)))
    d = SpectralAlignment()
    d.compute(_ctx(model, batch, 0, _lm_loss))
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())

    def bad(model, batch):
        model(batch[0])
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        d.compute(_ctx(model, batch, 1, bad))
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert model.training and all(m.training for m in model.modules())


class _MaxAlloc(TorchDispatchMode):
    """Largest tensor (in elements) produced by any op inside the block."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        seen = {
            a.untyped_storage().data_ptr()
            for a in torch.utils._pytree.tree_leaves((args, kwargs))
            if torch.is_tensor(a)
        }
        for t in out if isinstance(out, (tuple, list)) else [out]:
            # Only new storage counts (detach, views and in-place ops allocate nothing).
            if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in seen:
                self.max_numel = max(self.max_numel, t.untyped_storage().nbytes() // t.element_size())
        return out


@pytest.mark.parametrize("contiguous", [True, False])
def test_memory_bounded_with_long_sequences(contiguous):
    # The largest tensor allocated while keeping and projecting rows does not grow with the sequence length.
    d_in, budget, chunk = 32, 256, 64
    V = torch.nn.functional.normalize(torch.randn(d_in, 3), dim=0)
    peaks = []
    for length in (1_000, 50_000):
        x = torch.randn(2, length, d_in)
        if not contiguous:
            x = torch.randn(length, 2, d_in).transpose(0, 1)  # [2, L, d] with strides of a transposed tensor
        proj = Projector("linear", V, budget, RowSampler(torch.Generator().manual_seed(0)))
        with _MaxAlloc() as mode:
            proj(nn.Identity(), (x,), {})
            proj(nn.Identity(), (x,), {})  # a second call finds the budget spent
            cos = proj.cosines(chunk)
        assert cos.shape == (budget, 3)
        torch.testing.assert_close(cos, project_rows(proj.rows(), V, budget, finish=False))
        peaks.append(mode.max_numel)
    assert peaks[0] == peaks[1]
    assert peaks[1] <= budget * d_in


def test_maps_of_one_width_are_projected_together_and_share_token_positions():
    torch.manual_seed(0)
    x = torch.randn(4, 50, 16)
    V1, V2 = (torch.nn.functional.normalize(torch.randn(16, 1), dim=0) for _ in range(2))
    sampler = RowSampler(torch.Generator().manual_seed(3))
    a, b = Projector("linear", V1, 64, sampler), Projector("linear", V2, 64, sampler)
    a(nn.Identity(), (x,), {})
    b(nn.Identity(), (2.0 * x,), {})
    torch.testing.assert_close(2.0 * a.rows(), b.rows())  # the same token positions
    cos = project_all({"a": a, "b": b})
    rows = a.rows()
    for name, V in (("a", V1), ("b", V2)):
        torch.testing.assert_close(cos[name][:, 0], alignment_cosines(rows, V[:, 0]))


def test_cosine_matrices_hold_each_maps_cosines_in_its_row():
    torch.manual_seed(1)
    sampler = RowSampler(torch.Generator().manual_seed(4))
    x16, x8 = torch.randn(3, 40, 16), torch.randn(3, 40, 8)
    V3 = torch.nn.functional.normalize(torch.randn(16, 3), dim=0)  # a split fused projection: 3 maps
    V1, V8 = torch.nn.functional.normalize(torch.randn(16, 1), dim=0), torch.nn.functional.normalize(torch.randn(8, 1), dim=0)
    projs = {"qkv": Projector("linear", V3, 64, sampler), "fc": Projector("linear", V1, 64, sampler),
             "narrow": Projector("linear", V8, 32, sampler)}
    projs["qkv"](nn.Identity(), (x16,), {})
    projs["fc"](nn.Identity(), (x16 * 0.5,), {})
    projs["narrow"](nn.Identity(), (x8,), {})
    by_module = {"qkv": [LinearMap(f"qkv.{p}", "qkv", "linear", (i, i + 1)) for i, p in enumerate("qkv")],
                 "fc": [LinearMap("fc", "fc", "linear")], "narrow": [LinearMap("narrow", "narrow", "linear")]}
    per_module = project_all(projs)
    got = {key: row for keys, matrix in cosine_matrices(projs, by_module) for key, row in zip(keys, matrix, strict=True)}
    assert sorted(got) == ["fc", "narrow", "qkv.k", "qkv.q", "qkv.v"]
    for name, maps in by_module.items():
        for j, mp in enumerate(maps):
            torch.testing.assert_close(got[mp.key], per_module[name][:, j])
    assert got["narrow"].shape == (32,) and got["fc"].shape == (64,)


def test_projectors_given_columns_project_as_with_the_matrix():
    # What ProjectionHooks.arm hands the projectors (v_1 as columns, stacked per group) gives the same cosines
    # as [in, K] matrices, for single maps, a split fused projection, and groups that mix the two forms.
    torch.manual_seed(2)
    x16, x8 = torch.randn(3, 40, 16), torch.randn(3, 40, 8)
    V3 = torch.nn.functional.normalize(torch.randn(16, 3), dim=0)
    V1, V1b = (torch.nn.functional.normalize(torch.randn(16, 1), dim=0) for _ in range(2))
    V8 = torch.nn.functional.normalize(torch.randn(8, 1), dim=0).double()
    inputs = {"qkv": x16, "fc": 0.5 * x16, "fc2": -x16, "narrow": x8}
    matrices = {"qkv": V3, "fc": V1, "fc2": V1b, "narrow": V8}

    def run(as_columns):
        sampler = RowSampler(torch.Generator().manual_seed(4))
        projs = {name: Projector("linear", V.unbind(1) if name in as_columns else V, 64, sampler)
                 for name, V in matrices.items()}
        for name, proj in projs.items():
            proj(nn.Identity(), (inputs[name],), {})
        return project_all(projs)

    want = run(())
    for as_columns in (tuple(matrices), ("qkv", "fc")):
        got = run(as_columns)
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name])
    proj = Projector("linear", V3.unbind(1), 8, None)
    assert proj.width == 16 and torch.equal(proj.V, V3)


def test_statistics_come_in_the_maps_order_whatever_the_groups():
    maps = [LinearMap(k, k, "linear") for k in ("a", "b", "c", "d")]
    cols = lambda ks: {"mean": [f"mean-{k}" for k in ks], "num_tokens": [len(k) for k in ks]}  # noqa: E731
    cache = [None]
    keys, got = _in_map_order(maps, [(["b", "d"], cols("bd")), (["a"], cols("a"))], cache)
    assert keys == ("a", "b", "d") and got["mean"] == ["mean-a", "mean-b", "mean-d"]
    kept = cache[0]
    keys, got = _in_map_order(maps, [(["b", "d"], cols("bd")), (["a"], cols("a"))], cache)
    assert cache[0] is kept and keys == ("a", "b", "d") and got["mean"] == ["mean-a", "mean-b", "mean-d"]
    # other groups (a module that did not run this step): the order is found again
    keys, got = _in_map_order(maps, [(["d", "c"], cols("dc"))], cache)
    assert cache[0] is not kept and keys == ("c", "d") and got["mean"] == ["mean-c", "mean-d"]
    keys, got = _in_map_order(maps, [(["a", "b"], cols("ab"))], cache)
    assert keys == ("a", "b") and got["mean"] == ["mean-a", "mean-b"]


@pytest.mark.parametrize("stacked", [True, False], ids=["weights-stacked", "one-product-per-map"])
def test_top_vectors_kept_stacked_between_steps_match_fresh_stacks_and_keep_v1_of_a_blown_up_weight(
        stacked, monkeypatch):
    """Small weights take their power steps on a stacked copy, large ones (the threshold lowered to 0
    here) one map at a time on the weights themselves: the same behaviour either way."""
    import diagnostics.metrics.alignment_probe as alignment_probe

    if not stacked:
        monkeypatch.setattr(alignment_probe, "STACKED_WEIGHT_BYTES", 0)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 4)).double()
    maps = find_linear_maps(model)
    modules = dict(model.named_modules())
    kept, fresh, groups = {}, {}, {}
    kw = dict(power_iters=1, init_iters=200, init_tol=1e-10, seed=0)
    for step in range(6):
        with torch.no_grad():
            for lin in model:
                lin.weight.add_(0.05 * torch.randn_like(lin.weight))
            if step == 4:
                model[1].weight[0, 0] = float("inf")
        a = top_vectors(maps, modules, kept, groups=groups, **kw)
        b = top_vectors(maps, modules, fresh, **kw)
        for key in a:
            assert a[key][0] == b[key][0] or math.isnan(a[key][0]) and math.isnan(b[key][0])
            torch.testing.assert_close(a[key][1], b[key][1])
        if step == 3:
            before = {k: v.clone() for k, v in kept.items()}
    assert math.isnan(a["1"][0]) and math.isfinite(a["0"][0])
    torch.testing.assert_close(kept["1"], before["1"])  # the blown-up weight keeps its last good v_1
    assert not torch.equal(kept["0"], before["0"])  # while the other map of its shape moves on
    assert len(groups) == 2 and groups[((6, 6), torch.float64, torch.device("cpu"))].v.shape == (2, 6)


def test_small_inputs_are_gathered_after_the_forward_once_per_input_and_never_after_an_inplace_change():
    torch.manual_seed(5)
    V = torch.nn.functional.normalize(torch.randn(8, 1), dim=0)
    sampler = RowSampler(torch.Generator().manual_seed(0))
    q, k, big = (Projector("linear", V, 16, sampler) for _ in range(3))
    x = torch.randn(2, 20, 8)  # 40 rows: within DEFER_FACTOR x 16, kept by reference
    q(nn.Identity(), (x,), {})
    k(nn.Identity(), (x,), {})
    large = torch.randn(4, 50, 8)  # 200 rows: gathered inside the hook
    big(nn.Identity(), (large,), {})
    assert isinstance(q.blocks[0], tuple) and torch.is_tensor(big.blocks[0])
    assert q.rows() is k.rows()  # one gather for the two modules reading the same tensor
    assert q.rows().shape == (16, 8) and big.rows().shape == (16, 8)
    flat = x.reshape(-1, 8)
    assert all(any(torch.equal(r, f) for f in flat) for r in q.rows())  # rows of x itself

    with torch.inference_mode():  # no version counter: gathered inside the hook
        frozen = Projector("linear", V, 16, RowSampler(torch.Generator().manual_seed(0)))
        frozen(nn.Identity(), (torch.randn(2, 20, 8),), {})
    assert torch.is_tensor(frozen.blocks[0]) and frozen.rows().shape == (16, 8)

    later = Projector("linear", V, 16, RowSampler(torch.Generator().manual_seed(0)))
    y = torch.randn(2, 20, 8)
    later(nn.Identity(), (y,), {})
    y.mul_(2.0)  # changed in place before the rows were read: they no longer exist
    assert later.count == 16 and later.rows() is None


def test_token_budget_through_the_diagnostic_on_long_inputs():
    lin = nn.Linear(8, 5)
    model = nn.Sequential(lin)
    d = SpectralAlignment(max_tokens=100, chunk_tokens=32)
    out = d.compute(_ctx(model, (torch.randn(1, 20_000, 8),), 0))
    hist = _stats(out)["sa_histogram"]["0"]
    # Fractions over exactly max_tokens tokens.
    assert all(abs(v * 100 - round(v * 100)) < 1e-9 for v in hist.values())
    assert math.isclose(sum(hist.values()), 1.0)


def test_project_rows_zero_and_nonfinite_rows_count_as_no_sign():
    x = torch.randn(10, 4)
    x[0] = 0.0
    x[1, 2] = float("nan")
    v = torch.nn.functional.normalize(torch.randn(4, 1), dim=0)
    cos = project_rows(x, v, 100)
    assert cos[0, 0] == 0 and cos[1, 0] == 0
    torch.testing.assert_close(cos[2:, 0], alignment_cosines(x[2:], v[:, 0]))


class Conv1D(nn.Module):
    """Hugging Face's Conv1D layout: weight [in, out], y = x @ W + b."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf, dtype=torch.float64))
        self.bias = nn.Parameter(torch.zeros(nf, dtype=torch.float64))

    def forward(self, x):
        return x @ self.weight + self.bias


class _Fused(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24).double()
        self.c_attn = Conv1D(24, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True).double()

    def forward(self, x):
        a = self.qkv(x).sum() + self.c_attn(x).sum()
        return a + self.mha(x, x, x, need_weights=False)[0].sum()


@pytest.mark.parametrize("mode", ["whole", "split"])
def test_fused_qkv_conv1d_and_multihead_attention(mode):
    torch.manual_seed(5)
    model = _Fused()
    maps = find_linear_maps(model, fused_qkv=mode)
    d = SpectralAlignment(fused_qkv=mode, init_iters=3000, init_tol=1e-15)
    got = _stats(d.compute(_ctx(model, (torch.randn(2, 5, 8, dtype=torch.float64),), 0)))
    weights = {
        "qkv": model.qkv.weight.detach(),
        "c_attn": model.c_attn.weight.detach().T,  # HF Conv1D is transposed
        "mha.in_proj": model.mha.in_proj_weight.detach(),
    }
    expected = {}
    for base, w in weights.items():
        if mode == "split":
            for i, lab in enumerate("qkv"):
                expected[f"{base}.{lab}"] = w[8 * i : 8 * (i + 1)]
        else:
            expected[base] = w
    assert [m.key for m in maps] == list(got["sa_sigma1"]) and set(got["sa_sigma1"]) == set(expected)
    for key, w in expected.items():
        assert got["sa_sigma1"][key][0] == pytest.approx(
            float(torch.linalg.matrix_norm(w, ord=2)), rel=1e-8
        ), key


def test_patterns_select_and_bad_pattern_names_the_fix():
    model = _tiny_gpt()
    maps = find_linear_maps(model, "blocks.*.mlp.*", exclude="*fc2")
    assert [m.key for m in maps] == ["blocks.0.mlp.fc1"]
    with pytest.raises(ConfigError, match="nothing_here"):
        find_linear_maps(model, ["nothing_here"])
    with pytest.raises(ConfigError):
        SpectralAlignment(fused_qkv="halves")
    with pytest.raises(ConfigError):
        SpectralAlignment(max_tokens=0)


def test_publishes_statistics_in_the_step_context():
    model = _tiny_gpt()
    batch = (torch.randint(0, 96, (2, 8)), torch.randint(0, 96, (2, 8)))
    ctx = _ctx(model, batch, 0, _lm_loss)
    SpectralAlignment().compute(ctx)
    stats = ctx.alignment_statistics()
    assert "head" in stats and 0.0 <= stats["head"]["sign_diversity"] <= 1.0


def test_in_monitor_with_isolation_check(tmp_path):
    from diagnostics.store import open_run
    from diagnostics.tracking import Monitor

    model = TinyGPT(d_model=16, n_heads=2, n_layers=1, block_size=8, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    with Monitor(
        model,
        _lm_loss,
        run=tmp_path / "r",
        diagnostics=["spectral_alignment"],
        optimizer=opt,
        strict=True,
        check_isolation=True,
    ) as mon:
        for step in range(4):
            batch = (torch.randint(0, 96, (4, 8), generator=g), torch.randint(0, 96, (4, 8), generator=g))
            loss = _lm_loss(model, batch)
            opt.zero_grad()
            loss.backward()
            mon.step(step, batch, loss)
            opt.step()
    run = open_run(tmp_path / "r")
    s = run.series()
    assert set(s[s.metric == "sa_sign_diversity"]["step"]) == {0, 1, 2, 3}
    assert set(s[s.metric == "sa_histogram"]["index"]) == set(range(20))
    assert (run.status()["status"] == "ok").all()
    assert run.meta["diagnostic_state"]["spectral_alignment"]  # v1 saved for resuming


class _CachingNet(nn.Module):
    """Creates a tensor in its first forward and keeps it (as rotary-embedding caches do)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)
        self.cache: torch.Tensor | None = None

    def forward(self, x):
        if self.cache is None:
            self.cache = torch.linspace(0.5, 1.5, 6)
        return self.out(torch.tanh(self.fc(x) * self.cache))


def test_model_code_never_runs_in_inference_mode_so_its_caches_train(tmp_path):
    # Without an observed training forward the probe runs its own: a cache the model makes there must still
    # be usable by the training backward afterwards (a tensor made in inference mode would raise).
    from diagnostics.tracking import Monitor

    model = _CachingNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)

    def loss_fn(m, batch):
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    with Monitor(model, loss_fn, run=tmp_path / "r", diagnostics=["spectral_alignment"], optimizer=opt,
                 strict=True, observe_training_forward=False) as mon:
        for step in range(3):
            batch = (torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g))
            opt.zero_grad()
            loss_fn(model, batch).backward()
            model.cache = None  # made again by the next forward: the probe's own
            mon.step(step, batch, torch.tensor(1.0))
            assert mon.diagnostics[0].last_source == "extra_forward"
            if step:  # (step 0's batch check runs the loss before the probe)
                assert not model.cache.is_inference()
                loss_fn(model, batch).backward()  # raises for an inference-mode cache
            opt.step()
        v1 = mon.state_dict()["spectral_alignment"]["v1"]  # made in inference mode, saved as any tensor
    assert set(v1) == {"fc", "out"} and all(v["shape"] == [6] for v in v1.values())


def test_watch_measures_on_the_training_forward_without_an_extra_forward(tmp_path):
    from diagnostics.store import open_run
    from diagnostics.tracking import Monitor

    model = TinyGPT(d_model=16, n_heads=2, n_layers=1, block_size=8, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sa = SpectralAlignment()
    calls = []
    counter = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    g = torch.Generator().manual_seed(0)
    sources = []
    with Monitor(model, _lm_loss, run=tmp_path / "w", diagnostics=[sa], optimizer=opt, strict=True) as mon:
        for step in range(4):
            batch = (torch.randint(0, 96, (4, 8), generator=g), torch.randint(0, 96, (4, 8), generator=g))
            # Reference: this forward's inputs of fc1 projected on the v1 the diagnostic holds now.
            v_before = sa.state["v1"]["blocks.0.mlp.fc1"].clone() if sa.state.get("v1") else None
            seen = {}
            h = model.blocks[0].mlp.fc1.register_forward_pre_hook(
                lambda m, a, seen=seen: seen.__setitem__("x", a[0].detach())
            )
            calls.clear()
            with sa.watch(model):
                loss = _lm_loss(model, batch)
            h.remove()
            opt.zero_grad()
            loss.backward()
            mon.step(step, batch, loss)
            sources.append(sa.last_source)
            if step >= 1:
                assert len(calls) == 1  # no forward besides the training forward
            if v_before is not None:
                last = alignment_statistics(alignment_cosines(seen["x"], v_before))
            opt.step()
    counter.remove()
    assert sources == ["extra_forward", "training_forward", "training_forward", "training_forward"]
    s = open_run(tmp_path / "w").series("sa_sign_diversity", "blocks.0.mlp.fc1")
    assert s[s.step == 3]["value"].iloc[0] == pytest.approx(last["sign_diversity"], abs=1e-6)
    assert all(not m._forward_pre_hooks for m in model.modules())


def _train_detail(run, detail_every, steps=25):
    from diagnostics.tracking import Monitor

    model = TinyGPT(d_model=16, n_heads=2, n_layers=1, block_size=8, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    sa = SpectralAlignment(detail_every=detail_every)
    detector = ExplosionDetector(method="spectral_alignment", skip=2, warmup=5, persistence=2)
    with Monitor(model, _lm_loss, run=run, diagnostics=[sa, detector], optimizer=opt, strict=True) as mon:
        for step in range(steps):
            batch = (torch.randint(0, 96, (4, 8), generator=g), torch.randint(0, 96, (4, 8), generator=g))
            loss = _lm_loss(model, batch)
            opt.zero_grad()
            loss.backward()
            mon.step(step, batch, loss)
            opt.step()


def test_detail_every_thins_only_the_distribution_detail(tmp_path):
    from diagnostics.metrics.explosion import detect
    from diagnostics.store import open_run

    _train_detail(tmp_path / "all", 1)
    _train_detail(tmp_path / "thin", 10)
    full, thin = open_run(tmp_path / "all").series(), open_run(tmp_path / "thin").series()
    for metric in ("sa_quantile", "sa_histogram"):
        assert set(full[full.metric == metric]["step"]) == set(range(25))
        assert set(thin[thin.metric == metric]["step"]) == {0, 10, 20}
        # the detail that is written is the same as with detail_every=1
        a = full[(full.metric == metric) & full.step.isin([0, 10, 20])].sort_values(["step", "key", "index"])
        b = thin[thin.metric == metric].sort_values(["step", "key", "index"])
        assert a["value"].tolist() == b["value"].tolist()
    # every per-step scalar (what the detector reads), the score and the offline detector are unchanged
    cols = ["step", "metric", "key", "index"]
    for metric in ("sa_positive_fraction", "sa_sign_diversity", "sa_mean", "sa_mean_abs", "sa_sigma1",
                   "explosion_score"):
        a = full[full.metric == metric].sort_values(cols)
        b = thin[thin.metric == metric].sort_values(cols)
        assert len(a) == len(b) > 0 and a["value"].tolist() == b["value"].tolist(), metric
    params = {"skip": 2, "warmup": 5, "persistence": 2, "min_baseline": 0.0}
    assert detect(full, **params) == detect(thin, **params)


def test_detail_every_option_and_statistics_without_detail():
    with pytest.raises(ConfigError, match="detail_every"):
        SpectralAlignment(detail_every=0)
    for bad in (-1, 2.5, True):
        with pytest.raises(ConfigError, match="refine_gap"):
            SpectralAlignment(refine_gap=bad)
    cos = torch.rand(3, 50) * 2 - 1
    full, lean = batched_alignment_statistics(cos), batched_alignment_statistics(cos, detail=False)
    assert "histogram" not in lean and "quantiles" not in lean
    for k, v in lean.items():
        assert v == full[k], k



def test_a_new_model_object_is_measured_even_when_it_reuses_a_freed_models_id(monkeypatch):
    # Under FSDP the Monitor hands diagnostics a fresh gathered copy of the model at every step; CPython
    # often gives the new copy the freed copy's id. Every id is made equal here, the worst case of reuse.
    import copy

    import diagnostics.metrics.spectral_alignment as module

    monkeypatch.setattr(module, "id", lambda obj: 0, raising=False)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    sa = get_diagnostic("spectral_alignment")
    batch = (torch.randn(6, 4),)
    for step in range(3):
        model = copy.deepcopy(base)
        out = sa.compute(_ctx(model, batch, step))
        assert out.status == "ok", out.reason
        assert {r.key for r in expand_records(out.records)} == {"0", "2"}


def test_power_steps_per_map_equal_the_stacked_ones(monkeypatch):
    import diagnostics.metrics.alignment_probe as alignment_probe

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(7, 7), nn.Linear(7, 7), nn.Linear(7, 7)).double()
    maps, modules = find_linear_maps(model), dict(model.named_modules())
    kw = dict(power_iters=2, init_iters=3, init_tol=1e-12, seed=0)  # a loose start, so the warm steps move v
    stacked, per_map = {}, {}
    top_vectors(maps, modules, stacked, **kw)
    top_vectors(maps, modules, per_map, **kw)
    a = top_vectors(maps, modules, stacked, **kw)
    monkeypatch.setattr(alignment_probe, "STACKED_WEIGHT_BYTES", 0)
    b = top_vectors(maps, modules, per_map, **kw)
    for key in a:
        assert a[key][0] == pytest.approx(b[key][0], rel=1e-12)
        torch.testing.assert_close(a[key][1], b[key][1], rtol=1e-12, atol=1e-12)
