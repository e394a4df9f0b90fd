"""Analysis: metrics, the summary and report, tables, figures, MMD, TEXTSPAN, the rate sweep."""
