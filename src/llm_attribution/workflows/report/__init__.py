"""Reports: a study or run folder as one self-contained HTML page and a Markdown page."""
