"""Image datasets: column conventions and loading a dataset named by a string (Hub name, saved dataset, folder)."""
