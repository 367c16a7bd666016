"""`python -m fluid_ops ...` is the `fluid-ops` command."""
import sys

from fluid_ops.cli import main

sys.exit(main())
