"""Training: the loop, calibration, model building, augmentation and training datasets."""
