import sys

from recforge.cli import main

sys.exit(main())
