"""Command-line entry points; each module has add_arguments(parser) and run(args)."""
