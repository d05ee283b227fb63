"""Partial-convolution inpainting pipeline built on the public ``pconv_cuda`` API:
models, losses, data and masks, training, evaluation and applications.

Mask convention everywhere: 1 = known pixel, 0 = hole.
"""
