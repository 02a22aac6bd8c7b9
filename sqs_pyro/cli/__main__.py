"""``python -m sqs_pyro.cli`` (e.g. under ``torchrun``) runs the ``sqs-pyro`` command line."""
import sys

from sqs_pyro.cli import main

sys.exit(main())
