"""Compression after distillation: pruning (weights, channels, attention heads), quantization-aware training,
int8 quantization and export. Functions on a trained student; it never imports strategies or run."""
