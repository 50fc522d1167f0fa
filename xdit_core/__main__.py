import sys

from xdit_core.cli.main import main

sys.exit(main())
