"""The bottom floor: errors, settings and their choices, atomic files, locks, workers,
progress and provenance. Imports nothing else of pneumo and no TensorFlow."""
