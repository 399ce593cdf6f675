"""The whole run: stages wired together, its typed report, Markdown and plots."""
