"""``python -m megatron_moe_ext.lab``: see :mod:`megatron_moe_ext.lab.cli`."""

import sys

from .cli import main

sys.exit(main())
