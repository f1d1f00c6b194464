"""The `dgo-compile` command line: thin Typer commands over the library."""
