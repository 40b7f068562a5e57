"""`python -m bc_proxy`: the same as the `bc-proxy` command."""

import sys

from bc_proxy.cli import main

sys.exit(main())
