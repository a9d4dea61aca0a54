"""From a trained run (or an export) to masks on new X-rays: opening a run, the predictor,
input sources, the post-processing gate and the outputs of `pneumo predict`."""
