"""`python -m sdtorch.cli`: the `sdtorch` command."""

import sys

from . import main

sys.exit(main())
