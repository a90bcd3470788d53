"""Data: datasets as uint8 arrays, batched augmentation and the batch sampler."""
