"""Reports on finished sweeps, read from MLflow or results files, never from a live process:
`frame` (the sweep as a table), `render` (grid and details), `plots` (pictures), `gate` (baseline and
regression check, no matplotlib) and `cli` (`runner table|baseline|check`)."""
