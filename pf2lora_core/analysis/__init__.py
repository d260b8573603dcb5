"""Analysis across runs: reading run directories, statistics over seeds, grouping, plots and tables."""
