"""Reports on finished sweeps, read from MLflow or results files, never from a live process:
`frame` (the sweep as a table), `render` (grid and details), `plots` (pictures), `gate` (baseline and
regression check, no matplotlib), `pick` (the variants within a budget, their Pareto fronts) and `cli`
(`runner table|baseline|check|pick`)."""
