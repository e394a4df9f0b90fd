import sys

from clipbackdoor.pipeline.cli import main

sys.exit(main())
