"""The coder agent's helpers: test runs (``testrun``), fixes and patches (``refactor``,
``fixer``), LLM code generation (``codegen``) and the task inputs they share (``inputs``).

:mod:`agents.coder` wires them into :class:`~agents.coder.CoderAgent`; each module here
is usable (and tested) without an agent or a broker.
"""
