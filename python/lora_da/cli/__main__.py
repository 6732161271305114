"""``python -m lora_da.cli``: the ``lora-da`` command line."""

import sys

from . import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
