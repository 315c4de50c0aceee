"""Training support: dataset layouts, evaluation metrics and data augmentation."""
