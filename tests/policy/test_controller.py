from __future__ import annotations

import pytest

from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.policy.controller import (
    CachePolicy,
    ControllerConfig,
    ControllerState,
    LinkSignals,
    initial_state,
    step,
)

CFG = ControllerConfig()
T_OPT, T_MAX = 20_000.0, 131_072.0


def signals(
    *,
    egress: float = 0.5,
    depth: int = 0,
    instances: int = 4,
    retransmit: float = 0.0,
    delay_s: float = 0.0,
) -> LinkSignals:
    return LinkSignals(egress, depth, instances, retransmit, delay_s)


def run(state: ControllerState, sig: LinkSignals, start_s: float, seconds: int, t_opt=T_OPT):
    reasons = []
    for k in range(seconds):
        decision = step(CFG, state, sig, t_opt, T_MAX, start_s + k)
        state = decision.state
        reasons.append(decision.reason)
    return state, reasons


@pytest.mark.parametrize(
    "sig",
    [
        signals(egress=0.9),
        signals(depth=8),
        signals(retransmit=0.03),
        signals(delay_s=0.6),
    ],
)
def test_each_pressure_signal_raises_the_threshold(sig: LinkSignals) -> None:
    d = step(CFG, initial_state(T_OPT, 0.0), sig, T_OPT, T_MAX, 1.0)
    assert d.reason == "raise"
    assert d.state.threshold_tokens == pytest.approx(T_OPT * CFG.raise_factor)


def test_raises_are_rate_limited_and_capped() -> None:
    state = initial_state(T_OPT, 0.0)
    d = step(CFG, state, signals(egress=0.95), T_OPT, T_MAX, 0.5)
    assert d.reason == "hold-pressure" and d.state.threshold_tokens == T_OPT
    state, _ = run(state, signals(egress=0.95), 1.0, 60)
    assert state.threshold_tokens == T_MAX


def test_lowers_only_after_settling_slowly_and_never_below_t_opt() -> None:
    state, _ = run(initial_state(T_OPT, 0.0), signals(egress=0.95), 1.0, 3)
    raised = state.threshold_tokens
    state, reasons = run(state, signals(egress=0.3), 10.0, 9)
    assert state.threshold_tokens == raised and set(reasons) == {"hold"}
    state, reasons = run(state, signals(egress=0.3), 19.0, 6)
    assert reasons.count("lower") == 1
    assert state.threshold_tokens == pytest.approx(raised / CFG.lower_factor)
    state, _ = run(state, signals(egress=0.3), 25.0, 600)
    assert state.threshold_tokens == T_OPT


def test_in_band_signals_hold_without_flapping() -> None:
    state, _ = run(initial_state(T_OPT, 0.0), signals(egress=0.9), 1.0, 2)
    raised = state.threshold_tokens
    for k in range(100):  # wander inside the hysteresis band (0.60, 0.85)
        sig = signals(egress=0.62 + 0.2 * (k % 2))
        state = step(CFG, state, sig, T_OPT, T_MAX, 10.0 + k).state
    assert state.threshold_tokens == raised


def test_follows_the_solver_up_at_once() -> None:
    d = step(CFG, initial_state(T_OPT, 0.0), signals(), 30_000.0, T_MAX, 0.1)
    assert d.reason == "snap" and d.state.threshold_tokens == 30_000.0


def test_cache_policy_switch_has_hysteresis() -> None:
    state = initial_state(T_OPT, 0.0)
    state, _ = run(state, signals(egress=0.3), 0.0, 10)
    assert state.cache_policy is CachePolicy.SCARCE
    state, _ = run(state, signals(egress=0.3), 10.0, 1)
    assert state.cache_policy is CachePolicy.ABUNDANT
    state, _ = run(state, signals(egress=0.6), 11.0, 5)
    assert state.cache_policy is CachePolicy.ABUNDANT
    state, _ = run(state, signals(egress=0.7), 16.0, 1)
    assert state.cache_policy is CachePolicy.SCARCE


def test_config_rejects_inverted_bands() -> None:
    with pytest.raises(ConfigError):
        ControllerConfig(egress_low=0.9, egress_high=0.8)
    with pytest.raises(ConfigError):
        ControllerConfig(raise_factor=1.0)
