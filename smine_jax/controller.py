"""Adaptive controller of the exclusion factor κ (method.md §3; Eqs. 7–8 of Harwood et al. 2017).

Smart mining skips every neighbour of an anchor closer than ``κ · ‖f(a) − f(p⁺ᴺᴺ)‖²`` (Eq. 6),
so κ sets how hard the mined triplets are: a larger κ skips more near negatives and the
remaining triplets are easier (lower training error e). The controller steers e towards a
target e_t by fitting the linear model κ = α·e + β (Eq. 7) by least squares to the last W
(κ, e) pairs and using κ_next = α·e_t + β (Eq. 8), clipped to [κ_min, κ_max].

Epoch schedule (method.md §2 step 5): the first ``random_epochs`` epochs train on random triplets
only; they enter the history as (κ_random, e) points, or not at all (``kappa_random=None``).
The first mining epoch uses κ₀ (``kappa_init``: a number, or ``"auto"``: calibrated from that
epoch's neighbour lists so that a share ``kappa_init_share`` of the anchors can be mined,
``calibrate_kappa``); from the second mining epoch on, κ comes from the fit
(``policy="adaptive"``) or from the manual halving schedule (``policy="manual"``, the ablation
without controller).

The signal (``error_on``): ``"all"``, the training error over every triplet of the epoch
(method.md §3 v1), or ``"mined"``, over the mined triplets only. With a share of random triplets
in every batch (~0.1 error each) the first cannot reach a target of 0.5 when half the triplets
are random, and it cannot tell "well tuned" from "nothing mined"; the second measures only what
κ controls. An epoch without a measurement (``"mined"`` and nothing mined) records no point; in
a mining epoch κ is then divided by ``degenerate_factor`` (nothing mined: κ too large for the
lists).
The state is a ``flax.struct`` pytree: array leaves for what changes (so it can live in the
train state, pass through ``jax.jit`` and be saved by orbax), the settings as a static, hashable
``ControllerConfig``. ``update`` is pure and jit-compatible; it checks a concrete training error
before anything reaches jax.

Every choice where the paper is silent (degenerate fits and their fallback, the dead band, the
trust region, the manual schedule, the random-only epochs, non-finite errors under jit) is a
``ControllerConfig`` field; what each does and why is in docs/method.md §3 ("The controller's
choices in detail").
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from smine_jax import validation

POLICIES = ("adaptive", "manual")
ERROR_SIGNALS = ("all", "mined")
AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class ControllerConfig:
    """Static settings of the κ controller; validated on construction (ValueError naming a field).

    Attributes:
      policy: "adaptive" (least-squares controller, Eqs. 7–8) or "manual" (halving schedule).
      target_error: e_t in (0, 1); the paper finds 0.5–0.75 work well.
      error_on: the signal: "all" (training error over every triplet) or "mined" (over the
        mined triplets only; no point where nothing was mined).
      window: W >= 2, number of recent (κ, e) pairs in the least-squares fit.
      kappa_init: κ₀, the κ of the first mining epoch (the paper advises starting large), or
        "auto": calibrated at the first mining epoch (``calibrate_kappa``), clipped.
      kappa_init_share: q of "auto": the share of anchors with a valid negative at κ₀.
      kappa_random: κ recorded for the random-only epochs; None: they record no point.
      kappa_min, kappa_max: clip range of every κ the controller sets for a mining epoch.
      random_epochs: epochs of random triplets before mining starts (default 2).
      degenerate_factor: > 1, multiplicative step of κ when the fit is degenerate.
      min_slope: |α| below this counts as a degenerate fit (κ units per unit of error).
      negative_slope_only: also treat α > 0 as degenerate (docs/method.md §3).
      tolerance: a degenerate fit keeps κ while |e − e_t| <= tolerance (dead band).
      max_step_factor: trust region of the fit: κ_next within [κ / f, κ · f] of the κ just
        used; None: no limit.
      manual_halve_every: manual policy: mining epochs between halvings of κ.
    """

    # target_error, error_on, kappa_init and kappa_random: the winner of the validation study
    # (benchmarks/SMART_STUDY.md); the first version's values are the `smart_v1` variant.
    policy: str = "adaptive"
    target_error: float = 0.6
    error_on: str = "mined"
    window: int = 3
    kappa_init: float | str = "auto"
    kappa_init_share: float = 0.5
    kappa_random: float | None = None
    kappa_min: float = 1.0
    kappa_max: float = 64.0
    random_epochs: int = 2
    degenerate_factor: float = 2.0
    min_slope: float = 1.0
    negative_slope_only: bool = True
    tolerance: float = 0.05
    max_step_factor: float | None = None
    manual_halve_every: int = 3

    def __post_init__(self):
        for name in ("target_error", "kappa_init_share", "kappa_min", "kappa_max",
                     "degenerate_factor", "min_slope", "tolerance"):
            self._set(name, _as_float(name, getattr(self, name)))
        for name in ("window", "random_epochs", "manual_halve_every"):
            self._set(name, validation.integer(getattr(self, name), name, whole_floats=True))
        for name in ("kappa_random", "max_step_factor"):
            if getattr(self, name) is not None:
                self._set(name, _as_float(name, getattr(self, name)))
        if self.kappa_init != AUTO:
            self._set("kappa_init", _as_float(
                "kappa_init", self.kappa_init, expected=f"a real number or {AUTO!r}"))
        if not isinstance(self.negative_slope_only, (bool, np.bool_)):
            raise ValueError(
                f"negative_slope_only: expected True or False, got {self.negative_slope_only!r}")
        self._set("negative_slope_only", bool(self.negative_slope_only))
        if self.policy not in POLICIES:
            raise ValueError(f"policy: expected one of {POLICIES}, got {self.policy!r}")
        if self.error_on not in ERROR_SIGNALS:
            raise ValueError(f"error_on: expected one of {ERROR_SIGNALS}, got {self.error_on!r}")
        _require(0.0 < self.target_error < 1.0, "target_error", "must lie in (0, 1)", self)
        _require(0.0 < self.kappa_init_share <= 1.0, "kappa_init_share", "must lie in (0, 1]",
                 self)
        _require(self.window >= 2, "window", "must be >= 2 (a line needs two points)", self)
        _require(self.kappa_min > 0.0, "kappa_min", "must be > 0", self)
        _require(self.kappa_max >= self.kappa_min, "kappa_max",
                 f"must be >= kappa_min = {self.kappa_min}", self)
        _require(self.kappa_init == AUTO or self.kappa_min <= self.kappa_init <= self.kappa_max,
                 "kappa_init", f"must be {AUTO!r} or lie in [kappa_min, kappa_max] = "
                 f"[{self.kappa_min}, {self.kappa_max}]", self)
        _require(self.kappa_random is None or self.kappa_random > 0.0, "kappa_random",
                 "must be > 0 or None", self)
        _require(self.random_epochs >= 0, "random_epochs", "must be >= 0", self)
        _require(self.degenerate_factor > 1.0, "degenerate_factor", "must be > 1", self)
        _require(self.min_slope >= 0.0, "min_slope", "must be >= 0", self)
        _require(0.0 <= self.tolerance < min(self.target_error, 1.0 - self.target_error),
                 "tolerance", "must lie in [0, min(target_error, 1 - target_error))", self)
        _require(self.max_step_factor is None or self.max_step_factor >= 1.0,
                 "max_step_factor", "must be >= 1 or None", self)
        _require(self.manual_halve_every >= 1, "manual_halve_every", "must be >= 1", self)

    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)


def _require(condition: bool, name: str, expectation: str, config: ControllerConfig) -> None:
    if not condition:
        raise ValueError(f"{name}: {expectation}, got {getattr(config, name)!r}")


def _as_float(name: str, value, expected: str = "a real number") -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


@struct.dataclass
class ControllerState:
    """Controller state (a pytree). Leaves are jax arrays; ``config`` is static.

    Attributes:
      kappa: f32[], the κ to use in the next epoch (NaN before the first mining epoch of
        ``kappa_init="auto"`` until ``set_initial_kappa`` calibrates it).
      kappa_start: f32[], κ₀ of the first mining epoch (NaN until calibrated for "auto"); the
        manual schedule halves it.
      epoch: i32[], epochs completed so far (0 after ``init``); the next epoch is ``epoch + 1``.
      kappas, errors: f32[W], recorded (κ used, training error) pairs, oldest first; only the
        last ``count`` entries are valid (the rest are zero).
      count: i32[], valid entries in the history (at most W).
      slope, intercept: f32[], the last least-squares fit κ = α·e + β (NaN when undefined:
        fewer than two points or all errors equal).
      used_fit: bool[], whether ``kappa`` came from the fit (False: schedule or fallback).
      config: the static ``ControllerConfig``.
    """

    kappa: jax.Array
    kappa_start: jax.Array
    epoch: jax.Array
    kappas: jax.Array
    errors: jax.Array
    count: jax.Array
    slope: jax.Array
    intercept: jax.Array
    used_fit: jax.Array
    config: ControllerConfig = struct.field(pytree_node=False)

    @property
    def mining(self) -> jax.Array:
        """bool[]: whether the next epoch mines (its 1-based index exceeds ``random_epochs``)."""
        return self.epoch >= self.config.random_epochs


def init(config=None, **overrides) -> ControllerState:
    """The κ controller's state before the first epoch (method.md §3), from a config or keywords.

    The trainer keeps the state in its train state and calls ``update`` after every epoch;
    ``state.kappa`` is the κ to mine the next epoch with. Host-side (the settings become the
    static ``ControllerConfig``); the result is a pytree that passes through ``jax.jit``.

    Args:
      config: the settings: a ``ControllerConfig``, an ``ml_collections.ConfigDict`` (e.g.
        ``config.controller``), a mapping of ``ControllerConfig`` field names to values, or None
        (all defaults). Never traced.
      **overrides: ``ControllerConfig`` fields by name (policy, target_error, error_on, window,
        kappa_init, kappa_init_share, kappa_random, kappa_min, kappa_max, random_epochs,
        degenerate_factor, min_slope, negative_slope_only, tolerance, max_step_factor,
        manual_halve_every); they take precedence over ``config``.

    Returns:
      ``ControllerState`` (a ``flax.struct`` pytree) with epoch = 0, an empty history and
      ``kappa`` the κ of epoch 1 (``kappa_random``, or ``kappa_max`` when that is None, if
      ``random_epochs`` > 0; else κ₀, NaN for ``kappa_init="auto"`` until ``set_initial_kappa``).
      Fields:
        kappa: f32[] the κ of the next epoch;
        kappa_start: f32[] κ₀ of the first mining epoch (NaN until calibrated for "auto");
        epoch: i32[] epochs completed;
        kappas, errors: f32[W] the recorded (κ, e) history, oldest first (W = ``window``);
        count: i32[] valid history entries (the last ``count``), at most W;
        slope, intercept: f32[] the last least-squares fit κ = α·e + β (NaN when undefined);
        used_fit: bool[] whether ``kappa`` came from the fit;
        config: the static ``ControllerConfig``.

    Raises:
      ValueError: ``config`` of another type, or unknown field names (all of them are listed);
        an invalid value, naming the field (e.g. ``target_error`` outside (0, 1), ``window`` < 2,
        ``kappa_max`` < ``kappa_min``, ``policy`` not "adaptive" or "manual").

    Example:
      >>> from smine_jax import controller
      >>> state = controller.init(kappa_init=16.0, random_epochs=0)
      >>> float(state.kappa), int(state.epoch)
      (16.0, 0)
    """
    if isinstance(config, ControllerConfig):
        fields = dataclasses.asdict(config)
    elif config is None:
        fields = {}
    elif hasattr(config, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
        fields = dict(config.to_dict())
    elif isinstance(config, Mapping):
        fields = dict(config)
    else:
        raise ValueError(
            f"config: expected a ControllerConfig, ConfigDict, mapping or None, got "
            f"{type(config).__name__}")
    fields.update(overrides)
    known = {field.name for field in dataclasses.fields(ControllerConfig)}
    unknown = sorted(str(name) for name in set(fields) - known)
    if unknown:
        raise ValueError(
            f"config: unknown controller field(s) {unknown}; known fields: {sorted(known)}")
    config = ControllerConfig(**fields)
    epoch = jnp.zeros((), jnp.int32)
    nan = jnp.full((), jnp.nan, jnp.float32)
    kappa_start = nan if config.kappa_init == AUTO else jnp.float32(config.kappa_init)
    return ControllerState(
        kappa=_scheduled_kappa(config, epoch, mined_kappa=kappa_start, kappa_start=kappa_start),
        kappa_start=kappa_start,
        epoch=epoch,
        kappas=jnp.zeros((config.window,), jnp.float32),
        errors=jnp.zeros((config.window,), jnp.float32),
        count=jnp.zeros((), jnp.int32),
        slope=nan,
        intercept=nan,
        used_fit=jnp.zeros((), bool),
        config=config,
    )


def _check_error(name: str, value) -> None:
    """ValueError naming ``name`` unless a concrete value is a finite scalar in [0, 1]."""
    if not validation.is_concrete(value):
        if jnp.shape(value) != ():
            raise ValueError(f"{name}: expected a scalar, got shape {jnp.shape(value)}")
        return
    array = np.asarray(value)
    if array.shape != ():
        raise ValueError(f"{name}: expected a scalar, got shape {array.shape}")
    if array.dtype == bool or not (
            np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{name}: expected a real number, got dtype {array.dtype}")
    if not np.isfinite(array):
        raise ValueError(f"{name}: expected a finite number, got {array}")
    if not 0.0 <= array <= 1.0:
        raise ValueError(f"{name}: expected a fraction of triplets in [0, 1], got {array}")


def update(state: ControllerState, training_error, mined_error=None) -> ControllerState:
    """Records the finished epoch's (κ, error) and sets ``state.kappa`` for the next (method.md §3).

    Call it once after every epoch, random-only epochs included. In a mining epoch of the
    adaptive policy, κ_next comes from the least-squares line κ = α·e + β (Eq. 7) through the last
    W (κ, e) points, evaluated at the target error (Eq. 8) and clipped to [kappa_min, kappa_max];
    a degenerate fit steps κ by ``degenerate_factor`` towards the target instead. Pure and
    jit-compatible: ``training_error`` and ``mined_error`` may be traced (then a non-finite error
    is left out of the history and κ kept instead of raising).

    Args:
      state: the ``ControllerState`` the finished epoch used (from ``init`` or the previous
        ``update``; its ``kappa`` is the κ recorded, ``kappa_random`` for a random-only epoch).
      training_error: scalar in [0, 1] (Python float or f32[]), the epoch's training error: the
        fraction of triplets with J_t > 0 (method.md §1), averaged over the epoch's batches. The
        signal of ``error_on="all"``.
      mined_error: scalar in [0, 1] or None: the same fraction over the epoch's mined triplets
        only, or None when nothing was mined (with ``error_on="mined"`` no point is then recorded
        and κ is lowered). The signal of ``error_on="mined"``. None versus a value is a static
        (Python-level) choice under jit.

    Returns:
      A new ``ControllerState`` (the input is not modified): epoch + 1, the history extended by
      the (κ used, signal) point when one was measured, the new fit and κ. Fields:
        kappa: f32[] the κ of the next epoch;
        kappa_start: f32[] κ₀ of the first mining epoch (NaN until calibrated for "auto");
        epoch: i32[] epochs completed;
        kappas, errors: f32[W] the recorded (κ, e) history, oldest first (W = ``window``);
        count: i32[] valid history entries (the last ``count``), at most W;
        slope, intercept: f32[] the last least-squares fit κ = α·e + β (NaN when undefined);
        used_fit: bool[] whether ``kappa`` came from the fit;
        config: the static ``ControllerConfig``.

    Raises:
      ValueError: ``state`` not a ``ControllerState``; ``training_error`` or ``mined_error`` not a
        scalar, or (concrete values only) not a finite real number in [0, 1].

    Example:
      >>> from smine_jax import controller
      >>> state = controller.init(kappa_init=16.0, random_epochs=0)
      >>> state = controller.update(state, training_error=0.4, mined_error=0.9)
      >>> int(state.epoch), float(state.kappa)
      (1, 32.0)
    """
    if not isinstance(state, ControllerState):
        raise ValueError(f"state: expected a ControllerState, got {type(state).__name__}")
    _check_error("training_error", training_error)
    if mined_error is not None:
        _check_error("mined_error", mined_error)
    signal = mined_error if state.config.error_on == "mined" else training_error
    measured = signal is not None
    return _update_jit(state, jnp.asarray(signal if measured else jnp.nan, jnp.float32),
                       jnp.asarray(measured))


def least_squares_line(kappas, errors, count):
    """Fits κ = α·e + β (Eq. 7) to the last ``count`` entries of the [W] histories.

    Closed form on the masked window (jit-compatible): α = Sₑκ / Sₑₑ, β = κ̄ − α·ē with centred
    sums over the valid entries. Returns (α, β), NaN where the line is undefined (fewer than
    two points or all errors equal).
    """
    kappas = jnp.asarray(kappas, jnp.float32)
    errors = jnp.asarray(errors, jnp.float32)
    valid = _window_mask(kappas.shape[-1], count)
    num_valid = jnp.sum(valid).astype(jnp.float32)
    safe_num = jnp.maximum(num_valid, 1.0)
    error_mean = jnp.sum(jnp.where(valid, errors, 0.0)) / safe_num
    kappa_mean = jnp.sum(jnp.where(valid, kappas, 0.0)) / safe_num
    error_dev = jnp.where(valid, errors - error_mean, 0.0)
    kappa_dev = jnp.where(valid, kappas - kappa_mean, 0.0)
    error_var = jnp.sum(error_dev * error_dev)
    covariance = jnp.sum(error_dev * kappa_dev)
    defined = (num_valid >= 2.0) & (error_var > 0.0)
    slope = jnp.where(defined, covariance / jnp.where(defined, error_var, 1.0), jnp.nan)
    intercept = kappa_mean - slope * error_mean
    return slope, intercept


def _window_mask(window: int, count):
    """bool[W]: the valid (most recent ``count``) entries of a history stored oldest first."""
    return jnp.arange(window) >= window - count


def _scheduled_kappa(config: ControllerConfig, epochs_done, mined_kappa, kappa_start):
    """κ for epoch ``epochs_done + 1``: κ_random, κ₀ for the first mining epoch, else mined."""
    random_kappa = config.kappa_max if config.kappa_random is None else config.kappa_random
    return jnp.where(
        epochs_done < config.random_epochs,
        jnp.float32(random_kappa),
        jnp.where(epochs_done == config.random_epochs, kappa_start,
                  jnp.clip(mined_kappa, config.kappa_min, config.kappa_max)),
    ).astype(jnp.float32)


def _manual_kappa(config: ControllerConfig, epochs_done, kappa_start):
    """κ₀ halved every ``manual_halve_every`` mining epochs, from the first mining epoch on."""
    mining_index = jnp.maximum(epochs_done - config.random_epochs, 0)
    halvings = (mining_index // config.manual_halve_every).astype(jnp.float32)
    return kappa_start * jnp.exp2(-halvings)


def _update_arrays(state: ControllerState, error, measured):
    config = state.config
    finite = jnp.isfinite(error)
    record = measured & finite
    if config.kappa_random is None:  # random-only epochs enter no fit
        record &= state.epoch >= config.random_epochs
    kappa_used = state.kappa
    kappas = jnp.where(record, jnp.append(state.kappas[1:], kappa_used), state.kappas)
    errors = jnp.where(record, jnp.append(state.errors[1:], error), state.errors)
    count = jnp.where(record, jnp.minimum(state.count + 1, config.window), state.count)
    epochs_done = state.epoch + 1
    slope, intercept = least_squares_line(kappas, errors, count)
    if config.policy == "adaptive":
        valid = _window_mask(config.window, count)
        kappa_spread = (jnp.max(jnp.where(valid, kappas, -jnp.inf))
                        - jnp.min(jnp.where(valid, kappas, jnp.inf)))
        fit_ok = (record & (kappa_spread > 0.0) & jnp.isfinite(slope)
                  & jnp.isfinite(intercept) & (jnp.abs(slope) >= config.min_slope))
        if config.negative_slope_only:
            fit_ok &= slope < 0.0
        kappa_fit = slope * config.target_error + intercept
        if config.max_step_factor is not None:
            kappa_fit = jnp.clip(kappa_fit, kappa_used / config.max_step_factor,
                                 kappa_used * config.max_step_factor)
        too_hard = error > config.target_error + config.tolerance
        too_easy = error < config.target_error - config.tolerance
        step = jnp.where(too_hard, config.degenerate_factor,
                         jnp.where(too_easy, 1.0 / config.degenerate_factor, 1.0))
        # A NaN error is neither too hard nor too easy: step 1, κ kept. No measurement (nothing
        # mined): κ too large for the lists, so it is lowered.
        step = jnp.where(measured, step, 1.0 / config.degenerate_factor)
        mined_kappa = jnp.where(fit_ok, kappa_fit, kappa_used * step)
    else:
        fit_ok = jnp.zeros((), bool)
        mined_kappa = _manual_kappa(config, epochs_done, state.kappa_start)
    return state.replace(
        kappa=_scheduled_kappa(config, epochs_done, mined_kappa, state.kappa_start),
        epoch=epochs_done,
        kappas=kappas,
        errors=errors,
        count=count.astype(jnp.int32),
        slope=slope.astype(jnp.float32),
        intercept=intercept.astype(jnp.float32),
        used_fit=fit_ok & (epochs_done > config.random_epochs),
    )


_update_jit = jax.jit(_update_arrays)


# ----------------------------------------------------------------------------------------------
# κ₀ from the neighbour lists (method.md §3, kappa_init="auto").


def needs_initial_kappa(state: ControllerState) -> bool:
    """Whether the next epoch is the first mining epoch of ``kappa_init="auto"`` and κ₀ is not
    set yet: it must come from ``set_initial_kappa`` before the epoch mines (host-side; the
    state must be concrete)."""
    return (state.config.kappa_init == AUTO
            and int(state.epoch) == state.config.random_epochs
            and bool(np.isnan(np.asarray(state.kappa_start))))


def set_initial_kappa(state: ControllerState, kappa) -> ControllerState:
    """The state with κ₀ = ``kappa`` as the next epoch's κ and the start of the manual schedule.

    Used once, at the first mining epoch of ``kappa_init="auto"`` (see ``needs_initial_kappa``),
    with the κ₀ of ``calibrate_kappa``.

    Args:
      state: a ``ControllerState``.
      kappa: κ₀, a scalar (Python float or f32[]); clipped to [kappa_min, kappa_max], a NaN
        becomes kappa_max (+inf clips to kappa_max).

    Returns:
      ``ControllerState`` with ``kappa`` and ``kappa_start`` set to the clipped f32[] κ₀.
    """
    config = state.config
    kappa = jnp.asarray(kappa, jnp.float32)
    kappa = jnp.where(jnp.isnan(kappa), config.kappa_max,
                      jnp.clip(kappa, config.kappa_min, config.kappa_max)).astype(jnp.float32)
    return state.replace(kappa=kappa, kappa_start=kappa)


def kappa_for_share(ratios, share):
    """f32[]: the largest κ at which a share ``share`` of the anchors has ``ratio >= κ``.

    The step of ``calibrate_kappa`` after ``mining.boundary_ratios``. Jit-compatible.

    Args:
      ratios: f32[A] per-anchor ratios from ``mining.boundary_ratios`` (any shape is flattened).
      share: q in (0, 1] (may be traced; not checked here).

    Returns:
      f32[] the ⌈share · A⌉-th largest ratio; 0 for A = 0.
    """
    ratios = jnp.asarray(ratios, jnp.float32).reshape(-1)
    if ratios.shape[0] == 0:
        return jnp.float32(0.0)
    descending = -jnp.sort(-ratios)
    rank = jnp.ceil(jnp.asarray(share, jnp.float32) * ratios.shape[0]).astype(jnp.int32) - 1
    return descending[jnp.clip(rank, 0, ratios.shape[0] - 1)]


def calibrate_kappa(neighbour_ids, neighbour_sq_dists, labels, *, share=0.5, anchor_ids=None,
                    chunk_size: int = 2048):
    """κ₀ such that a share ``share`` of the anchors has a valid negative (method.md §3).

    The first mining epoch's κ for ``kappa_init="auto"``: per anchor, the largest κ at which its
    list still holds a valid negative is r = d²(farthest negative after p⁺ᴺᴺ) / d²(p⁺ᴺᴺ)
    (``mining.boundary_ratios``; 0 without p⁺ᴺᴺ or a negative after it); κ₀ is the largest κ with
    a share ``share`` of the anchors at r >= κ, i.e. the ⌈share · A⌉-th largest r. Not clipped
    (``set_initial_kappa`` clips). r grows with the list length k, so k and κ₀ are chosen
    together. Pure and jit-compatible.

    Args:
      neighbour_ids: int[A, k], k >= 1 (any integer dtype, used as int32), row r the k nearest
        OTHER samples of anchor ``anchor_ids[r]`` (of sample r when ``anchor_ids`` is None, then
        A = N), ascending by distance: the ``ids`` of ``index.neighbours``. Ids in [0, N), never
        the row's own anchor. May be traced.
      neighbour_sq_dists: float[A, k] (used as float32) squared Euclidean distances of those
        entries: same shape as ``neighbour_ids``, finite, each row ascending. May be traced.
      labels: int[N] class labels of all N training samples (arbitrary integers). Concrete labels
        need N >= 3, two classes and a class of >= 2 samples; traced labels are unchecked.
      share: q in (0, 1], the share of anchors that must keep a valid negative: a Python or
        numpy float (checked), or a traced f32[] under jit (unchecked).
      anchor_ids: optional int[A] sample ids in [0, N) of the rows (default None: row r is sample
        r), e.g. one process's anchors.
      chunk_size: anchor rows processed together, >= 1 (static Python int); no effect on the
        result.

    Returns:
      f32[] κ₀ >= 0: 0 when fewer than a share ``share`` of the anchors have any valid negative
      (and for A = 0); +inf when that anchor's p⁺ᴺᴺ is a duplicate (d² = 0).

    Raises:
      ValueError: naming the argument: ``share`` outside (0, 1] or not a real number;
        ``neighbour_ids`` not a 2-D integer array, an id outside [0, N) or a row listing its own
        anchor, or A != N without ``anchor_ids``; ``neighbour_sq_dists`` of another shape, not
        float, not finite or not ascending; ``labels`` not 1-D integer or without two classes and
        a class of two; ``anchor_ids`` not of shape [A] or outside [0, N). Value checks run on
        concrete inputs only.

    Example:
      >>> import numpy as np
      >>> from smine_jax import controller
      >>> ids = np.array([[1, 2], [0, 2], [1, 0]])
      >>> sq_dists = np.array([[1.0, 4.0], [1.0, 2.0], [2.0, 4.0]])
      >>> float(controller.calibrate_kappa(ids, sq_dists, np.array([0, 0, 1]), share=0.5))
      2.0
    """
    from smine_jax import mining

    if validation.is_concrete(share):
        value = _as_float("share", share)
        if not 0.0 < value <= 1.0:
            raise ValueError(f"share: expected a value in (0, 1], got {value}")
    ratios = mining.boundary_ratios(neighbour_ids, neighbour_sq_dists, labels,
                                    anchor_ids=anchor_ids, chunk_size=chunk_size)
    return kappa_for_share(ratios, share)
