"""Per-site and federation-wide validation reports (summary.json + self-contained report.html)."""
