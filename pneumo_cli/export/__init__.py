"""`pneumo export`: a run as a SavedModel, TFLite or ONNX model, kept only after a parity
check against Keras."""
