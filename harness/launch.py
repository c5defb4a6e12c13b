"""``python -m harness.launch``: torchrun with the ranks' own exit codes (harness.train.launch),
under the name the README and the workflow give it."""

import sys

from harness.train.launch import main

if __name__ == "__main__":
    sys.exit(main())
