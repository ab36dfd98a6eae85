"""Numerics you can check: the float64 divergence finder (`divergence`, `gradients`), its report
and plot (`report`), and the accelerator self-check (`selfcheck`)."""
