"""The training core: distill() (the Python API), the loop, the distiller and teachers, caches, evaluation,
checkpoints and hooks. It never imports compress, strategies or run."""
