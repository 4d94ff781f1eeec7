"""WebDataset streaming data pipeline."""
