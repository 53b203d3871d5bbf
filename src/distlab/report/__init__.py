"""Reading finished runs and reporting them: tables, plots, Markdown, and the commands that do."""
