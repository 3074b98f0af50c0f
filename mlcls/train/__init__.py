"""Training and evaluation: labels files, in-memory training images, the trainer and its losses,
augmentation and checkpoints, metrics and thresholds, scoring, calibration, and the train and eval
jobs with the eval report.
"""
