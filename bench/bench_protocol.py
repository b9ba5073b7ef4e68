"""Micro-benchmarks of the hot path: header encode/decode and one routing decision.

``python -m pytest bench/bench_protocol.py`` (pytest-benchmark; not part of the test suite).
"""

from __future__ import annotations

import pytest

from wire.tasks import Assignment, decode, Dispatch, encode, ResultItem, Results, Submit, TaskSpec
from broker.config import POLICIES
from broker.engine.model import AgentRecord
from broker.engine.routing import make_policy

SIZES = [16, 100, 1024, 8192]


def _submit(size: int, count: int) -> Submit:
    return Submit([TaskSpec(f"client-1-{i}", b"x" * size, ("echo",), None, 0, 30.0, None, None)
                   for i in range(count)])


@pytest.mark.parametrize("size", SIZES)
def test_encode_submit_batch(benchmark, size: int) -> None:  # type: ignore[no-untyped-def]
    msg = _submit(size, 128)
    benchmark.group = "encode 128 tasks"
    benchmark(encode, msg)


@pytest.mark.parametrize("size", SIZES)
def test_decode_submit_batch(benchmark, size: int) -> None:  # type: ignore[no-untyped-def]
    frames = encode(_submit(size, 128))
    benchmark.group = "decode 128 tasks"
    benchmark(decode, frames)


def test_decode_results_batch(benchmark) -> None:  # type: ignore[no-untyped-def]
    frames = encode(Results([ResultItem(f"t{i}", "succeeded", b"x" * 100, run_ms=0.1)
                             for i in range(128)]))
    benchmark(decode, frames)


def test_encode_dispatch_single(benchmark) -> None:  # type: ignore[no-untyped-def]
    msg = Dispatch([Assignment("t1", b"x" * 100, 1, 30.0, ("echo",), None)])
    benchmark(encode, msg)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("agents", [2, 16])
def test_routing_decision(benchmark, policy: str, agents: int) -> None:  # type: ignore[no-untyped-def]
    chooser = make_policy(policy)
    candidates = [AgentRecord(f"a{i}".encode(), f"a{i}", "echo", frozenset({"echo"}), 16,
                              0.0, 0.0, 0.0) for i in range(agents)]
    benchmark.group = f"route among {agents} agents"
    benchmark(chooser.choose, candidates)
