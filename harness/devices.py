"""``python -m harness.devices``: which process holds each GPU (``--list``), or a command run on
devices of its own (harness.train.devices), under the name the README and the workflow give it."""

import sys

from harness.train.devices import main

if __name__ == "__main__":
    sys.exit(main())
