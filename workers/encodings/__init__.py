"""Wire formats: Open Inference Protocol tensors and CloudEvents. Pure functions, no I/O."""
