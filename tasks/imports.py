"""Background CSV imports."""
