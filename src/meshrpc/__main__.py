"""``python -m meshrpc``: the same as the ``meshrpc`` command."""

import sys

from ._cli import main

sys.exit(main())
