import sys

from txcompile.cli import main

sys.exit(main())
