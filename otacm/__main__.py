"""``python -m otacm``: the same as the ``otacm`` command."""

from otacm.cli import main

main()
