"""`python -m actlab ...` (and `torchrun ... -m actlab ...`) runs the command line."""

from actlab.cli import main

main()
