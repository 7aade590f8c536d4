"""The `gateskip` command line, assembled above the packages whose commands it offers."""
