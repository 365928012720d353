"""The compact MED (multimodal mixture of encoder-decoder) of BLIP. No Ray, no capfilt imports."""
