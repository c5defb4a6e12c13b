"""``python -m harness.reuse STUDY --run RUN``: bring in a run another study finished the same
(harness.workflow.reuse), under the name the README and ``harness plan`` give it."""

import sys

from harness.workflow.reuse import main

if __name__ == "__main__":
    sys.exit(main())
