"""Small models shipped with ats_fx: real weights that run offline (the demo's default)."""
from .digits import DIGITS_CHECKPOINT, DIGITS_GAP_CHECKPOINT, digits_split, digits_vit, preprocess_digits

__all__ = ["DIGITS_CHECKPOINT", "DIGITS_GAP_CHECKPOINT", "digits_split", "digits_vit", "preprocess_digits"]
