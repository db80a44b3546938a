"""``python -m zeroflow`` = the ``zeroflow`` console script."""
import sys

from .cli import main

sys.exit(main())
