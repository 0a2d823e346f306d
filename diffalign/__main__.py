"""``python -m diffalign ...``: the same as the ``diffalign`` command."""

import sys

from diffalign.cli import main

sys.exit(main())
