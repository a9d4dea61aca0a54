"""Reading and writing the file formats of the field: SIIM run-length encoding and its CSVs,
X-ray discovery, DICOM reading and writing, DICOM Segmentation objects."""
