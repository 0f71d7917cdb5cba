#!/usr/bin/env python
"""Reproduction at the paper's scale in the scale lab: floor and emulated runs of the paper's
layers on an emulated johnny (2x8) or trevor (16x4), then a section of docs/reproduction.md
and a PNG. Needs root (network namespaces). See megatron_moe_ext/lab/reproduce.py and
docs/emulation.md ("The scale lab").

    scripts/reproduce_lab.py --cluster johnny --layers MoE-GPT-S,MoE-GPT,MoE-GPT-L \\
        --tokens 512 --scale 0.002
"""

import sys

from megatron_moe_ext.lab.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
