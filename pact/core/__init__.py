"""The core every stage imports directly: errors, atomic I/O, data, the shared encoding,
model loading and torchrun helpers. Nothing here imports a stage."""
