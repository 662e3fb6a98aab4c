import sys

from bgeom.cli import main

sys.exit(main())
