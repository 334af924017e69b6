"""The contract every diagnostic keeps.

A diagnostic has a stable ``name``, declares what it ``requires`` from the step, answers ``is_due(step)``
and turns a :class:`~diagnostics.metrics.context.StepContext` into records. State it keeps across steps
(previous eigenvectors, EMAs, alarm counters) lives in its ``state`` dict, the one declared-state
mechanism: the Monitor saves ``state_dict()`` with the run (JSON with tensors encoded) and hands it back
to ``load_state_dict`` on resume.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from diagnostics._hooks import HookClock
from diagnostics.store.records import Event, Record, VectorRecord

if TYPE_CHECKING:  # pragma: no cover
    from diagnostics.metrics.context import StepContext

#: What a diagnostic may ask of a step. The Monitor only does the work (hooks, snapshots, extra passes)
#: that some due diagnostic requires.
REQUIREMENTS = frozenset(
    {
        "loss",  # the user's loss value for the step
        "grads",  # the .grad tensors as the user's backward left them
        "per_sample_grads",  # vmap(grad) over the step's batch
        "curvature",  # a Hessian / GGN operator on the fixed probe data
        "layer_inputs",  # inputs of chosen modules, captured by scoped forward pre-hooks
        "activations",  # outputs of chosen modules, captured by scoped forward hooks
        "update",  # the parameter change made by optimizer.step(); computed after it
        "optimizer",  # the optimizer's hyperparameters and state
    }
)

PRESETS = ("cheap", "standard", "full")


@dataclass
class Output:
    """What ``compute`` returns when a plain list of records is not enough.

    ``status`` is ``"ok"``, ``"not_converged"``, ``"failed"`` (the output carries no records),
    ``"skipped"`` (nothing was run: an input of the step is missing), ``"nothing_measured"`` (the model
    has nothing this diagnostic measures: no linear layer, no attention module) or ``"continues"`` (a run
    stopped by its per-call limit goes on at the next call; nothing stored yet). For
    ``"nothing_measured"`` ``reason`` must say what was looked for and how to fix it: the Monitor turns
    it into a ``misuse`` event and a :class:`~diagnostics.errors.MisuseWarning`, once per diagnostic.
    ``num_matvecs`` reports the cost of curvature estimates.
    """

    records: list[Record | VectorRecord] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    status: str = "ok"
    reason: str | None = None
    num_matvecs: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)


class Diagnostic(abc.ABC):
    """Base class of every diagnostic.

    Subclasses set ``name`` (a stable snake_case id: renaming it is a schema change), ``requires`` (a
    subset of :data:`REQUIREMENTS`), ``preset`` (the cheapest preset that includes it) and
    ``default_every`` (its schedule in steps), and implement :meth:`compute`.

    Cross-step state goes in ``self.state`` (a dict created here): plain Python values, lists, dicts with
    string keys and tensors, which the Monitor saves with the run and restores on resume. Anything kept
    elsewhere on the instance (caches, warm starts) is lost when a run resumes.
    """

    name: ClassVar[str]
    requires: ClassVar[frozenset[str]] = frozenset()
    preset: ClassVar[str] = "full"
    default_every: ClassVar[int] = 1
    #: Metric IDs this diagnostic may write (checked by the contract suite).
    metrics: ClassVar[tuple[str, ...]] = ()
    #: True when compute only reads tensors (no forward, no RNG): the Monitor may skip the RNG fork.
    reads_only: ClassVar[bool] = False
    #: Whether an overhead budget schedules it; None: exactly when it is not ``reads_only`` (it runs passes
    #: or decompositions of its own). A reader whose own arithmetic costs a real share of a step sets True.
    budgeted: ClassVar[bool | None] = None
    #: False when its hooks on the user's training forward (``observe_training_forward``) cost time the
    #: Monitor cannot see (spread over the forward's ops rather than in a hook it could time): an overhead
    #: budget then never holds them open, and each run takes its own, measured, forward.
    cheap_to_observe: ClassVar[bool] = True
    #: True when it reads the micro-batch gradients of the user's gradient accumulation
    #: (``StepContext.microbatch_moments``, fed by ``Monitor.microbatch``).
    uses_accumulation: ClassVar[bool] = False
    #: True when non-finite values are meaningful records rather than a failure of the estimate.
    allow_nonfinite: ClassVar[bool] = False
    #: True when a call honours ``StepContext.probe_seconds`` and continues at its next call what the
    #: limit stopped (see :attr:`unfinished_run`).
    resumable: ClassVar[bool] = False
    #: Names of diagnostics whose shared step results this one reads (through StepContext); they run first.
    after: ClassVar[tuple[str, ...]] = ()
    #: Constructor options the contract suite uses on its tiny cases (short warm-ups and the like).
    contract_options: ClassVar[dict[str, Any]] = {}
    #: What the Monitor does with this diagnostic's warning events (None: the Monitor's default).
    action: Any = None

    def __init__(self, every: int | None = None, start: int = 0) -> None:
        every = self.default_every if every is None else int(every)
        if every < 1:
            from diagnostics.errors import ConfigError

            raise ConfigError(f"{self.name}: 'every' must be a positive number of steps, got {every}")
        self.every = every
        self.start = int(start)
        #: Cross-step state saved with the run (see the class docstring).
        self.state: dict[str, Any] = {}
        #: Time of this diagnostic's hooks on the user's training forward, taken by the Monitor at its
        #: next call and charged to this diagnostic (its monitor time, not training time).
        self.hook_clock = HookClock()

    @property
    def unfinished_run(self) -> bool:
        """True while a run stopped by its per-call limit (``StepContext.probe_seconds``) waits for the
        next ``compute`` to continue it (``hessian_top``); the budget's Monitor then calls it at the next
        step."""
        return False

    def drop_unfinished(self) -> None:
        """Free an unfinished run (its basis, its copy of the parameters); the next call starts afresh.
        The Monitor calls it when it closes. Nothing to do for a diagnostic that is not resumable."""
        return None

    def release_hooks(self) -> None:
        """Remove hooks this diagnostic keeps on the model between the training forwards it observes.
        The Monitor calls it when it closes and when the diagnostic stops observing. Nothing to do for
        a diagnostic that keeps none."""
        return None

    def is_due(self, step: int) -> bool:
        """True when the schedule asks for this diagnostic at ``step``."""
        return step >= self.start and (step - self.start) % self.every == 0

    @abc.abstractmethod
    def compute(self, ctx: StepContext) -> list[Record] | Output:
        """Turn one step into records. Must leave the model, its grads and all RNG streams as found."""

    def compute_after_update(self, ctx: StepContext) -> list[Record] | Output:
        """Records that need the step's parameter update (``"update"`` in ``requires``); after optimizer.step()."""
        return []

    def settings(self) -> dict[str, Any]:
        """Estimator settings recorded in the run's metadata (schedule plus subclass options)."""
        return {"every": self.every, "start": self.start}

    def state_dict(self) -> dict[str, Any]:
        """The cross-step state, ``self.state`` itself (not a copy), for saving with the run. Cost: none."""
        return self.state

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Restore state saved by :meth:`state_dict`, merging it into ``self.state``.

        Also accepts the layout of runs saved before state lived on the diagnostic, ``{"attrs": {...},
        "ctx": {...}}``: both parts are merged. Cost: none beyond the copy of the top-level keys.
        """
        if not state:
            return
        if set(state) <= {"attrs", "ctx"} and all(isinstance(v, Mapping) or v is None for v in state.values()):
            merged = {**dict(state.get("attrs") or {}), **dict(state.get("ctx") or {})}
        else:
            merged = dict(state)
        self.state.update(merged)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(every={self.every})"
