import sys

from .ops import main

sys.exit(main())
