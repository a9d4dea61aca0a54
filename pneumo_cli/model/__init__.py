"""The network: the segmentation_models U-Net factory, encoders and their input scaling,
ImageNet weights, losses, training fast paths and safe saving and loading."""
