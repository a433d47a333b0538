import sys

from cdi_hook.cli import main

sys.exit(main())
