"""Plain-PyTorch core of the MoE extension (no Megatron imports).

- :mod:`.plan`     pure exchange plan of the FasterMoE smart schedule
- :mod:`.exchange` ``smart_exchange``: pipelined fwd/bwd executor over async p2p
- :mod:`.trace`    span tracer writing Chrome-trace JSON
"""
