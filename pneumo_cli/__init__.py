"""pneumo: pneumothorax segmentation on chest X-rays, from raw DICOMs to masks and scores."""

__version__ = "0.1.0"
