"""Memory: what a run uses (report) and, later, how it fits a budget."""
