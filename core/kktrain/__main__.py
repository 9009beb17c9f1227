"""``python -m kktrain`` (and ``torchrun -m kktrain``) runs the CLI."""

from kktrain.cli import main

main()
