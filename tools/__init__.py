"""Command-line tools (thin argparse wrappers over the graphslim library)."""
