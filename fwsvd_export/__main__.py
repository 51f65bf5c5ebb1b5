"""`python -m fwsvd_export ...` is the `fwsvd-export` command."""
from .cli import main

main(prog_name="fwsvd-export")
