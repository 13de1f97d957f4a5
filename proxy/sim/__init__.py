"""A simulated regional LLM backend (POP) for the demo, the tests and load benchmarks."""

from proxy.sim.pop import SimPop
from proxy.sim.state import ControlError, PopState, RequestRecord, SimCounters

__all__ = ["ControlError", "PopState", "RequestRecord", "SimCounters", "SimPop"]
