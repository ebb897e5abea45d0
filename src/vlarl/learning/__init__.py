"""Learning: demonstrations -> flow-matching teacher -> one-step consistency student -> ONNX.

One module per verb of the ``vlarl`` command line (collect, bc, teacher, distill, export,
evaluate), each with a dataclass config, plus the shared pieces they use.
"""
