"""The graph passes: capture (torch.export), match attention, propagate tokens, rewrite, validate."""
