"""The TensorFlow engine: the only place that imports TensorFlow and segmentation_models
(with their environment set once) and that sets the numeric precision policy."""
