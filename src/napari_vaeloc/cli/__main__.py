"""``python -m napari_vaeloc.cli``: the same as the ``vaeloc`` command."""

import sys

from . import main

sys.exit(main())
