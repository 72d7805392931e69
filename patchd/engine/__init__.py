"""The rollout engine: runs of groups, the per-target state machine, staged promotion.

Pure of clocks and I/O of its own: it is given the clock, the backend, the store and the
window gate, so its tests run without sleeping.
"""

from patchd.engine.rollout import GateResult, RunRequest, RunResult, dependency_order, run_group
from patchd.engine.stages import StageGate, stage_gate
from patchd.engine.target import NullObserver, Observer, TargetOutcome, patch_target

__all__ = [
    "GateResult",
    "NullObserver",
    "Observer",
    "RunRequest",
    "RunResult",
    "StageGate",
    "TargetOutcome",
    "dependency_order",
    "patch_target",
    "run_group",
    "stage_gate",
]
