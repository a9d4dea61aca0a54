"""One module per command family; each function parses options and calls one library function."""
