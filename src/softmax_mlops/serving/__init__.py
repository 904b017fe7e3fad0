"""The serving deployable: onnxruntime inference, batch predict, the HTTP service and its protocols, drift.

It imports neither torch nor anything under softmax_mlops.stages (tests/unit/test_layers.py), which is what
lets the serving image ship without them.
"""
