"""``python -m cli``: the ``orchestrator`` command line, as the console script runs it."""
from cli.main import main

main()
