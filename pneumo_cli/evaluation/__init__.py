"""`pneumo evaluate`: SIIM scoring of predictions, gate tuning, the evaluation of a run on
its cache, and the HTML report."""
