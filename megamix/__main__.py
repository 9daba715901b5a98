import sys

from megamix.cli import main

sys.exit(main())
