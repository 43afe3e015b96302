"""FX graph passes over the ATen graph: the pass manager and one file per fusion."""
