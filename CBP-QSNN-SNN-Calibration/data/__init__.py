"""Training-time augmentation (AutoAugment CIFAR-10 policy and Cutout)."""
