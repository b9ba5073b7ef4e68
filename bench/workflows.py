"""Workflow overhead: a map-reduce through the workflow layer against the same tasks
submitted directly, measured in one run.

``python bench/workflows.py --items 10000 --agents 2 --rounds 3 --json``

Both sides run against one broker (with its state service and bus) and ``--agents`` echo
agent processes. Workflow: ``MapReduceWorkflow(Step(capability="echo"),
Step(capability="echo"), max_parallel=500).execute(items)``, a durable run driven in this
process (run record, lease, checkpoint batches, held results released after each batch,
the reduce over the 10,000 results, the output saved), timed from ``execute`` to its
return. Direct: the same items as ``echo`` tasks through the asyncio ``Client``, keeping
``--window`` (500) in flight. The sides alternate ``--rounds`` times (which one goes
first alternates too) and the medians are reported. ``ratio`` is the median of the
rounds' ratios (each round's two sides ran back to back against one broker, so a ratio
compares like with like on a machine whose speed drifts between rounds);
``ratio_of_medians`` divides the two medians instead. Issue 12's target: at least 0.8.

The broker runs compiled when its build matches the source (``python -m broker.native
build``), else the Python source; ``broker`` in the report says which.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import warnings  # noqa: E402

import orjson  # noqa: E402

with warnings.catch_warnings():
    # A stale compiled build warns on import; the report says which build ran instead.
    warnings.simplefilter("ignore", RuntimeWarning)
    from agent_sdk import Client  # noqa: E402
    from agent_sdk.loop import loop_name, run as run_loop  # noqa: E402
    from bench._harness import median, orchestrator  # noqa: E402
    from broker import native_check  # noqa: E402
    from wire.native_build import PURE_PYTHON_ENV  # noqa: E402

#: Items of the warm-up of each side (not measured).
WARMUP_ITEMS = 500


def broker_build() -> str:
    """``compiled`` when the broker's build matches the source, else ``python`` (and the
    broker processes are told to run the source, without a warning each)."""
    if os.environ.get(PURE_PYTHON_ENV) == "1":
        return "python"
    usable, _ = native_check()
    if not usable:
        os.environ[PURE_PYTHON_ENV] = "1"
        return "python"
    return "compiled"


async def run_direct(client: Client, items: list[Any], window: int) -> float:
    """Seconds to run ``items`` as ``echo`` tasks, ``window`` in flight."""
    done = asyncio.get_running_loop().create_future()
    total = len(items)
    state = {"sent": 0, "received": 0, "failed": 0}

    def on_result(handle: Any) -> None:
        state["received"] += 1
        if not handle.result_nowait().ok:
            state["failed"] += 1
        if state["sent"] < total:
            item = items[state["sent"]]
            state["sent"] += 1
            client.submit(capabilities=["echo"], data=item).add_done_callback(on_result)
        elif state["received"] == total and not done.done():
            done.set_result(None)

    started = time.perf_counter()
    for _ in range(min(window, total)):
        item = items[state["sent"]]
        state["sent"] += 1
        client.submit(capabilities=["echo"], data=item).add_done_callback(on_result)
    await asyncio.wait_for(done, timeout=600)
    elapsed = time.perf_counter() - started
    if state["failed"]:
        raise RuntimeError(f"{state['failed']} direct task(s) failed")
    return elapsed


async def run_workflow(client: Client, items: list[Any], max_parallel: int,
                       run_id: str) -> float:
    """Seconds for the map-reduce over ``items`` (submitted, driven and ended)."""
    from workflows import MapReduceWorkflow, Step

    workflow = MapReduceWorkflow(Step(capability="echo"), Step(capability="echo"),
                                 max_parallel=max_parallel)
    started = time.perf_counter()
    result = await workflow.execute(items, client=client, run_id=run_id)
    elapsed = time.perf_counter() - started
    if result.extras.get("succeeded") != len(items) or len(result.data) != len(items):
        raise RuntimeError(f"the workflow run {run_id} did not map every item: "
                           f"{result.extras.get('succeeded')} of {len(items)}")
    return elapsed


async def measure(url: str, items: int, window: int, max_parallel: int, first: str,
                  round_no: int) -> dict[str, float]:
    """One round: warm both sides up, then time each, ``first`` going first."""
    data = list(range(items))
    warm = list(range(WARMUP_ITEMS))
    async with Client(url) as client:
        await client.wait_for_agents(1, "echo", timeout=30)
        await run_direct(client, warm, window)
        await run_workflow(client, warm, max_parallel, f"bench-warm-{round_no}")
        times: dict[str, float] = {}
        for side in (first, "direct" if first == "workflow" else "workflow"):
            if side == "direct":
                times[side] = await run_direct(client, data, window)
            else:
                times[side] = await run_workflow(client, data, max_parallel,
                                                 f"bench-{round_no}")
    return {side: items / seconds for side, seconds in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--agents", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of both sides, alternating (medians reported)")
    parser.add_argument("--window", type=int, default=500,
                        help="tasks in flight on the direct side, max_parallel of the map")
    parser.add_argument("--agent-concurrency", type=int, default=256,
                        help="max_concurrent of each echo agent")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    build = broker_build()
    rates: dict[str, list[float]] = {"workflow": [], "direct": []}
    ratios: list[float] = []
    for round_no in range(args.rounds):
        first = "workflow" if round_no % 2 == 0 else "direct"
        # A fresh broker each round: the workflow side leaves runs and checkpoints behind.
        with orchestrator(args.agents, args.agent_concurrency) as url:
            rate = run_loop(measure(url, args.items, args.window, args.window, first,
                                    round_no))
        for side, value in rate.items():
            rates[side].append(value)
        ratios.append(rate["workflow"] / rate["direct"])
    workflow_rate, direct_rate = median(rates["workflow"]), median(rates["direct"])
    report = {
        "items": args.items, "agents": args.agents, "rounds": args.rounds,
        "max_parallel": args.window, "window": args.window, "loop": loop_name(),
        "broker": build,
        "workflow_tasks_per_s": round(workflow_rate),
        "direct_tasks_per_s": round(direct_rate),
        "ratio": round(median(ratios), 3),
        "ratio_of_medians": round(workflow_rate / direct_rate, 3),
        "runs": {"workflow": [round(v) for v in rates["workflow"]],
                 "direct": [round(v) for v in rates["direct"]],
                 "ratio": [round(r, 3) for r in ratios]},
    }
    if args.json:
        print(orjson.dumps(report).decode())
    else:
        print(f"workflow (map-reduce): {report['workflow_tasks_per_s']:>8,} items/s")
        print(f"direct (Client):       {report['direct_tasks_per_s']:>8,} tasks/s")
        print(f"ratio:                 {report['ratio']:.3f}  (per round: "
              f"{', '.join(f'{r:.3f}' for r in report['runs']['ratio'])}; {args.items} items, "
              f"{args.agents} agents, max_parallel/window {args.window}, {report['loop']}, "
              f"{build} broker)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
