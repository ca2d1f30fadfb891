"""
C{python -m jobworker.pki}: the same as the C{jobworker-pki} command.
"""

import sys

from jobworker.pki.command import main

sys.exit(main())
