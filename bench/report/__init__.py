"""Reports from run records: tables (Markdown, LaTeX), figures, the profile table; written all or none
(:mod:`bench.report.staging`)."""
