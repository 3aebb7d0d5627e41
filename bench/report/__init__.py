"""Reports from run records: tables (Markdown, LaTeX)."""
