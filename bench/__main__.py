"""``python -m bench`` (used by ``torchrun ... -m bench run``) is the ``bench`` command."""

from bench.cli import main

main()
