"""`python -m fwsvd_export ...` is the `fwsvd-export` command."""

import sys

try:  # the first Python the command runs; the libraries load later, inside a command's own handler
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C this early would print the traceback of an import cut short
    sys.stderr.write("interrupted (SIGINT) while starting: nothing was written\n")
    sys.exit(130)

main(prog_name="fwsvd-export")
