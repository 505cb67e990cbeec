"""The `trace` command line. It parses arguments and prints; the work lives in the layers below."""
