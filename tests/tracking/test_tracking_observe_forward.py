"""The Monitor measures layer-input diagnostics on the user's training forward when it can."""

import contextlib
import time

import torch
from torch import nn

from diagnostics.metrics.base import Diagnostic
from diagnostics.metrics.spectral_alignment import SpectralAlignment
from diagnostics.store import open_run
from diagnostics.store.records import Record
from diagnostics.tracking import Monitor
from diagnostics.zoo.models import TinyGPT


def _lm_loss(model, batch):
    x, y = batch
    out = model(x)
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _train(run, observe, steps=6, forward=True):
    torch.manual_seed(0)
    model = TinyGPT(d_model=16, n_heads=2, n_layers=1, block_size=8, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    sa = SpectralAlignment()
    sources, hooks_between = [], []
    losses = []
    with Monitor(model, _lm_loss, run=run, diagnostics=[sa], optimizer=opt, strict=True,
                 observe_training_forward=observe) as mon:
        for step in range(steps):
            batch = (torch.randint(0, 96, (4, 8), generator=g), torch.randint(0, 96, (4, 8), generator=g))
            hooks_between.append(_hooks(model))
            loss = _lm_loss(model, batch) if forward else torch.tensor(0.0)
            if forward:
                opt.zero_grad()
                loss.backward()
            mon.step(step, batch, loss)
            sources.append(sa.last_source)
            losses.append(float(loss.detach()))
            if forward:
                opt.step()
    return model, sources, hooks_between, losses, torch.rand(3)


def test_training_forward_observed_training_unchanged_and_no_hooks_left(tmp_path):
    plain, s0, h0, l0, r0 = _train(tmp_path / "a", observe=False)
    model, s1, h1, l1, r1 = _train(tmp_path / "b", observe=True)
    assert s0 == ["extra_forward"] * 6
    # first probe has no v1 yet: its own forward; then the training forward of each step
    assert s1 == ["extra_forward"] + ["training_forward"] * 5
    assert h0 == [0] * 6 and h1[0] == 0 and all(h > 0 for h in h1[1:])  # hooks only between steps
    assert _hooks(model) == 0  # removed by close()
    assert l0 == l1 and torch.equal(r0, r1)  # same losses, global RNG untouched
    for (n, p), (_, q) in zip(plain.named_parameters(), model.named_parameters()):
        assert torch.equal(p, q), n
    s = open_run(tmp_path / "b").series("sa_sign_diversity")
    assert set(s["step"]) == set(range(6)) and s["value"].between(0, 1).all()


def test_falls_back_to_its_own_forward_when_no_forward_ran(tmp_path):
    model, sources, _, _, _ = _train(tmp_path / "c", observe=True, steps=3, forward=False)
    assert sources == ["extra_forward"] * 3
    assert _hooks(model) == 0


def test_hooks_removed_when_close_follows_a_step_directly(tmp_path):
    model = TinyGPT(d_model=16, n_heads=2, n_layers=1, block_size=8, seed=0)
    batch = (torch.randint(0, 96, (2, 8)), torch.randint(0, 96, (2, 8)))
    mon = Monitor(model, _lm_loss, run=tmp_path / "d", diagnostics=["spectral_alignment"])
    mon.step(0, batch, _lm_loss(model, batch))
    assert _hooks(model) > 0
    mon.close()
    assert _hooks(model) == 0


# Long beside a step of the tiny model here (a few ms) even on a loaded machine.
SLOW_HOOK_SECONDS = 0.5


class _SlowObserver(Diagnostic):
    """Reads activations on the training forward through a hook that takes SLOW_HOOK_SECONDS."""

    name = "slow_observer"
    requires = frozenset({"activations"})
    default_every = 1
    budgeted = False

    def observe_training_forward(self, model):
        @contextlib.contextmanager
        def hooked():
            slow = self.hook_clock.wrap(lambda *_: time.sleep(SLOW_HOOK_SECONDS))
            handle = model.register_forward_hook(slow)
            try:
                yield
            finally:
                handle.remove()

        return hooked()

    def compute(self, ctx):
        return [Record("slow_observer_value", 1.0)]


def test_hook_time_on_the_training_forward_is_the_diagnostics_not_training(tmp_path):
    model = TinyGPT(d_model=16, n_heads=2, n_layers=1, block_size=8, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    slow = _SlowObserver()
    with Monitor(model, _lm_loss, run=tmp_path / "r", diagnostics=[slow], optimizer=opt, budget=0.05,
                 every={"slow_observer": 1}) as mon:
        for step in range(5):
            batch = (torch.randint(0, 96, (4, 8), generator=g), torch.randint(0, 96, (4, 8), generator=g))
            opt.zero_grad()
            _lm_loss(model, batch).backward()
            opt.step()
            mon.step(step, batch)
        history = list(mon._budget._history)  # (step, steps since the last call, training s, monitor s)
        # The hook's time in each observed forward is not training time (a step here takes a few ms) but the
        # monitor's, at the call after it.
        assert [h[0] for h in history] == [0, 1, 2, 3]
        assert history[0][3] < SLOW_HOOK_SECONDS and all(h[3] >= SLOW_HOOK_SECONDS for h in history[1:])
        assert all(h[2] < SLOW_HOOK_SECONDS for h in history)
        assert mon._budget.overhead() > 1.0
    assert _hooks(model) == 0
    s = open_run(tmp_path / "r").series("monitor_seconds")
    s = s[s.key == "slow_observer"].set_index("step")["value"]
    # The diagnostic's stored cost holds it too, from step 1 (step 0 had no observed forward).
    assert s.loc[0] < SLOW_HOOK_SECONDS and (s.loc[1:] >= SLOW_HOOK_SECONDS).all() and len(s) == 5


def test_hook_clock_adds_up_the_wrapped_hooks_time_and_restarts_on_take():
    from diagnostics._hooks import HookClock

    clock = HookClock()
    hook = clock.wrap(lambda x: time.sleep(0.05) or x + 1)
    assert hook(1) == 2 and hook(2) == 3
    assert clock.take() >= 0.1
    assert clock.take() == 0.0
    failing = clock.wrap(lambda: time.sleep(0.05) or 1 / 0)
    with contextlib.suppress(ZeroDivisionError):
        failing()
    assert clock.take() >= 0.05  # counted even when the hook raises


def _hook_objects(model):
    return [h for m in model.modules() for h in m._forward_pre_hooks.values()]


def test_observing_hooks_are_registered_once_disarmed_between_forwards_and_released():
    model = TinyGPT(d_model=16, n_heads=2, n_layers=1, block_size=8, seed=0)
    x = torch.randint(0, 96, (2, 8))
    batch = (x, torch.randint(0, 96, (2, 8)))
    sa = SpectralAlignment()
    sa.compute(_ctx_for(model, batch))  # the first probe finds v_1 (its own forward)
    with sa.observe_training_forward(model):
        model(x)
    first = _hook_objects(model)
    assert first and sa.reads_only  # rows kept from the observed forward
    sa.compute(_ctx_for(model, batch, step=1))
    with sa.observe_training_forward(model):
        model(x)
    assert _hook_objects(model) == first  # the same hooks, not registered again
    projectors = sa._watched[2]
    kept = {name: p.count for name, p in projectors.items()}
    model(x)  # a forward after the block (e.g. another diagnostic's inside monitor.step): nothing kept
    assert {name: p.count for name, p in projectors.items()} == kept
    sa.release_hooks()
    assert _hooks(model) == 0
    sa.release_hooks()  # idempotent


def test_a_diagnostic_that_stops_observing_loses_its_hooks():
    from diagnostics.tracking.runner import observe_training_forward

    model = TinyGPT(d_model=16, n_heads=2, n_layers=1, block_size=8, seed=0)
    x = torch.randint(0, 96, (2, 8))
    sa = SpectralAlignment()
    sa.compute(_ctx_for(model, (x, x)))
    stack = observe_training_forward(model, [sa], 0, due_next=lambda d, s: True)
    model(x)
    stack.close()
    assert _hooks(model) > 0  # kept, disarmed, for the next step
    assert observe_training_forward(model, [sa], 1, due_next=lambda d, s: False) is None
    assert _hooks(model) == 0


def _ctx_for(model, batch, step=0):
    from diagnostics.metrics.context import StepContext

    return StepContext(model=model, step=step, batch=batch, loss_fn=_lm_loss, loss=None)


def _validate(model, held_out, step):
    """A validation forward over other data, as a loop that validates between steps runs it: under no_grad,
    under inference_mode, or in eval mode with gradients enabled (no no_grad), in turn."""
    kind = step % 3
    model.eval()
    with torch.no_grad() if kind == 0 else torch.inference_mode() if kind == 1 else contextlib.nullcontext():
        model(held_out)
    model.train()


def _train_with_evaluations(run, evaluate):
    """Six steps of a tiny GPT with spectral alignment, output logits and attention statistics at every
    step; with ``evaluate``, a validation forward (:func:`_validate`) after each update."""
    from diagnostics.metrics.attention import AttentionStatistics
    from diagnostics.metrics.logits import OutputLogits

    torch.manual_seed(0)
    model = TinyGPT(d_model=16, n_heads=2, n_layers=1, block_size=8, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    held_out = torch.randint(0, 96, (4, 8), generator=torch.Generator().manual_seed(1))
    diags = [SpectralAlignment(), OutputLogits(every=1), AttentionStatistics(every=1)]
    sources = []
    with Monitor(model, _lm_loss, run=run, diagnostics=diags, optimizer=opt, strict=True) as mon:
        for step in range(6):
            batch = (torch.randint(0, 96, (4, 8), generator=g), torch.randint(0, 96, (4, 8), generator=g))
            loss = _lm_loss(model, batch)
            opt.zero_grad()
            loss.backward()
            mon.step(step, batch, loss)
            sources.append(tuple(d.last_source for d in diags))
            opt.step()
            if evaluate:
                _validate(model, held_out, step)
    with open_run(run) as stored:
        metrics = [m for m in stored.metrics() if m != "monitor_seconds"]
        values = {m: stored.series(m)[["step", "key", "index", "value"]].reset_index(drop=True) for m in metrics}
    return sources, values


def test_a_validation_forward_between_steps_is_not_measured_in_place_of_the_training_forward(tmp_path):
    sources, plain = _train_with_evaluations(tmp_path / "plain", evaluate=False)
    sources_eval, with_eval = _train_with_evaluations(tmp_path / "eval", evaluate=True)
    assert sources_eval == sources
    assert all(s == ("training_forward",) * 3 for s in sources[1:])
    assert {"sa_mean", "output_logit_max", "attn_logit_max"} <= set(plain)
    assert plain.keys() == with_eval.keys()
    for metric, frame in plain.items():
        assert frame.equals(with_eval[metric]), metric


class _FrozenEncoder(nn.Module):
    """A trained head on an encoder the model runs under no_grad and keeps in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        self.encoder.eval()
        with torch.no_grad():
            h = torch.tanh(self.encoder(x))
        return self.head(h)


def _sa_mean_run(run, model, loss_fn, batch_size, after_step=None, **monitor_kwargs):
    """Four monitored SGD steps with spectral alignment every step (``after_step(model)`` after each
    update): the diagnostic's sources and the stored ``sa_mean`` by step and key."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(0)
    sa = SpectralAlignment()
    sources = []
    with Monitor(model, loss_fn, run=run, diagnostics=[sa], optimizer=opt, strict=True, **monitor_kwargs) as mon:
        for step in range(4):
            batch = (torch.randn(batch_size, 8, generator=g), torch.randint(0, 4, (batch_size,), generator=g))
            loss = loss_fn(model, batch)
            opt.zero_grad()
            loss.backward()
            mon.step(step, batch, loss)
            sources.append(sa.last_source)
            opt.step()
            if after_step is not None:
                after_step(model)
    with open_run(run) as stored:
        return sources, stored.series("sa_mean").set_index(["step", "key"]).value.sort_index()


def _frozen_encoder_run(run, observe):
    model = _FrozenEncoder()
    model.encoder.requires_grad_(False)
    return _sa_mean_run(run, model, _ce, 32, observe_training_forward=observe)


def _ce(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def test_a_part_the_model_runs_under_no_grad_is_measured_within_the_training_forward(tmp_path):
    own_sources, own = _frozen_encoder_run(tmp_path / "own", observe=False)
    sources, observed = _frozen_encoder_run(tmp_path / "observed", observe=True)
    assert own_sources == ["extra_forward"] * 4
    assert sources == ["extra_forward"] + ["training_forward"] * 3
    assert set(observed.index.get_level_values("key")) == {"encoder.0", "head"}
    assert list(observed.index) == list(own.index)
    # The frozen encoder's v_1 does not move, and both passes see every row of the batch (32 under the
    # token budget): the same statistics, up to the warm-started iteration's last digits. (The trained
    # head's are projected on the previous step's v_1 on the training forward, so they differ a little.)
    enc = [k == "encoder.0" for k in observed.index.get_level_values("key")]
    assert torch.allclose(torch.tensor(observed[enc].to_numpy()), torch.tensor(own[enc].to_numpy()), atol=1e-4)


class _Wrapper(nn.Module):
    """A module whose training loop calls its inner network directly, as a LightningModule's
    ``training_step`` calling ``self.net(x)`` does: the wrapper's own forward never runs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _wrapper_run(run, validate):
    held_out = torch.randn(16, 8, generator=torch.Generator().manual_seed(1)) * 10

    def loss_fn(m, batch):
        return nn.functional.cross_entropy(m.net(batch[0]), batch[1])

    def validation(model):  # a forward of the inner network alone
        with torch.no_grad():
            model.net(held_out)

    return _sa_mean_run(run, _Wrapper(), loss_fn, 16, validation if validate else None)


def test_a_submodule_called_directly_is_observed_by_its_own_state(tmp_path):
    sources, plain = _wrapper_run(tmp_path / "plain", validate=False)
    sources_validated, validated = _wrapper_run(tmp_path / "validated", validate=True)
    assert sources == sources_validated == ["extra_forward"] + ["training_forward"] * 3
    assert plain.equals(validated)
