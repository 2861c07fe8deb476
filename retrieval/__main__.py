"""``python -m retrieval``: the same as the ``retrieval`` command."""

from retrieval.cli import main

main()
