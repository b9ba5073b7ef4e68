"""A client process that runs a map-reduce in itself, for the tests that kill it midway.

``python -m tests.workflows.client_script --broker URL --run-id ID --items N --sleep S
--max-parallel P`` prints ``{"event": "started", "run_id"}`` once connected, then runs
``MapReduceWorkflow`` over ``N`` items (``{"value": i}``, squared by the ``square``
capability, each taking ``S`` seconds), and prints ``{"event": "done", "data"}``.
"""

from __future__ import annotations

import argparse
import json
import sys

from agent_sdk import Client
from agent_sdk.loop import run
from workflows import MapReduceWorkflow, Step


async def main(args: argparse.Namespace) -> None:
    async with Client(args.broker) as client:
        await client.ping()
        print(json.dumps({"event": "started", "run_id": args.run_id}), flush=True)
        workflow = MapReduceWorkflow(Step(capability="square", params={"sleep_s": args.sleep}),
                                     max_parallel=args.max_parallel)
        result = await workflow.execute([{"value": i} for i in range(args.items)],
                                        client=client, run_id=args.run_id)
        print(json.dumps({"event": "done", "data": result.data}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--items", type=int, default=60)
    parser.add_argument("--sleep", type=float, default=0.05)
    parser.add_argument("--max-parallel", type=int, default=4)
    run(main(parser.parse_args()))
    sys.exit(0)
