"""attention_stats against explicitly computed softmax attention: SDPA, nn.MultiheadAttention, GPT-2, the zoo."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diagnostics.metrics.attention import AttentionProbe, AttentionStatistics
from diagnostics.metrics.attention_stats import logit_statistics, sdpa_statistics
from diagnostics.metrics.context import StepContext


def reference(scores: torch.Tensor, allowed: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(max allowed logit, per-head entropy sum, per-head rows) of logits [B, H, L, S] in float64."""
    s = scores.double().masked_fill(~allowed, -math.inf)
    rows_ok = allowed.any(-1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    ent = -(p * torch.log(p.clamp_min(1e-300))).masked_fill(~allowed, 0.0).sum(-1)
    ent = ent.masked_fill(~rows_ok, 0.0)
    return float(s.max()), ent.sum(dim=(0, 2)), rows_ok.sum(dim=(0, 2)).double()


def assert_matches(st, ref, atol: float = 1e-5) -> None:
    top, ent, rows = ref
    assert st.logit_max == pytest.approx(top, abs=atol)
    assert torch.equal(st.head_rows, rows)
    torch.testing.assert_close(st.head_entropy_sum, ent, atol=atol * max(1.0, float(rows.max())), rtol=1e-6)


# --- the maths -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 7, 1 << 22])
@pytest.mark.parametrize("case", ["plain", "causal", "bool", "float", "neg_inf", "gqa", "three_d"])
def test_sdpa_statistics_against_explicit_softmax(case: str, chunk: int) -> None:
    g = torch.Generator().manual_seed(0)
    B, H, L, S, E = 2, 4, 5, 6, 3
    q = torch.randn(B, H, L, E, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, S, E, generator=g, dtype=torch.float64)
    scores = q @ k.transpose(-2, -1) / math.sqrt(E)
    allowed = torch.ones(B, H, L, S, dtype=torch.bool)
    kw: dict = {}
    if case == "causal":
        kw["is_causal"] = True
        allowed = allowed & torch.ones(L, S, dtype=torch.bool).tril()
    elif case == "bool":
        mask = torch.rand(B, 1, L, S, generator=g) > 0.4
        mask[0, 0, 1] = False  # a row with no allowed key is skipped
        kw["attn_mask"] = mask
        allowed = allowed & mask
    elif case == "float":
        bias = torch.randn(1, H, L, S, generator=g, dtype=torch.float64)
        kw["attn_mask"] = bias
        scores = scores + bias
    elif case == "neg_inf":
        mask = torch.zeros(L, S, dtype=torch.float64)
        mask[torch.rand(L, S, generator=g) > 0.5] = torch.finfo(torch.float64).min  # Hugging Face's padding
        kw["attn_mask"] = mask
        allowed = allowed & (mask == 0)
    elif case == "gqa":
        k2 = k[:, :2]
        kw["enable_gqa"] = True
        scores = q @ k2.repeat_interleave(2, 1).transpose(-2, -1) / math.sqrt(E)
        k = k2
    if case == "three_d":
        st = sdpa_statistics(q[0], k[0], chunk_elements=chunk)
        assert_matches(st, reference(scores[:1], allowed[:1]), 1e-10)
        return
    st = sdpa_statistics(q, k, chunk_elements=chunk, **kw)
    assert_matches(st, reference(scores, allowed), 1e-10)
    assert len(st.head_rows) == H


def test_scale_and_logit_statistics() -> None:
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 4, 3, generator=g), torch.randn(1, 2, 4, 3, generator=g)
    scores = q @ k.transpose(-2, -1) * 0.7
    allowed = torch.ones(1, 2, 4, 4, dtype=torch.bool)
    assert_matches(sdpa_statistics(q, k, scale=0.7), reference(scores, allowed))
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    masked = scores.masked_fill(~causal, -math.inf)
    assert_matches(logit_statistics(masked, chunk_elements=3), reference(scores, allowed & causal))


def test_logits_are_formed_in_chunks(monkeypatch) -> None:
    """No logit block larger than chunk_elements (or one query row of every head) is ever formed."""
    sizes = []
    matmul = torch.matmul

    def spy(a, b):
        out = matmul(a, b)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(torch, "matmul", spy)
    q, k = torch.randn(2, 4, 64, 8), torch.randn(2, 4, 64, 8)
    sdpa_statistics(q, k, is_causal=True, chunk_elements=4 * 64 * 8)
    assert sizes and max(sizes) <= 4 * 64 * 8 < 4 * 64 * 64


# --- models --------------------------------------------------------------------------------------------


def probe(model: nn.Module, *args, **kwargs) -> dict:
    p = AttentionProbe(model)
    with torch.no_grad(), p.watch():
        model(*args, **kwargs)
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    return p.stats


class SDPANet(nn.Module):
    def __init__(self, mask: torch.Tensor | None = None, causal: bool = True) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.mask, self.causal = mask, causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, 4).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=self.causal)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, _ = self.qkv(x).view(b, t, 3, 2, 4).permute(2, 0, 3, 1, 4)
        return q @ k.transpose(-2, -1) / 2.0


@pytest.mark.parametrize("kind", ["causal", "mask"])
def test_sdpa_model(kind: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    mask = torch.rand(3, 1, 5, 5) > 0.3 if kind == "mask" else None
    model = SDPANet(mask, causal=kind == "causal")
    stats = probe(model, x)
    assert list(stats) == ["(model)"]  # SDPA called by the root module's own forward
    allowed = torch.ones(3, 2, 5, 5, dtype=torch.bool)
    allowed = allowed & (torch.ones(5, 5, dtype=torch.bool).tril() if kind == "causal" else mask)
    with torch.no_grad():
        assert_matches(stats["(model)"], reference(model.scores(x), allowed))


def mha_reference(mha: nn.MultiheadAttention, x: torch.Tensor, kpm, attn_mask) -> tuple:
    """Logits from the module's weights, probabilities from need_weights=True (per head)."""
    with torch.no_grad():
        _, w = mha(x, x, x, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=True, average_attn_weights=False)
        xs = x if mha.batch_first else x.transpose(0, 1)  # [B, L, D]
        d, h = mha.embed_dim, mha.num_heads
        q = F.linear(xs, mha.in_proj_weight[:d], mha.in_proj_bias[:d]).view(*xs.shape[:2], h, -1).transpose(1, 2)
        k = F.linear(xs, mha.in_proj_weight[d:2 * d], mha.in_proj_bias[d:2 * d]).view(*xs.shape[:2], h, -1).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // h)
    b, L = xs.shape[:2]
    allowed = torch.ones(b, h, L, L, dtype=torch.bool)
    if attn_mask is not None:
        allowed = allowed & (~attn_mask if attn_mask.dtype == torch.bool else torch.isfinite(attn_mask))
    if kpm is not None:
        allowed = allowed & ~kpm[:, None, None, :]
    top, _, rows = reference(scores, allowed)
    w = w.double()
    ent = -(w * torch.log(w.clamp_min(1e-300))).sum(-1).masked_fill(~allowed.any(-1), 0.0)
    return top, ent.double().sum(dim=(0, 2)), rows


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("masks", ["none", "causal_float", "causal_bool", "padding"])
def test_multihead_attention(batch_first: bool, need_weights: bool, masks: str) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
    x = torch.randn(3, 6, 8) if batch_first else torch.randn(6, 3, 8)
    attn_mask = kpm = None
    if masks == "causal_float":
        attn_mask = nn.Transformer.generate_square_subsequent_mask(6)
    elif masks == "causal_bool":
        attn_mask = torch.ones(6, 6, dtype=torch.bool).triu(1)
    elif masks == "padding":
        kpm = torch.zeros(3, 6, dtype=torch.bool)
        kpm[1, 4:] = True

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = mha

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=need_weights)[0]

    stats = probe(Net().eval(), x)
    assert list(stats) == ["attn"]
    assert_matches(stats["attn"], mha_reference(mha, x, kpm, attn_mask))


@pytest.mark.parametrize("option", ["bias_kv", "zero_attn", "kdim"])
def test_multihead_attention_options(option: str) -> None:
    """Key bias, zero-attention column, separate projections: entropies as the module's own weights say."""
    torch.manual_seed(0)
    kw = {"add_bias_kv": option == "bias_kv", "add_zero_attn": option == "zero_attn"}
    if option == "kdim":
        kw.update(kdim=5, vdim=7)
    mha = nn.MultiheadAttention(8, 2, batch_first=True, **kw).eval()
    q = torch.randn(2, 4, 8)
    kv = (torch.randn(2, 6, 5), torch.randn(2, 6, 7)) if option == "kdim" else (q, q)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = mha

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, *kv, need_weights=False)[0]

    stats = probe(Net(), q)
    with torch.no_grad():
        _, w = mha(q, *kv, need_weights=True, average_attn_weights=False)
    w = w.double()
    ent = -(w * torch.log(w.clamp_min(1e-300))).sum(-1).sum(dim=(0, 2))
    torch.testing.assert_close(stats["attn"].head_entropy_sum, ent, atol=1e-4, rtol=1e-5)
    assert stats["attn"].head_rows.tolist() == [8.0, 8.0]


def gpt2(impl: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                  bos_token_id=0, eos_token_id=0, attn_implementation=impl)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.GPT2LMHeadModel(cfg).eval()


def gpt2_reference(model, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """Per attention module: logits from c_attn's output, entropies from output_attentions (eager)."""
    qkv = {}
    hooks = [blk.attn.c_attn.register_forward_hook(lambda m, a, o, i=i: qkv.__setitem__(i, o))
             for i, blk in enumerate(model.transformer.h)]
    try:
        with torch.no_grad():
            out = model(ids, attention_mask=mask, output_attentions=True)
    finally:
        for h in hooks:
            h.remove()
    b, t = ids.shape
    allowed = torch.ones(t, t, dtype=torch.bool).tril()[None, None] & mask.bool()[:, None, None, :]
    allowed = allowed.expand(b, 2, t, t)
    refs = {}
    for i, o in qkv.items():
        q, k, _ = o.split(16, dim=2)
        q = q.view(b, t, 2, 8).transpose(1, 2)
        k = k.view(b, t, 2, 8).transpose(1, 2)
        top, _, rows = reference(q @ k.transpose(-2, -1) / math.sqrt(8), allowed)
        p = out.attentions[i].double()
        ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1).masked_fill(~allowed.any(-1), 0.0)
        refs[f"transformer.h.{i}.attn"] = (top, ent.sum(dim=(0, 2)), rows)
    return refs


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_gpt2_attention(impl: str) -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0  # left padding: the padded queries attend to nothing and are skipped
    refs = gpt2_reference(gpt2("eager"), ids, mask)
    stats = probe(gpt2(impl), ids, attention_mask=mask)
    assert sorted(stats) == sorted(refs)
    for name, ref in refs.items():
        assert_matches(stats[name], ref)


def test_zoo_tiny_gpt_softmax_path() -> None:
    from diagnostics.zoo import get_model

    model = get_model("tiny-gpt", seed=0, block_size=8, n_layers=2).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    logits = {}
    hooks = [blk.attn.logits.register_forward_hook(lambda m, a, o, i=i: logits.__setitem__(i, o))
             for i, blk in enumerate(model.blocks)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    stats = probe(model, ids)
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    for i, s in logits.items():
        allowed = causal.expand(*s.shape).clone()
        assert_matches(stats[f"blocks.{i}.attn"], reference(s, allowed))


# --- the diagnostic --------------------------------------------------------------------------------------


def lm_loss(model, batch):
    ids, labels = batch
    out = model(ids)
    logits = getattr(out, "logits", out)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def test_diagnostic_records_per_module_and_whole_model() -> None:
    model = gpt2("sdpa")
    ids = torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(0))
    ctx = StepContext(step=0, model=model, loss_fn=lm_loss, batch=(ids, ids), loss=None)
    diag = AttentionStatistics(max_tokens=14)  # the first two sequences
    out = diag.compute(ctx)
    got = {(r.metric, r.key): r.value for r in out.records}
    refs = gpt2_reference(gpt2("eager"), ids[:2], torch.ones(2, 7, dtype=torch.long))
    for name, (top, ent, rows) in refs.items():
        assert got[("attn_logit_max", name)] == pytest.approx(top, abs=1e-5)
        assert got[("attn_entropy_mean", name)] == pytest.approx(float(ent.sum() / rows.sum()), abs=1e-5)
        assert got[("attn_entropy_min", name)] == pytest.approx(float((ent / rows).min()), abs=1e-5)
    assert got[("attn_logit_max", "all")] == max(got[("attn_logit_max", n)] for n in refs)
    assert got[("attn_modules", "all")] == 2.0
    assert out.status == "ok"


def test_no_attention_is_a_zero_count_and_nothing_measured() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    ctx = StepContext(step=0, model=model, loss_fn=lambda m, b: m(b).sum(), batch=torch.randn(5, 4), loss=None)
    out = AttentionStatistics().compute(ctx)
    assert [(r.metric, r.value) for r in out.records] == [("attn_modules", 0.0)]
    # The Monitor turns the status into one misuse event and warning (tests/tracking/test_misuse.py).
    assert out.status == "nothing_measured" and not out.events
    assert "modules=" in out.reason


def test_probe_leaves_nothing_behind_when_the_forward_fails() -> None:
    model = SDPANet()

    class Boom(RuntimeError):
        pass

    def bad_loss(m, x):
        m(x)
        raise Boom

    ctx = StepContext(step=0, model=model, loss_fn=bad_loss, batch=torch.randn(2, 3, 8), loss=None)
    with pytest.raises(Boom):
        AttentionStatistics().compute(ctx)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert not torch.overrides._is_torch_function_mode_enabled()


def test_monitored_training_is_bit_identical(tmp_path) -> None:
    from diagnostics.store import open_run
    from diagnostics.tracking import Monitor

    def run(monitor: bool) -> dict:
        model = gpt2("sdpa").train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(1)
        torch.manual_seed(5)
        mon = Monitor(model, lm_loss, run=tmp_path / "run", optimizer=opt, check_isolation=True,
                      diagnostics={"attention_stats": {"every": 1}, "output_logits": {}, "adam_state": {"every": 1}},
                      ) if monitor else None
        for step in range(3):
            ids = torch.randint(0, 50, (2, 7), generator=gen)
            loss = lm_loss(model, (ids, ids))
            opt.zero_grad()
            loss.backward()
            if mon:
                mon.step(step, (ids, ids), loss)
            opt.step()
        if mon:
            mon.close()
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    plain, monitored = run(False), run(True)
    assert all(torch.equal(plain[n], monitored[n]) for n in plain)
    with open_run(tmp_path / "run") as r:
        series = r.series()
        status = r.status()
    assert set(status.status) == {"ok"}
    assert {"attn_logit_max", "attn_entropy_min", "output_log_z_mean", "adam_update_rms"} <= set(series.metric)
    keys = set(series[series.metric == "attn_entropy_min"].key)
    assert keys == {"transformer.h.0.attn", "transformer.h.1.attn", "all"}


def _train_mode_without_dropout(model):
    """``model`` in train mode with every dropout at p = 0: its training forward and the diagnostic's own
    (eval-mode) forward then agree."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model.train()


def test_observed_training_forward_matches_its_own_forward() -> None:
    model = _train_mode_without_dropout(gpt2("sdpa"))
    ids = torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(0))
    ctx = StepContext(step=0, model=model, loss_fn=lm_loss, batch=(ids, ids), loss=None)
    own = AttentionStatistics(max_tokens=14).compute(ctx)
    diag = AttentionStatistics(max_tokens=14)  # the first two sequences of the training batch
    with diag.observe_training_forward(model):
        assert not torch.overrides._is_torch_function_mode_enabled()  # only inside the model's forward
        loss = lm_loss(model, (ids, ids))
        assert not torch.overrides._is_torch_function_mode_enabled()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    loss.backward()  # the training graph is intact
    ref = _train_mode_without_dropout(gpt2("sdpa"))
    lm_loss(ref, (ids, ids)).backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters()))
    out = diag.compute(ctx)
    assert (out.settings["source"], own.settings["source"]) == ("training_forward", "extra_forward")
    got = {(r.metric, r.key): r.value for r in out.records}
    want = {(r.metric, r.key): r.value for r in own.records}
    assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], abs=1e-5) for k in want)
    # nothing observed at the next step: it falls back to its own forward
    assert diag.compute(ctx).settings["source"] == "extra_forward"
