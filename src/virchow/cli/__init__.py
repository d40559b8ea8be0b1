"""Command-line interface: ``virchow COMMAND ...``."""
