"""From raw X-rays to training batches: preprocessing, the cache format (with its one
reader), splits, image preparation, tf.data pipelines, augmentation and synthetic data."""
