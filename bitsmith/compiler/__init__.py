"""Compiler: IR, frontends, the pass pipeline, artifact writing and the CLI."""
