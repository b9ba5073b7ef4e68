"""The task engine: the broker's decisions, without I/O.

Built the way ``broker/state/store.py`` is: no socket, file or clock; every entry point
takes ``now``, and what it decides to send waits in outboxes that the broker's loop
flushes. See ``docs/architecture.md`` for the path of a task through it.

- :mod:`broker.engine.model`: task and agent records, the transition table;
- :mod:`broker.engine.lifecycle`: the only place a task's state changes;
- :mod:`broker.engine.queues`: pending tasks, retained results, deadlines;
- :mod:`broker.engine.routing`: the agent table and routing policies;
- :mod:`broker.engine.clients`, :mod:`~broker.engine.agents`, :mod:`~broker.engine.direct`,
  :mod:`~broker.engine.status`: one part per group of commands;
- :mod:`broker.engine.engine`: :class:`~broker.engine.engine.Engine`, which wires them.
"""

from broker import NATIVE_DIR, compiled

if compiled:
    # The compiled engine modules live in broker/_native/broker/engine/. broker's own
    # __path__ puts the build first, but a subpackage's __path__ is only its own source
    # directory: without this, `import broker.engine.queues` loaded the source, and the
    # compiled broker.server later loaded the compiled copy beside it (two classes per
    # name: "TaskRecord object expected; got TaskRecord").
    __path__.insert(0, str(NATIVE_DIR / "broker" / "engine"))  # noqa: F821
