"""Conversion: step 0 (weight transfer) and the training steps 1-3."""
