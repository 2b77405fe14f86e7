"""The fastkd command line (thin: parses arguments, calls the library)."""
