"""The `jaxgpt` command line: one module per command group, each adding its subcommands; `main` only
dispatches. Nothing in the package imports this folder.
"""
