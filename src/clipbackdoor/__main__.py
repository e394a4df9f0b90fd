import sys

from clipbackdoor.cli import main

sys.exit(main())
