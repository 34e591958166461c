"""Pure quantization math (no modules, no workflow): ranges, codes, packing, observers."""
