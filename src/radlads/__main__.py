"""`python -m radlads ...` is the `radlads` console script."""

import sys

from .cli.main import main

sys.exit(main())
