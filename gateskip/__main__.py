import sys

from gateskip.cli import main

sys.exit(main())
