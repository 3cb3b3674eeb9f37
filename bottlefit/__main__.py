import sys

from bottlefit.cli import main

sys.exit(main())
