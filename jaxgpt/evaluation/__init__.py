"""Task evaluation the ecosystem's way: log-likelihood, rolling and generation requests
(`scoring`), the standard task kinds and their metrics (`tasks`)."""
