"""``python -m scratchlm ...`` runs the ``scratchlm`` command."""
import sys

try:
    from scratchlm.cli import main
except KeyboardInterrupt:               # Ctrl-C while NumPy and friends load: one line, no traceback
    print("interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
