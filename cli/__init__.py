"""The ``orchestrator`` command line (``cli.main:main``)."""
