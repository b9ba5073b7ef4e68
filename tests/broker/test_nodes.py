"""Agent pools in the engine (no I/O): nodes report, SCALE spreads replicas, plans answer
every report, lost nodes' replicas move, a returning node gives its extras back, and a
drained agent's hand-back does not use a retry. Placement alone: broker/engine/placement.py."""

from __future__ import annotations

from broker.engine.engine import Engine
from broker.engine.placement import NodeView, place
from tests.broker.support import make_engine, register, run_pass, submit
from wire.nodes import NodePlan, NodeReport, Scale, ScaleReply
from wire.tasks import Disconnect, Dispatch, Error

ADMIN = b"admin-client"


def view(node_id: str, running: dict[str, int] | None = None, cpus: int = 2,
         load: float = 0.0, catalogue: tuple[str, ...] = ("echo",),
         failing: frozenset[str] = frozenset()) -> NodeView:
    return NodeView(node_id, frozenset(catalogue), running or {}, failing, cpus, load)


def test_placement_spreads_then_prefers_free_cpu_and_stays_put() -> None:
    nodes = [view("a", load=1.5), view("b", load=0.1)]
    assert place({"echo": 1}, nodes, {}) == {"a": {"echo": 0}, "b": {"echo": 1}}
    assert place({"echo": 5}, nodes, {}) == {"a": {"echo": 2}, "b": {"echo": 3}}
    # Stable: a scale from 5 to 4 takes one from the node with the most.
    assert place({"echo": 4}, nodes, {"a": {"echo": 2}, "b": {"echo": 3}}) == {
        "a": {"echo": 2}, "b": {"echo": 2}}


def test_placement_skips_nodes_that_cannot_run_an_agent() -> None:
    nodes = [view("a", catalogue=("other",)), view("b", failing=frozenset({"echo"})),
             view("c")]
    assert place({"echo": 3}, nodes, {})["c"] == {"echo": 3}
    assert place({"echo": 3}, nodes[:2], {}) == {"a": {}, "b": {}}


def test_a_returning_node_gives_its_extra_replicas_back() -> None:
    # b took all 4 while a was lost; a comes back still running its 2.
    nodes = [view("a", running={"echo": 2}), view("b", running={"echo": 4})]
    assert place({"echo": 4}, nodes, {"b": {"echo": 4}}) == {
        "a": {"echo": 2}, "b": {"echo": 2}}


def report(node_id: str, running: dict[str, int] | None = None,
           catalogue: tuple[str, ...] = ("echo",)) -> NodeReport:
    return NodeReport(node_id, f"host-{node_id}", 2, 1 << 30, 0.0, catalogue, running or {})


def plans(sent: dict[bytes, list[object]], identity: bytes) -> list[NodePlan]:
    return [m for m in sent.get(identity, []) if isinstance(m, NodePlan)]


def test_scale_spreads_over_nodes_and_every_report_gets_its_plan() -> None:
    engine = make_engine()
    engine.handle(b"node-a", report("a"), 1000.0)
    engine.handle(b"node-b", report("b"), 1000.0)
    run_pass(engine, 1000.0)
    engine.handle(ADMIN, Scale(1, "echo", 4), 1000.1)
    sent = run_pass(engine, 1000.1)
    (reply,) = [m for m in sent[ADMIN] if isinstance(m, ScaleReply)]
    assert reply.desired == 4 and reply.nodes == {"a": 2, "b": 2}
    assert plans(sent, b"node-a")[-1].running == {"echo": 2}
    assert plans(sent, b"node-a")[-1].epochs == {"echo": 1}
    engine.handle(b"node-a", report("a", {"echo": 2}), 1000.2)
    assert plans(run_pass(engine, 1000.2), b"node-a")[-1].running == {"echo": 2}
    status = engine.status.document(1000.2)
    assert status["pools"]["echo"]["desired"] == 4
    assert status["pools"]["echo"]["running"] == 2
    assert {n["id"] for n in status["nodes"]} == {"a", "b"}


def test_scaling_an_agent_no_node_lists_is_an_error_naming_the_nodes() -> None:
    engine = make_engine()
    engine.handle(b"node-a", report("a"), 1000.0)
    engine.handle(ADMIN, Scale(7, "translator", 2), 1000.0)
    (error,) = [m for m in run_pass(engine, 1000.0)[ADMIN] if isinstance(m, Error)]
    assert error.code == "no_node" and error.req == 7
    assert "a" in error.message and "agents start translator" in error.message


def a_lost_after_a_scale_to_4(engine: Engine) -> tuple[float, list[NodePlan]]:
    """Nodes a and b, echo scaled to 4 (2 each); then b keeps reporting its 2 while a
    goes silent until it is lost. Returns the time then and b's plans of that pass."""
    expiry = engine.ledger.config.heartbeat_expiry_s
    engine.handle(b"node-a", report("a"), 1000.0)
    engine.handle(b"node-b", report("b"), 1000.0)
    engine.handle(ADMIN, Scale(1, "echo", 4), 1000.0)
    run_pass(engine, 1000.0)
    now = 1000.0
    sent: dict[bytes, list[object]] = {}
    while not engine.nodes.nodes["a"].lost:
        now += 0.5
        engine.handle(b"node-b", report("b", {"echo": 2}), now)
        sent = run_pass(engine, now)
    assert now < 1000.0 + expiry + 1
    return now, plans(sent, b"node-b")


def test_a_lost_node_replicas_move_and_come_back_to_the_desired_total() -> None:
    engine = make_engine()
    # a goes silent past the expiry: b is planned all 4
    now, b_plans = a_lost_after_a_scale_to_4(engine)
    assert b_plans[-1].running == {"echo": 4}
    # a returns, still running its 2; b runs 4: the extras go, 4 in all
    engine.handle(b"node-b", report("b", {"echo": 4}), now)
    engine.handle(b"node-a", report("a", {"echo": 2}), now)
    sent = run_pass(engine, now)
    assert plans(sent, b"node-a")[-1].running["echo"] + \
        plans(sent, b"node-b")[-1].running["echo"] == 4


def test_after_a_restart_the_pool_keeps_what_the_nodes_run() -> None:
    engine = make_engine()
    engine.handle(b"node-a", report("a", {"echo": 3}), 1000.0)
    assert plans(run_pass(engine, 1000.0), b"node-a")[-1].running == {"echo": 3}
    assert engine.nodes.desired == {"echo": 3}


def test_a_handed_back_task_runs_again_without_using_a_retry() -> None:
    engine = make_engine()
    register(engine, b"agent-1", ("echo",), 1000.0)
    submit(engine, b"client", 1000.0, "t-1", max_retries=0)
    sent = run_pass(engine, 1000.0)
    assert any(isinstance(m, Dispatch) for m in sent[b"agent-1"])
    engine.handle(b"agent-1", Disconnect("bye", ["t-1"]), 1000.1)
    register(engine, b"agent-2", ("echo",), 1000.2)
    sent = run_pass(engine, 1000.2)
    (dispatch,) = [m for m in sent[b"agent-2"] if isinstance(m, Dispatch)]
    assert dispatch.tasks[0].attempt == 1  # the hand-back was not an attempt
    assert engine.ledger.counters["handed_back"] == 1
    assert engine.ledger.agents.get(b"agent-1") is None


def test_evening_out_moves_as_few_replicas_as_an_even_spread_takes() -> None:
    # a restarted (empty) beside b with 4 and c with 2: stable placement leaves a empty
    nodes = [view("a"), view("b", running={"echo": 4}), view("c", running={"echo": 2})]
    previous = {"b": {"echo": 4}, "c": {"echo": 2}}
    assert place({"echo": 6}, nodes, previous)["a"] == {"echo": 0}
    # evening out moves two from b to a, and leaves c alone
    assert place({"echo": 6}, nodes, previous, frozenset({"echo"})) == {
        "a": {"echo": 2}, "b": {"echo": 2}, "c": {"echo": 2}}
    # spread already (no two differ by more than one): nothing moves
    spread = {"a": {"echo": 1}, "b": {"echo": 2}, "c": {"echo": 2}}
    assert place({"echo": 5}, nodes, spread, frozenset({"echo"})) == spread
    # nothing to spread: nothing happens (and a node that cannot run it gets none)
    assert place({"echo": 0}, nodes, {}, frozenset({"echo"}))["a"] == {"echo": 0}
    other = [view("a", catalogue=("other",)), view("b", running={"echo": 3})]
    assert place({"echo": 3}, other, {"b": {"echo": 3}}, frozenset({"echo"})) == {
        "a": {}, "b": {"echo": 3}}


def test_a_node_back_with_nothing_running_gets_its_share_at_the_next_scale() -> None:
    engine = make_engine()
    # a goes silent past the expiry: b is planned all 4 and runs them
    now, _ = a_lost_after_a_scale_to_4(engine)
    engine.handle(b"node-b", report("b", {"echo": 4}), now)
    # a's supervisor restarted: a new connection, nothing running
    engine.handle(b"node-a2", report("a"), now)
    sent = run_pass(engine, now)
    assert plans(sent, b"node-a2")[-1].running == {"echo": 0}  # stable: nothing moves
    # When the agent is scaled, to the same count
    engine.handle(ADMIN, Scale(2, "echo", 4), now)
    sent = run_pass(engine, now)
    # Then the pool is spread again: two move to a
    (reply,) = [m for m in sent[ADMIN] if isinstance(m, ScaleReply)]
    assert reply.nodes == {"a": 2, "b": 2}
    assert plans(sent, b"node-a2")[-1].running == {"echo": 2}
    assert plans(sent, b"node-b")[-1].running == {"echo": 2}
